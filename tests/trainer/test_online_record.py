"""`--set record_weights=true`: the weights online training used, as selection/online-<name>-epoch<E>."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from winnow.core.store import RunDir

from cli_runner import WINNOW, run_cli
from trainer_fixtures import model_dir, synthetic_run

SETS = ["--set", "tokens_per_batch=256", "--set", "max_seq_len=128", "--set", "eval_fraction=0.2"]
SETS += ["--set", "lr=1e-2", "--set", "save_every=2", "--set", "keep_checkpoints=1", "--set", "epochs=2"]
SETS += ["--set", "online=q_tuning", "--set", "q_tuning.r_sample=0.5", "--set", "record_weights=true"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("record") / "model")


def _samples(run: RunDir) -> dict[str, list[int]]:
    t = run.table("samples").read(columns=["sample_id", "input_ids"]).to_pydict()
    return dict(zip(t["sample_id"], t["input_ids"], strict=True))


def _owner(row: np.ndarray, last_target: int, samples: dict[str, list[int]]) -> str:
    """The sample whose tokens start with this padded row's tokens up to its last weighted target."""
    want = row[: last_target + 1].tolist()
    hits = [sid for sid, ids in samples.items() if ids[: last_target + 1] == want]
    assert len(hits) == 1, hits
    return hits[0]


def _table(run: RunDir, name: str) -> dict[str, dict]:
    rows = run.table(name).read().to_pylist()
    return {r["sample_id"]: r for r in rows}


def test_recorded_weights_are_the_weights_the_loss_saw(model, tmp_path, monkeypatch):
    """Every micro-batch's (gather, weights) is captured at the loss call, mapped back to its sample by its
    tokens, and must equal the epoch's table row; samples never trained carry zeros and keep=False."""
    import torch

    from winnow.core.params import build_params, parse_sets
    from winnow.pipeline.train import train
    from winnow.trainer import loop as loop_mod
    from winnow.trainer.config import TrainParams

    run = synthetic_run(tmp_path / "run", model)
    seen: list[tuple[int, object]] = []  # (step, micro-batch) as fed to the loss module
    step_now = {"step": -1}
    real_step, real_forward = loop_mod.Loop.train_step, loop_mod.Loop._forward

    def train_step(self, step):
        step_now["step"] = step
        return real_step(self, step)

    def forward(self, module, b, noise=0.0, key=0):
        if torch.is_grad_enabled():  # training, not evaluation (no_grad)
            seen.append((step_now["step"], b))
        return real_forward(self, module, b, noise, key)

    monkeypatch.setattr(loop_mod.Loop, "train_step", train_step)
    monkeypatch.setattr(loop_mod.Loop, "_forward", forward)
    values = parse_sets([s for s in SETS if s != "--set"], "test") | {
        "model": str(model),
        "selection": "all",
        "progress": "false",
    }
    res = train(build_params(TrainParams, values, "test"), run.root)
    samples = _samples(RunDir(run.root))
    per_epoch = res["steps"] // 2
    expected: list[dict[str, np.ndarray]] = [{}, {}]
    for step, b in seen:
        width = b.input_ids.shape[1]
        rows, cols = np.divmod(b.gather, width)
        for r in np.unique(rows):
            sel = rows == r
            sid = _owner(b.input_ids[r], int(cols[sel].max()) + 1, samples)
            epoch = expected[step // per_epoch]
            assert sid not in epoch  # each sample trains once per epoch
            w = np.zeros(len(samples[sid]), np.float32)
            w[cols[sel] + 1] = b.weights[sel]
            epoch[sid] = w
    online = sorted(t for t in RunDir(run.root).tables() if t.startswith("selection/online-"))
    assert online == ["selection/online-all-epoch1", "selection/online-all-epoch2"]
    for e, name in enumerate(online):
        got = _table(RunDir(run.root), name)
        assert got.keys() == samples.keys()
        assert expected[e] and len(expected[e]) < len(samples)  # q_tuning dropped some samples
        for sid, row in got.items():
            want = expected[e].get(sid, np.zeros(len(samples[sid]), np.float32))
            assert np.array_equal(np.asarray(row["token_weight"], np.float32), want), (name, sid)
            assert row["keep"] == bool(want.any()) and row["n_weighted"] == int(np.count_nonzero(want))
            assert row["epoch"] == e + 1 and row["policy"] == "online:q_tuning"
        reasons = {r["reason"] for r in got.values()}
        assert "held_out" in reasons and any(x.startswith("dropped_") for x in reasons)
        assert all(r["reason"].startswith(("kept_", "topup_")) for s, r in got.items() if s in expected[e])


def test_tables_read_back_through_inspect_card_and_train(model, tmp_path):
    """The table holds the selection contract: DuckDB sees it, the card shows it, the trainer accepts it."""
    run = synthetic_run(tmp_path / "run", model).root
    code, _, err = run_cli(
        "train", run, "--selection", "all", "--model", model, *SETS, "--set", "max_steps=2"
    )
    assert code == 0, err
    names = [t for t in RunDir(run).tables() if t.startswith("selection/online-")]
    assert names == ["selection/online-all-epoch1"]  # max_steps ended inside epoch 1: one table
    sql = "select count(*), count_if(reason = 'not_reached') from selection_online_all_epoch1"
    code, out, err = run_cli("inspect", run, "--sql", sql, "--format", "json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert list(row.values())[0] == 40 and list(row.values())[1] > 0
    code, _, err = run_cli("card", run, "--out", tmp_path / "card")
    assert code == 0, err
    assert (
        "### `online_all_epoch1` (policy `online:q_tuning`)" in (tmp_path / "card" / "README.md").read_text()
    )
    code, _, err = run_cli(
        "train", run, "--selection", "online-all-epoch1", "--model", model, "--out", tmp_path / "again",
        "--set", "max_steps=1", "--set", "tokens_per_batch=256", "--set", "max_seq_len=128",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli("train", "--data", tmp_path / "x.parquet", "--model", model, *SETS)
    assert code == 2 and "record_weights" in err


def test_resumed_run_records_the_same_tables(model, tmp_path):
    """Killed after step 2 of a 3-step epoch (checkpoint at step 1) and rerun: both epochs' tables equal an
    uninterrupted run's, so the rows of step 1 came back from the checkpoint and the redone step 2 was not
    counted twice; the weights are bitwise equal."""
    import torch
    from safetensors.torch import load_file

    tables = {}
    for kind in ("straight", "killed"):
        run = synthetic_run(tmp_path / kind, model).root
        args = ["train", run, "--selection", "all", "--model", model, *SETS, "--set", "save_every=1"]
        if kind == "killed":
            env = dict(os.environ, WINNOW_FAULT_KILL_AFTER_STEPS="2")
            cmd = [WINNOW, *map(str, args)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            assert proc.returncode == -9, proc.stderr
            assert not [t for t in RunDir(run).tables() if t.startswith("selection/online-")]  # mid-epoch
        code, _, err = run_cli(*args)
        assert code == 0, err
        tables[kind] = {
            t: RunDir(run).table(t).read().to_pylist()
            for t in RunDir(run).tables()
            if t.startswith("selection/online-")
        }
        tables[kind + "_w"] = load_file(run / "train" / "all" / "model.safetensors")
    assert sorted(tables["straight"]) == ["selection/online-all-epoch1", "selection/online-all-epoch2"]
    assert tables["straight"] == tables["killed"]
    a, b = tables["straight_w"], tables["killed_w"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "policy",
    [
        "sstoken",
        pytest.param("rho1", marks=pytest.mark.slow),
        pytest.param("q_tuning", marks=pytest.mark.slow),
    ],
)
def test_reuse_scores_from_the_training_forward_select_what_a_separate_forward_selects(
    model, tmp_path, policy
):
    """online_scoring=reuse (scores from the training forward's hidden states) against the default separate
    no-grad forward: the same tokens chosen at every step of two epochs (recorded tables equal) and the
    same model to float tolerance (the two batch the head differently)."""
    from safetensors.torch import load_file

    extra = ["--set", f"online={policy}", "--set", "sstoken.gamma=0.5", "--set", "rho1.k_ratio=0.5"]
    if policy == "rho1":
        extra += ["--set", f"rho1.reference={model_dir(tmp_path / 'ref', seed=1)}"]
    got = {}
    for mode in ("separate", "reuse"):
        run = synthetic_run(tmp_path / mode, model).root
        code, _, err = run_cli(
            "train",
            run,
            "--selection",
            "all",
            "--model",
            model,
            *SETS,
            *extra,
            "--set",
            f"online_scoring={mode}",
        )
        assert code == 0, err
        got[mode] = (
            {t: RunDir(run).table(t).read().to_pylist() for t in RunDir(run).tables() if "online-" in t},
            load_file(run / "train" / "all" / "model.safetensors"),
            [json.loads(x) for x in (run / "train" / "all" / "metrics.jsonl").read_text().splitlines()],
        )
    (ta, wa, ma), (tb, wb, mb) = got["separate"], got["reuse"]
    assert len(ta) == 2 and ta == tb
    start = load_file(model / "model.safetensors")
    moved = max(float((wa[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-2  # lr 1e-2 for 6 steps: the weights moved, and the two runs agree 100x closer
    assert all(float((wa[k] - wb[k]).abs().max()) < 1e-4 for k in wa)
    for a, b in zip(ma, mb, strict=True):
        assert a.get("weighted_tokens") == b.get("weighted_tokens")
        assert a.get("weight_sum") == b.get("weight_sum")
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_two_ranks_record_the_tables_of_one_process(model, tmp_path):
    """2 gloo DDP ranks with sstoken under reuse scoring: the rows each rank recorded are
    gathered onto rank 0 and the tables equal a single process running both ranks' mini-batches per step
    (grad_accum 2); the select= argument passes through DDP."""
    import torch.multiprocessing as mp

    from winnow.trainer.distributed import Dist

    from dist_online_worker import train_and_read, worker

    run = synthetic_run(tmp_path / "run", model).root
    want = {
        mode: train_and_read(str(run), str(model), 2, mode == "fsdp2", Dist(), f"single-{mode}")
        for mode in ("ddp",)
    }
    assert all(len(w) == 2 for w in want.values())
    out = tmp_path / "tables.json"
    args = (2, str(tmp_path / "init"), str(run), str(model), str(out))
    mp.spawn(worker, args=args, nprocs=2, join=True)
    got = json.loads(out.read_text())
    for mode in ("ddp",):
        tables = {k.replace(f"online-{mode}-", f"online-single-{mode}-"): v for k, v in got[mode].items()}
        assert tables.keys() == want[mode].keys()
        for name, rows in want[mode].items():
            for a, b in zip(rows, tables[name], strict=True):
                assert a["sample_id"] == b["sample_id"] and a["reason"] == b["reason"], (mode, name)
                assert a["token_weight"] == b["token_weight"], (mode, name, a["sample_id"])
