"""Spawned by test_method_distributed: one rank of a gloo group running each training method's real
steps on CPU (and the same in one process, called directly)."""

from __future__ import annotations

import os

import torch

# each method's parameters, as `--set` would give them
METHODS = {
    "otr": {"loss": "otr", "otr.k": "16", "otr.tau": "1.3"},
    "dft": {"loss": "dft"},
    "hft": {"hft": "true", "hft.seed": "2"},
    "greentrainer": {"greentrainer.rho": "0.8", "greentrainer.interval": "1"},
    "caft": {"caft.heads": "2", "caft.beta": "0.3", "caft.train_heads": "true"},
    # full fine-tuning trains the MLP, so LeMo's MLP backward is off (mlp_keep=1); its predictors: _lemo_dir
    "lemo": {"lemo.block": "8", "lemo.keep": "0.5", "lemo.mlp_keep": "1"},
}


def _lemo_dir() -> str:
    """Seeded random predictors for the tiny Llama's layer 0 (each process writes its own identical copy)."""
    import tempfile
    from pathlib import Path

    from winnow.trainer.lemo import save_predictors
    from winnow.trainer.lemo_math import BlockPredictor

    folder = tempfile.mkdtemp(prefix="lemo_dist_")
    with torch.random.fork_rng():
        torch.manual_seed(7)
        pred = BlockPredictor(4, 8, 8, h1=6, h2=10)
    meta = {"block": 8, "n_heads": 4, "head_dim": 8, "h1": 6, "h2": 10, "layers": [0]}
    save_predictors(Path(folder), {0: pred}, meta)
    return folder


FSDP2_METHODS = ("otr", "dft", "caft", "hft")  # GreenTrainer refuses fsdp=true


def method_loop(method: str, grad_accum: int, dist_info, fsdp: bool = False):
    """The loop over 30 weighted samples, packed, with ``method`` applied (trainable choice first)."""
    from winnow.core.params import build_params
    from winnow.trainer.config import TrainParams
    from winnow.trainer.data import TrainData
    from winnow.trainer.loop import Env, Loop
    from winnow.trainer.method import MethodContext, apply_trainable
    from winnow.trainer.packing import prepare

    from trainer_fixtures import tiny_llama, weighted_samples

    ids, ws = weighted_samples(30, seed=5)
    train = prepare(ids, ws, [str(i) for i in range(len(ids))], max_seq_len=64)
    data = TrainData(train, prepare([], [], [], 96), "d", {}, 299)
    base = {"grad_accum": grad_accum, "tokens_per_batch": 64, "max_seq_len": 64, "max_grad_norm": 0.0}
    base |= {"lr": 1e-3, "layout": "packed", "seed": 3, "epochs": 2, "fsdp": fsdp}
    sets = METHODS[method] | ({"lemo.predictors": _lemo_dir()} if method == "lemo" else {})
    p = build_params(TrainParams, {k: str(v) for k, v in base.items()} | sets, "test")
    methods = p.methods()
    ctx = MethodContext(device=torch.device("cpu"), seed=p.seed, rank=dist_info.rank, world=dist_info.world)
    model = apply_trainable(methods, tiny_llama(seed=1), ctx)
    return Loop(p, data, model, Env(torch.device("cpu"), dist_info, None), methods=methods)


def step_grads(loop, steps: list[int]) -> list[dict[str, torch.Tensor]]:
    """The gradients each of ``steps`` applied, by name, caught where the loop's update clips them (after the
    ``world / Σ w`` scaling): a re-selection rebuilds the optimizer, and GreenTrainer's importance update
    (which does not clip) is not a training step."""
    seen = []
    original = torch.nn.utils.clip_grad_norm_

    def clip(params, *a, **k):
        full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g  # noqa: E731  (FSDP2 shards)
        named = loop.loss_mod.named_parameters()
        seen.append({n: full(q.grad).detach().clone() for n, q in named if q.grad is not None})
        return original(params, *a, **k)

    torch.nn.utils.clip_grad_norm_ = clip
    try:
        for s in steps:
            loop.train_step(s)
    finally:
        torch.nn.utils.clip_grad_norm_ = original
    return seen


def worker(rank: int, world: int, init_file: str, grad_accum: int, out: str, steps: list[int]):
    import torch.distributed as dist

    from winnow.trainer.distributed import Dist

    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        info = Dist(rank, world, rank)
        got = {m: step_grads(method_loop(m, grad_accum, info), steps) for m in METHODS}
        got |= {
            f"{m}-fsdp2": step_grads(method_loop(m, grad_accum, info, True), steps) for m in FSDP2_METHODS
        }
        if rank == 0:
            torch.save(got, out)
    finally:
        dist.destroy_process_group()
