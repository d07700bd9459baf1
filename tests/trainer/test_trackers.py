"""`--set report_to=...` and the plain progress lines of a piped `winnow train` (issue 28 item 4): wandb and
trackio through stand-in modules that record their calls (no install, no network); what they receive is
compared with metrics.jsonl, the source of truth; a tracker that is not installed is refused naming its
pip package, before --out exists."""

from __future__ import annotations

import importlib.machinery
import json
import re
import sys
import types

import pytest

from cli_runner import run_cli
from trainer_fixtures import export_parquet, model_dir

SETS = ["--set", "tokens_per_batch=256", "--set", "max_seq_len=128", "--set", "eval_fraction=0.2"]
SETS += ["--set", "lr=1e-2", "--set", "max_steps=4", "--set", "save_every=0", "--set", "log_every=2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracker_inputs")
    return model_dir(root / "model"), export_parquet(root / "data.parquet", n=24)


def _stand_in(name: str, calls: list) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec reads it from sys.modules
    mod.init = lambda **kw: calls.append(("init", kw))
    mod.log = lambda values, step=None: calls.append(("log", step, dict(values)))
    mod.finish = lambda: calls.append(("finish",))
    return mod


@pytest.mark.parametrize("kind", ["wandb", "trackio"])
def test_tracker_gets_a_copy_of_metrics_jsonl_and_piped_stdout_gets_plain_lines(
    inputs, tmp_path, monkeypatch, kind
):
    calls: list = []
    monkeypatch.setitem(sys.modules, kind, _stand_in(kind, calls))
    m, d = inputs
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        "train", "--data", d, "--model", m, "--out", out, *SETS, "--set", f"report_to={kind}"
    )
    assert code == 0, err
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert calls[0][0] == "init" and calls[0][1]["project"] == "winnow" and calls[-1] == ("finish",)
    assert calls[0][1]["config"]["max_steps"] == 4
    logged = [c[1:] for c in calls if c[0] == "log"]
    want = [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in rows]
    assert logged == want and [s for s, _ in logged] == [0, 2, 4, 4]  # eval 0, steps 2 and 4, final eval
    # piped (stdout is a StringIO here): a line at steps 2 and 4 with the JSONL's loss
    lines = [ln for ln in stdout.splitlines() if ln.startswith("step ")]
    trained = [r for r in rows if "loss" in r]
    assert len(lines) == 2 == len(trained)
    for ln, r in zip(lines, trained, strict=True):
        assert re.fullmatch(r"step \d+/4  loss \d+\.\d{4}  tok/s \d+  eta \d+:\d\d", ln), ln
        assert ln.startswith(f"step {r['step']}/4  loss {r['loss']:.4f}  tok/s {r['tokens_per_s']:.0f}")


@pytest.mark.parametrize(
    "kind,package", [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("trackio", "trackio")]
)
def test_missing_tracker_names_its_package_before_out_exists(inputs, tmp_path, monkeypatch, kind, package):
    monkeypatch.setitem(sys.modules, kind, None)  # import fails, as when not installed
    m, d = inputs
    out = tmp_path / "out"
    code, _, err = run_cli(
        "train", "--data", d, "--model", m, "--out", out, *SETS, "--set", f"report_to={kind}"
    )
    assert code == 2 and f"pip install {package}" in err and err.count("\n") <= 2, err
    assert not out.exists()


def test_plain_line_eta_from_the_mean_step_time(monkeypatch):
    from winnow.trainer import trackers

    clock = iter([100.0, 112.0])  # constructed at t=100 s, 12 s later 3 steps done (from step 2): 4 s a step
    monkeypatch.setattr(trackers.time, "perf_counter", lambda: next(clock))
    log = trackers.PlainLog(start=2, total=20)
    line = log.line({"step": 5, "loss": 1.23456, "tokens_per_s": 987.6})
    assert line == "step 5/20  loss 1.2346  tok/s 988  eta 1:00"  # 15 steps left x 4 s = 60 s
