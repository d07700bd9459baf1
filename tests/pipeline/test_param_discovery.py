"""Parameters users can discover (issue 28 item 2): `winnow steps STEP` with one description per
parameter and dotted keys, "did you mean" for an unknown `--set` key, and `max_steps` winning over `epochs`
as in transformers."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from winnow.core.params import field_docs

from cli_runner import WINNOW, run_cli
from trainer_fixtures import export_parquet, model_dir


@dataclass
class Documented:
    plain: int = 1  # trailing comment
    # the comment above
    above: str = ""
    wrapped: bool = False  # inside the parentheses
    helped: float = field(default=0.5, metadata={"help": "from metadata"})  # not this one
    bare: int = 0


def test_field_docs_follow_the_comment_convention():
    assert field_docs(Documented) == {
        "plain": "trailing comment",
        "above": "the comment above",
        "wrapped": "inside the parentheses",
        "helped": "from metadata",
        "bare": "",
    }


def test_steps_train_through_the_console_script():
    proc = subprocess.run([WINNOW, "steps", "train"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("train (training): ")
    assert not any(line.startswith(("ingest ", "select ")) for line in lines)  # that step only
    params = [line for line in lines[1:] if not line.strip().startswith("aliases:")]
    # by hand from trainer/lora.py and trainer/config.py
    assert "    lora.r = 0" in [p.split("  #")[0].rstrip() for p in params]
    assert any(
        p.startswith("    lora.r = 0 ") and p.endswith("# adapter rank; 0 = full fine-tuning") for p in params
    )
    assert any(p.startswith("    online.q_tuning.r_sample = 0.25 ") for p in params)
    assert all("  # " in p and p.split("  # ", 1)[1].strip() for p in params), [
        p for p in params if "  # " not in p
    ]
    assert not any("Params(" in p for p in params)  # groups are dotted keys, never dataclass reprs


def test_every_step_describes_every_parameter():
    code, out, err = run_cli("steps")
    assert code == 0, err
    params = [line for line in out.splitlines() if line.startswith("    ") and "aliases:" not in line]
    assert len(params) > 100
    assert [p for p in params if "  # " not in p] == []


@pytest.mark.parametrize(
    "args, hint",
    [
        (["--set", "lora_rank=8"], "did you mean `lora.r`"),
        (["--set", "lora.rank=8"], "did you mean `lora.r`"),
        (["--set", "max_step=5"], "did you mean `max_steps`"),
        (["--set", "q_tuning.r_sampel=0.5"], "did you mean `online.q_tuning.r_sample`"),
    ],
)
def test_unknown_set_key_suggests_the_closest(tmp_path, args, hint):
    code, _, err = run_cli("train", "--data", tmp_path / "x.parquet", "--model", "builtin:tiny", *args)
    assert code == 2 and hint in err and len(err.strip().splitlines()) == 1, err


def test_unknown_step_suggests_the_closest():
    code, _, err = run_cli("steps", "trian")
    assert code == 2 and "no step 'trian'" in err and "did you mean `train`" in err, err
    code, _, err = run_cli("steps", "zzz")
    assert code == 2 and "did you mean" not in err and "train" in err, err


SETS = ["--set", "tokens_per_batch=256", "--set", "max_seq_len=128", "--set", "eval_fraction=0.2"]


def _losses(inputs, out, *sets) -> list[float]:
    m, d = inputs
    code, _, err = run_cli("train", "--data", d, "--model", m, "--out", out, *SETS, *sets)
    assert code == 0, err
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_max_steps_wins_over_epochs(tmp_path):
    inputs = model_dir(tmp_path / "model"), export_parquet(tmp_path / "d.parquet", n=24)
    n = len(_losses(inputs, tmp_path / "one_epoch", "--set", "epochs=1"))
    assert n >= 2
    longer = _losses(inputs, tmp_path / "longer", "--set", "epochs=1", "--set", f"max_steps={n + 3}")
    assert len(longer) == n + 3  # before issue 28: capped to the epoch's n
    # epochs no longer matter once max_steps is set (same schedule, same order of epochs)
    assert _losses(inputs, tmp_path / "two", "--set", "epochs=2", "--set", f"max_steps={n + 3}") == longer
    assert (
        len(_losses(inputs, tmp_path / "shorter", "--set", "epochs=3", "--set", f"max_steps={n - 1}"))
        == n - 1
    )
