"""How the `winnow` command ends: one line on stderr and an exit status a shell can act on.

| what happened | stderr | status |
| --- | --- | --- |
| success, `--help`, `-h`, `--version` | (the output) | 0 |
| usage error (unknown option or command, missing argument, bad value) | `error: ... (see winnow CMD --help)` | 2 |
| user error (`UserError`: bad file, row, parameter; the message names the fix) | `error: ...` | 2 |
| a bare `winnow` | the help | 2 |
| runtime error | `error: <type>: <message> (rerun with --debug for the traceback)` | 1 |
| Ctrl-C (SIGINT) | `Aborted` | 130 |

`--debug` (anywhere before `--`, or `WINNOW_DEBUG=1`) re-raises runtime errors with their traceback.

Usage errors are recognised by class name and attributes rather than by `isinstance(e,
click.ClickException)`: typer >= 0.29 raises them from its own bundled copy of click, which the
installed `click` package does not know (that is what turned every usage error into a 40-line traceback),
and older typer raises them from `click` itself.

Ctrl-C reaches every process of the terminal's foreground group, so torchrun's workers get it as the
launcher does; winnow starts no child processes of its own. What a step was writing when it is
interrupted is left as a hidden temporary file or folder that the next run removes, and a checkpoint
being saved is removed on the way out (``trainer/checkpoint.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

ABORTED = 130


def debug_requested(argv: list[str]) -> bool:
    head = argv[: argv.index("--")] if "--" in argv else argv
    return "--debug" in head or os.environ.get("WINNOW_DEBUG", "") not in ("", "0")


def _is_click_error(e: BaseException) -> bool:
    """A usage error of click or of typer's bundled click: both carry ``exit_code`` and ``format_message``."""
    names = {c.__name__ for c in type(e).__mro__}
    return "ClickException" in names and hasattr(e, "format_message")


def _is_click_abort(e: BaseException) -> bool:
    return type(e).__name__ == "Abort" and "click" in type(e).__module__


def _click_exit_code(e: BaseException) -> int | None:
    """``click.exceptions.Exit`` (typer.Exit) from either click: its exit code, else None."""
    if type(e).__name__ == "Exit" and hasattr(e, "exit_code"):
        return int(e.exit_code)
    return None


def _usage_line(e: BaseException) -> tuple[str, int]:
    if type(e).__name__ == "NoArgsIsHelpError":  # a bare `winnow`: typer has printed the help
        return e.format_message().strip(), 2
    ctx = getattr(e, "ctx", None)
    hint = f" (see {ctx.command_path} --help)" if ctx is not None and getattr(ctx, "command_path", "") else ""
    return f"error: {e.format_message()}{hint}", int(getattr(e, "exit_code", 2) or 2)


def run_and_exit(app: Callable[..., object], argv: list[str], user_error: type[Exception]) -> None:
    """Run the typer ``app`` on ``argv`` and ``sys.exit`` with the table's status."""
    debug = debug_requested(argv)
    try:
        result = app(args=argv, standalone_mode=False)
    except user_error as e:
        _fail(f"error: {e}", 2)
    except KeyboardInterrupt:
        _fail("Aborted", ABORTED)
    except Exception as e:  # noqa: BLE001 - every other ending is mapped to one line and a status
        code = _click_exit_code(e)
        if code is not None:
            sys.exit(code)
        if _is_click_abort(e):
            _fail("Aborted", ABORTED)
        if _is_click_error(e):
            _fail(*_usage_line(e))
        if debug:
            raise
        winnow_exit = getattr(e, "winnow_exit", None)  # a runtime stop that carries its own status
        if isinstance(winnow_exit, int):
            _fail(f"error: {e}", winnow_exit)
        _fail(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", 1)
    # standalone_mode=False returns an Exit's code (typer >= 0.29 also returns 130 for an interrupt)
    if isinstance(result, int) and not isinstance(result, bool):
        if result == ABORTED:
            _fail("Aborted", ABORTED)
        sys.exit(result)
    sys.exit(0)


def _fail(message: str, status: int) -> None:
    if message:
        print(message, file=sys.stderr, flush=True)
    sys.exit(status)
