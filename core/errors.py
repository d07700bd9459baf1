"""The project's exception types, importable without pyarrow, torch or the run store.

``UserError``: anything a user can fix (bad file, flag, config); the CLI prints it and exits 2.
Kernels and array functions raise it too, so this module depends on nothing.

``RejectError``: one input row that cannot become a sample. It carries the short reason code of
its reject row (``bad_role``, ``template_mismatch``, ...) and a human detail. Record parsing
(:mod:`winnow.core.formats`, as ``RecordError``) and chat-template rendering
(:mod:`winnow.core.render`, as ``RenderError``) raise the same class, so ingest turns either
into a reject row the same way.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix (bad file, flag or config); the CLI prints it and exits 2."""


class RejectError(ValueError):
    """A row that becomes a reject: ``reason`` is the reject row's short code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
