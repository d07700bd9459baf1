"""The project's exception types, importable without pyarrow, torch or the run store.

``UserError``: anything a user can fix (bad file, flag, config); the CLI prints it and exits 2.
Kernels and array functions raise it too, so this module depends on nothing.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix (bad file, flag or config); the CLI prints it and exits 2."""
