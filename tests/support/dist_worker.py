"""Spawned by test_distributed: one rank of a gloo group running the trainer's real step on CPU."""

from __future__ import annotations

import os

import torch


def capture_step_grads(loop, steps):
    """Run ``steps`` optimizer steps; return the gradients each step applied (full tensors, by name)."""
    seen = []
    original = loop.opt.step

    def step(*a, **k):
        grads = {}
        for name, q in loop.loss_mod.named_parameters():
            g = q.grad
            g = g.full_tensor() if hasattr(g, "full_tensor") else g
            grads[name.removeprefix("model.")] = g.detach().clone()
        seen.append(grads)
        return original(*a, **k)

    loop.opt.step = step
    for s in range(steps):
        loop.train_step(s)
    return seen


def make_loop(grad_accum: int, fsdp: bool, dist_info):
    from winnow.trainer.config import TrainParams
    from winnow.trainer.data import TrainData
    from winnow.trainer.loop import Env, Loop
    from winnow.trainer.packing import prepare

    from trainer_fixtures import tiny_llama, weighted_samples

    ids, ws = weighted_samples(30, seed=5)
    train = prepare(ids, ws, [str(i) for i in range(len(ids))], max_seq_len=64)
    data = TrainData(train, prepare([], [], [], 96), "d", {}, 299)
    p = TrainParams(
        grad_accum=grad_accum,
        tokens_per_batch=64,
        max_seq_len=64,
        max_grad_norm=0.0,
        lr=1e-3,
        layout="packed",
        fsdp=fsdp,
        seed=3,
    )
    env = Env(torch.device("cpu"), dist_info, None)
    return Loop(p, data, tiny_llama(seed=1), env)


def worker(rank: int, world: int, init_file: str, grad_accum: int, out: str, steps: int):
    import torch.distributed as dist

    from winnow.trainer.distributed import Dist

    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        got = {}
        for mode in ("ddp", "fsdp2"):  # one group for both: spawning ranks costs more than the steps
            loop = make_loop(grad_accum, mode == "fsdp2", Dist(rank, world, rank))
            got[mode] = capture_step_grads(loop, steps)
        if rank == 0:
            torch.save(got, out)
    finally:
        dist.destroy_process_group()
