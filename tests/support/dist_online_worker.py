"""Spawned by test_online_record: one gloo rank training with an online policy, reuse scoring and
record_weights on a run; rank 0 returns the recorded tables."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def train_and_read(run_root: str, model: str, grad_accum: int, fsdp: bool, dist_info, name: str) -> dict:
    from transformers import AutoModelForCausalLM

    from winnow.core.params import build_params
    from winnow.core.store import RunDir
    from winnow.pipeline import train as data_mod
    from winnow.trainer.config import TrainParams
    from winnow.trainer.loop import Env, Loop

    values = dict(
        model=model, selection="all", name=name, online="sstoken", online_scoring="reuse", record_weights=True, epochs=2,
        grad_accum=grad_accum, tokens_per_batch=256, max_seq_len=128, eval_fraction=0.2, fsdp=fsdp,
        lr=1e-2, layout="padded", progress=False,
    )  # fmt: skip
    p = build_params(TrainParams, values, "test")
    data = data_mod.load_data(p, run_root)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lm.config.use_cache = False
    loop = Loop(p, data, lm, Env(torch.device("cpu"), dist_info, Path(run_root) / "out"))
    for s in range(loop.total_steps):
        loop.train_step(s)
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 writes the last table after the last step
    if not dist_info.main:
        return {}
    run = RunDir(run_root)
    names = [t for t in run.tables() if t.startswith(f"selection/online-{name}-")]
    return {t: run.table(t).read(columns=["sample_id", "reason", "token_weight"]).to_pylist() for t in names}


def worker(rank: int, world: int, init_file: str, run_root: str, model: str, out: str):
    import json

    import torch.distributed as dist

    from winnow.trainer.distributed import Dist

    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        got = {}
        for mode in ("ddp",):  # online=sstoken under FSDP2 is refused (config.py)
            got[mode] = train_and_read(run_root, model, 1, mode == "fsdp2", Dist(rank, world, rank), mode)
        if rank == 0:
            Path(out).write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


def exchange_history_cache(rank: int, world: int, init_file: str, out: str) -> None:
    """test_online_history_cache's 2-rank exchange (spawned ranks import it by module name)."""
    import json

    import torch.distributed as dist

    from winnow.trainer.online_history_cache import HistoryCache

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cache = HistoryCache(np.array([3, 0, 2, 4, 1]))
        mine = {0: [0, 3], 1: [2, 3]}[rank]  # sample 3 filled by both: rank 0's values must win
        for k in mine:
            cache.put(k, np.arange(cache.counts[k], dtype=np.float32) + 10.0 * k + 0.25 + rank)
        cache.exchange(rank, world, torch.device("cpu"))
        first = {k: cache.get(k).tolist() for k in range(5) if cache.get(k) is not None}
        if rank == 1:
            cache.values[:] = -1.0  # values exchanged before are not sent again
        cache.put(4, np.array([7.5 + rank], np.float32))  # both fill sample 4: every rank takes rank 0's
        cache.exchange(rank, world, torch.device("cpu"))
        second = {k: cache.get(k).tolist() for k in range(5) if cache.get(k) is not None}
        Path(out.format(rank)).write_text(json.dumps({"first": first, "second": second}))
    finally:
        dist.destroy_process_group()
