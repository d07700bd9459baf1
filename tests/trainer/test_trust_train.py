"""Issue 24 (trainer side): `winnow train` writes only where it may, one training per --out at a time,
checkpoints are verified before a resume (a damaged one is skipped for the newest good one), bad values
and non-finite weights are refused at the start, and divergence stops with nothing saved as final."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from winnow.core.store import UserError
from winnow.trainer.config import TrainParams

from cli_runner import WINNOW, run_cli
from trainer_fixtures import export_parquet, model_dir, synthetic_run

SETS = ["--set", "tokens_per_batch=256", "--set", "max_seq_len=128", "--set", "eval_fraction=0.2"]
CKPT = SETS + [
    "--set",
    "lr=1e-2",
    "--set",
    "epochs=2",
    "--set",
    "save_every=2",
    "--set",
    "keep_checkpoints=2",
]


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust_train")
    model = model_dir(root / "model")
    data = export_parquet(root / "data.parquet", n=40)
    run = synthetic_run(root / "run", model)
    (run.root / "manifest.json").write_text('{"steps": {}}')  # what makes a folder a run to the guard
    (run.root / "plan.json").write_text('{"shards": 2}')  # what `verify` expects beside samples/
    return model, data, run.root


def _train_data(inputs, out, *extra):
    model, data, _ = inputs
    return run_cli(
        "train", "--data", data, "--model", model, "--out", out, *SETS, "--set", "max_steps=1", *extra
    )


# ---------------------------------------------------------------------------------------------- where
def test_out_never_overwrites_the_model_a_run_or_a_foreign_folder(inputs, tmp_path):
    model, data, run = inputs
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "README.md").write_text("mine")
    (foreign / "config.json").write_text("{}")
    before = {p: _tree(p) for p in (model, run, foreign)}
    for out in (
        model,
        model / "sub",
        model.parent,
        run,
        run / "card",
        run / "samples",
        run / "train",
        foreign,
    ):
        code, _, err = _train_data(inputs, out)
        assert code == 2 and err.count("\n") == 1, (out, err)
    for out in (run, run / "card", run / "x"):  # training a run's selection: only RUN/train/NAME
        code, _, err = run_cli(
            "train", run, "--selection", "all", "--model", model, "--out", out, *SETS, "--set", "max_steps=1"
        )
        assert code == 2 and "RUN/train/NAME" in err, (out, err)
    assert {p: _tree(p) for p in before} == before


@pytest.mark.parametrize("name", ["..", "../../x", "a/b", ".", "x" * 300])
def test_name_is_one_safe_folder(inputs, name):
    model, _, run = inputs
    before = _tree(run)
    code, _, err = run_cli(
        "train", run, "--selection", "all", "--model", model, "--name", name, *SETS, "--set", "max_steps=1"
    )
    assert code == 2 and "--name" in err and err.count("\n") == 1, err
    assert _tree(run) == before and not (run.parent / "x").exists()


def test_a_second_training_into_the_same_out_is_refused(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    now = time.time()
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "step": "train:x",
        "since": now,
        "heartbeat": now,
    }
    (out / ".winnow.lock").write_text(json.dumps(holder))  # a live training (this process) holds it
    code, _, err = _train_data(inputs, out)
    assert code == 2 and "being written by another winnow process" in err
    assert sorted(p.name for p in out.iterdir()) == [".winnow.lock"]
    (out / ".winnow.lock").unlink()
    assert _train_data(inputs, out)[0] == 0 and not (out / ".winnow.lock").exists()


# ---------------------------------------------------------------------------------------------- checkpoints
def _cli(out: Path, data: Path, model: Path, kill_after: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, WINNOW_FAULT_KILL_AFTER_STEPS=str(kill_after)) if kill_after else None
    args = [WINNOW, "train", "--data", data, "--model", model, "--out", out, *CKPT]
    return subprocess.run(list(map(str, args)), env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def killed(inputs, tmp_path_factory):
    """A straight run and a run SIGKILLed after step 5 (checkpoints step-2 and step-4 on disk)."""
    model, data, _ = inputs
    root = tmp_path_factory.mktemp("killed")
    assert run_cli("train", "--data", data, "--model", model, "--out", root / "straight", *CKPT)[0] == 0
    proc = _cli(root / "killed", data, model, kill_after=5)
    assert proc.returncode == -9, proc.stderr
    steps = sorted(p.name for p in (root / "killed" / "checkpoints").glob("step-*"))
    assert steps == ["step-00000002", "step-00000004"], steps
    shutil.copytree(root / "killed", root / "pristine")  # the identity names --out: resume in place
    return root / "straight", root / "killed"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


TAMPER = {
    "state.pt byte": lambda c: _flip(c / "state.pt", -100),
    "model.safetensors byte": lambda c: _flip(c / "model.safetensors", -7),
    "trainer_state step": lambda c: (c / "trainer_state.json").write_text(
        (c / "trainer_state.json").read_text().replace('"step": 4', '"step": 5')
    ),
    "truncated": lambda c: (c / "state.pt").write_bytes((c / "state.pt").read_bytes()[:100]),
    "garbage json": lambda c: (c / "trainer_state.json").write_text("{not json"),
    "checksums removed": lambda c: (c / "checksums.json").unlink(),
}


@pytest.mark.parametrize("how", sorted(TAMPER))
def test_damaged_checkpoint_is_named_and_skipped_for_the_newest_good_one(killed, inputs, tmp_path, how):
    model, data, _ = inputs
    straight, out = killed
    shutil.rmtree(out)
    shutil.copytree(out.parent / "pristine", out)
    TAMPER[how](out / "checkpoints" / "step-00000004")
    (out / "checkpoints" / ".tmp-step-00000006-99999").mkdir()  # leftovers of killed saves
    (out / ".final-99999").mkdir()
    code, _, err = run_cli("train", "--data", data, "--model", model, "--out", out, *CKPT)
    assert code == 0, err
    if how == "checksums removed":  # an older winnow's checkpoint: skipped, not deleted
        assert "step-00000004 has no checksums.json and cannot be verified: skipped, kept" in err, err
    else:
        assert "step-00000004 is damaged" in err, err
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), how  # resumed from step 2
    assert not list(out.glob(".final-*")) and not list((out / "checkpoints").glob(".tmp-*"))
    assert len(list((out / "checkpoints").glob("step-*"))) <= 3  # keep_checkpoints=2, plus the best


def test_divergence_stops_with_exit_1_and_saves_nothing_final(inputs, tmp_path):
    """A token weight of 3e38 (finite, so accepted) overflows the weighted loss to inf mid-training."""
    model, _, _ = inputs
    t = pq.read_table(export_parquet(tmp_path / "d.parquet", n=40))
    w = t["token_weight"].to_pylist()
    for k in (10, 20, 30):
        w[k] = [3e38 if x > 0 else 0.0 for x in w[k]]
    pq.write_table(
        t.set_column(
            t.column_names.index("token_weight"), "token_weight", pa.array(w, pa.list_(pa.float32()))
        ),
        tmp_path / "big.parquet",
    )
    out = tmp_path / "o"
    code, _, err = run_cli(
        "train",
        "--data",
        tmp_path / "big.parquet",
        "--model",
        model,
        "--out",
        out,
        *CKPT,
        "--set",
        "save_every=1",
    )
    assert code == 1 and "diverged" in err and err.count("\n") == 1, err
    assert not (out / "model.safetensors").exists() and not (out / "train_result.json").exists()
    kept = list((out / "checkpoints").glob("step-*"))
    assert kept, "the steps before the divergence were checkpointed"
    for ck in kept:
        assert all(torch.isfinite(v).all() for v in load_file(ck / "model.safetensors").values()), ck


# ---------------------------------------------------------------------------------------------- data
def _write(path: Path, cols: dict) -> Path:
    pq.write_table(pa.table(cols), path)
    return path


def test_nonfinite_or_broken_data_rows_exit_2_naming_them(inputs, tmp_path):
    from winnow.pipeline import train as data_mod

    good = {"input_ids": [[5, 6, 7]] * 4, "loss_mask": [[0, 1, 1]] * 4}
    cases = {
        "inf": good | {"token_weight": [[0.0, 1.0, 1.0]] * 3 + [[0.0, float("inf"), 1.0]]},
        "null ids": {"input_ids": pa.array([[5, 6, 7]] * 3 + [None]), "token_weight": [[0.0, 1.0, 1.0]] * 4},
        "nested ids": {"input_ids": [[[5], [6]]] * 4, "token_weight": [[0.0, 1.0]] * 4},
        "null token": {"input_ids": [[5, None, 7]] * 4, "token_weight": [[0.0, 1.0, 1.0]] * 4},
    }
    for name, cols in cases.items():
        path = _write(tmp_path / f"{name.replace(' ', '_')}.parquet", cols)
        with pytest.raises(UserError, match="row 3|inf|input_ids") as e:
            data_mod.load_data(TrainParams(data=str(path), eval_fraction=0.0), None)
        assert str(path) in str(e.value), (name, e.value)
    code, _, err = _train_data(inputs, tmp_path / "o", "--data", tmp_path / "inf.parquet")
    assert code == 2 and "token weight inf" in err and not (tmp_path / "o").exists()


def test_eval_where_on_data_is_read_only_and_reads_exactly_that_file(tmp_path):
    from winnow.pipeline import train as data_mod

    def rows(n):
        return {
            "sample_id": [f"s{i}" for i in range(n)],
            "input_ids": [[5, 6, 7]] * n,
            "token_weight": [[0.0, 1.0, 1.0]] * n,
        }

    target = _write(tmp_path / "k[1].parquet", rows(6))
    _write(tmp_path / "k1.parquet", rows(50))  # what a glob k[1].parquet would read instead
    quoted = _write(tmp_path / "it's.parquet", rows(5))
    for path, n in ((target, 6), (quoted, 5)):
        d = data_mod.load_data(TrainParams(data=str(path), eval_where="sample_id in ('s0', 's1')"), None)
        assert d.source["samples"] == n and d.source["held_out"] == 2, d.source
    leak = tmp_path / "leak.csv"
    for cond in (f"true; COPY (SELECT 1) TO '{leak}'", f"sample_id in (select * from read_csv('{target}'))"):
        with pytest.raises(UserError, match="eval_where"):
            data_mod.load_data(TrainParams(data=str(target), eval_where=cond), None)
    assert not leak.exists()


def test_eval_where_on_a_run_cannot_smuggle_a_write(inputs, tmp_path):
    model, _, run = inputs
    shard = run / "samples" / "part-00000.parquet"
    before = _tree(run)
    code, _, err = run_cli(
        "train",
        run,
        "--selection",
        "all",
        "--model",
        model,
        *SETS,
        "--set",
        "max_steps=1",
        "--set",
        f"eval_where=true; COPY (SELECT 1 AS x) TO '{shard}' (FORMAT parquet)",
    )
    assert code == 2 and "eval_where" in err and "refused" in err, err
    assert _tree(run) == before


def test_domains_checked_by_the_dataclass_too():
    for kw in (
        {"lr": float("inf")},
        {"max_grad_norm": float("nan")},
        {"seed": -1},
        {"device": "meta"},
        {"threads": 100000},
        {"lr": 1e308},
        {"weight_decay": float("inf")},
    ):
        with pytest.raises(ValueError):
            TrainParams(**kw)
    assert np.isfinite(TrainParams().lr)


def test_verify_checks_a_trainings_eval_loss_and_a_rerun_repairs_it(inputs):
    model, _, run = inputs
    args = (
        "train",
        run,
        "--selection",
        "all",
        "--model",
        model,
        "--name",
        "ver",
        *SETS,
        "--set",
        "max_steps=1",
    )
    assert run_cli(*args)[0] == 0
    assert run_cli("verify", run)[0] == 0
    man = json.loads((run / "manifest.json").read_text())
    man["steps"]["train:ver"]["eval_loss"] = 0.001  # a better number for the card
    (run / "manifest.json").write_text(json.dumps(man))
    code, _, err = run_cli("verify", run)
    assert code == 1 and "train:ver says eval_loss=0.001" in err, err
    code, out, err = run_cli(*args)
    assert code == 0 and "nothing to do" in out, err
    assert run_cli("verify", run)[0] == 0
