"""Where a command may write: the checks every writing verb runs before it creates anything (issue 24).

An adversarial round found `export --out RUN --force` deleting the run it read, `train --out MODEL_DIR`
overwriting the base weights and `train --name ../../x` writing outside the run. The rules, all
:class:`UserError` (exit 2) naming the path and the fix:

* :func:`refuse_run_overlap`: an output is never the run, inside it, or a folder holding it (except an
  ``allow`` list of places the command owns: ``RUN/card`` for `card`, ``RUN/train/<name>`` for `train`).
* :func:`check_name`: names that become folders are one path component of letters, digits, ``_``, ``-``,
  ``.`` (not ``.`` or ``..``), at most :data:`NAME_MAX` characters.
* :func:`check_train_out`: a training's ``--out`` is absent, empty, or a previous training (it holds
  ``winnow_train.json``: the identity check then decides resume or refuse); never the model directory
  or a folder inside or around it, never inside a run other than under ``RUN/train/``.
* :func:`refuse_special_file`: an input is a regular file or a folder (a FIFO would block forever).
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

from winnow.pipeline.store import MANIFEST, UserError

NAME_MAX = 100  # a selection or training name: far below the 255-byte file name limit with prefixes
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
LOCK_NAME = ".winnow.lock"


def check_name(name: str, key: str = "name") -> str:
    """``name`` when it is a safe single folder name, else ValueError (a dataclass check: exit 2)."""
    if len(name) > NAME_MAX:
        raise ValueError(f"{key}={name[:20]}... has {len(name)} characters: use at most {NAME_MAX}")
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"{key}={name!r}: use letters, digits, '_', '-' or '.' (one folder name, not a path)"
        )
    return name


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def refuse_run_overlap(run_dir: str | Path, out: str | Path, flag: str, allow: tuple[Path, ...] = ()) -> None:
    """UserError when ``out`` is the run, lies inside it (outside ``allow``) or holds it."""
    root, target = Path(run_dir).resolve(), Path(out).expanduser().resolve()
    if any(_within(target, a.resolve()) for a in allow):
        return
    if _within(target, root):
        where = "is the run" if target == root else "is inside the run"
        raise UserError(f"{flag} {out} {where} {run_dir}: write outside the run (it is an input)")
    if root in [target, *target.parents] or target in root.parents:
        raise UserError(f"{flag} {out} holds the run {run_dir}: choose a folder that does not contain it")


def _train_slot(parts: tuple[str, ...]) -> bool:
    return len(parts) == 2 and parts[0] == "train"


def enclosing_run(path: Path) -> Path | None:
    """The nearest folder at or above ``path`` that is a winnow run (it has a manifest or a plan)."""
    for p in [path, *path.parents]:
        if (p / MANIFEST).is_file() or (p / "plan.json").is_file():
            return p
    return None


def check_train_out(out: Path, run_dir: str | Path | None, model_dir: Path, identity_file: str) -> None:
    """Refuse a training ``--out`` that would overwrite something it does not own (module docstring)."""
    target, model = out.expanduser().resolve(), model_dir.resolve()
    if _within(target, model) or _within(model, target):
        raise UserError(
            f"--out {out} overlaps the model directory {model_dir}: the base weights are an input; "
            "choose another --out"
        )
    runs = {r for r in (enclosing_run(target), Path(run_dir).resolve() if run_dir is not None else None) if r}
    for r in sorted(runs):
        if _within(target, r) and not _train_slot(target.relative_to(r).parts):
            raise UserError(
                f"--out {out} is inside the run {r}: a training writes into a run only as RUN/train/NAME "
                "(use --name NAME, or an --out outside the run)"
            )
        if target in r.parents:
            raise UserError(f"--out {out} holds the run {r}: choose a folder that does not contain it")
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {out} is a file: give a folder (absent, empty or a previous training)")
    if target.is_dir() and not (target / identity_file).is_file():
        foreign = sorted(p.name for p in target.iterdir() if p.name != LOCK_NAME)
        if foreign:
            raise UserError(
                f"--out {out} holds files that no winnow training wrote ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}): give an empty or new folder"
            )


def refuse_special_file(path: Path) -> None:
    """UserError unless ``path`` is a regular file or a folder (a FIFO or a device would hang or stream)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # missing: the reader names it
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UserError(f"{path}: not a regular file or a folder (a pipe or device?); give a data file")


class _Folder:
    """What :func:`winnow.pipeline.lock.run_lock` needs of a run: a root, and nothing to tidy."""

    def __init__(self, root: Path):
        self.root = root

    def tidy(self) -> list[Path]:
        return []


def out_lock(out: Path, what: str):
    """The run lock's protocol (O_EXCL file, heartbeat, takeover of a dead holder, torchrun jobs) on an
    output folder: a second `winnow train` into the same ``--out`` is refused while the first runs."""
    from winnow.pipeline.lock import run_lock

    out.mkdir(parents=True, exist_ok=True)
    return run_lock(_Folder(out), what)  # type: ignore[arg-type]


def refuse_view_collision(run, table: str) -> None:
    """UserError when another table of ``run`` gets the same inspect view name as ``table``: `a.b` and
    `a_b` both became ``selection_a_b`` and broke `inspect` and `card` for the whole run."""
    from winnow.pipeline.inspect_run import view_name

    mine = view_name(table)
    clash = sorted(t for t in run.tables() if t != table and view_name(t) == mine)
    if clash:
        raise UserError(
            f"{table} would share the SQL view name {mine} with {clash[0]}: choose another name "
            "(views replace every character other than letters, digits and '_' by '_')"
        )
