"""GreenTrainer's measured backward time against its FLOPs budget (issue 26 item 6).

For each ``ρ`` the real trainer loop (``winnow.trainer.loop.Loop`` with ``greentrainer.rho=ρ``) selects its
tensors on the first step (importance from one real update, the DP under the budget); then the same model,
the same micro-batches, is timed forward and backward with every tensor trainable (plain) and with each
``ρ``'s selection (``requires_grad`` set as the loop sets it), interleaved repetition by repetition so load
drift hits every row alike. Reported per ``ρ``: ``ρ_bp`` (the backward budget as a fraction of the full
backward), the selection's analytic FLOPs fraction (``greentrainer_bp_ratio``, what the DP spent), and the
measured backward time over plain (median of the repetitions), with the forward for scale.

Models: ``bench`` is bench_train.py's (Llama hidden 256, 4 layers, SwiGLU 688, tied, V 32000), where the
tied LM head's input gradient alone is ~25% of the backward and ρ = 0.5 fits no tensor; ``tiny`` is the demo's
architecture (hidden 128, 4 layers, V 2048, the quality and builtin models).

Run: ``python -P benchmarks/bench_greentrainer.py [--models bench,tiny] [--reps 7] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import numpy as np

RHOS = {"bench": (0.5, 0.6, 0.7, 0.8), "tiny": (0.4, 0.5, 0.7)}


def _model(kind: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    big = kind == "bench"
    cfg = LlamaConfig(
        vocab_size=32000 if big else 2048,
        hidden_size=256 if big else 128,
        intermediate_size=688 if big else 344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        use_cache=False,
    )
    return LlamaForCausalLM(cfg).float()


def _samples(vocab: int, n: int, seed: int = 0):
    """bench_train.py's shape of data: log-normal lengths (median 200), the first ~45% a prompt (weight 0)."""
    rng = np.random.default_rng(seed)
    ids, ws = [], []
    for _ in range(n):
        L = int(np.clip(rng.lognormal(np.log(200), 0.6), 16, 1024))
        ids.append(rng.integers(3, vocab, L))
        w = np.ones(L, np.float32)
        w[: int(0.45 * L)] = 0.0
        ws.append(w)
    return ids, ws


def _loop(model, rho: float, tokens: int, n: int):
    """The trainer loop on ``n`` samples; ``rho`` > 0 turns GreenTrainer on (it selects on step 0)."""
    import torch

    from winnow.core.params import build_params
    from winnow.trainer.config import TrainParams
    from winnow.trainer.data import TrainData
    from winnow.trainer.distributed import Dist
    from winnow.trainer.loop import Env, Loop
    from winnow.trainer.method import MethodContext, apply_trainable
    from winnow.trainer.packing import prepare

    ids, ws = _samples(model.config.vocab_size, n)
    train = prepare(ids, ws, [str(i) for i in range(n)], max_seq_len=1024)
    data = TrainData(train, prepare([], [], [], 1024), "d", {}, model.config.vocab_size - 1)
    values = {"tokens_per_batch": tokens, "max_seq_len": 1024, "layout": "packed", "seed": 3, "epochs": 1}
    if rho > 0:
        values["greentrainer.rho"] = rho
    p = build_params(TrainParams, {k: str(v) for k, v in values.items()}, "bench_greentrainer")
    methods = p.methods()
    ctx = MethodContext(device=torch.device("cpu"), seed=p.seed, rank=0, world=1)
    model = apply_trainable(methods, model, ctx)
    return Loop(p, data, model, Env(torch.device("cpu"), Dist(), None), methods=methods)


def _time_once(loop, mbs) -> tuple[float, float]:
    """Forward and backward seconds of the step's micro-batches (gradients dropped after)."""
    fwd = bwd = 0.0
    for b in mbs:
        t0 = time.perf_counter()
        loss = loop._forward(loop.loss_mod, b)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        fwd, bwd = fwd + t1 - t0, bwd + t2 - t1
    for q in loop.loss_mod.parameters():
        q.grad = None
    return fwd, bwd


def bench(kind: str, reps: int, tokens: int, n: int) -> list[dict]:
    base = _model(kind)
    rows = {}
    for rho in RHOS[kind]:
        loop = _loop(copy.deepcopy(base), rho, tokens, n)
        try:
            loop._reselect(0)
        except Exception as e:  # a budget that fits no tensor is refused by the method itself
            rows[rho] = {"rho": rho, "refused": str(e).splitlines()[0]}
            continue
        m = next(x for x in loop.methods if getattr(x, "rho", 0) > 0).pending
        rows[rho] = {
            "rho": rho,
            "trained": m["greentrainer_trained"],
            "tensors": m["greentrainer_tensors"],
            "rho_bp": m["greentrainer_rho_bp"],
            "flops_ratio": m["greentrainer_bp_ratio"],
        }
    plain = _loop(base, 0.0, tokens, n)
    mbs = plain.micro_batches(0)
    named = list(plain.loss_mod.model.named_parameters())
    configs = {"plain": None} | {r: set(v["trained"]) for r, v in rows.items() if "trained" in v}
    times: dict = {k: ([], []) for k in configs}
    _time_once(plain, mbs)  # warm-up
    for _ in range(reps):
        for key, chosen in configs.items():
            for name, q in named:
                q.requires_grad_(chosen is None or name in chosen)
            f, b = _time_once(plain, mbs)
            times[key][0].append(f)
            times[key][1].append(b)
    med = {k: (statistics.median(f), statistics.median(b)) for k, (f, b) in times.items()}
    out = [
        {"model": kind, "rho": "plain", "fwd_s": med["plain"][0], "bwd_s": med["plain"][1], "bwd_ratio": 1.0}
    ]
    for rho, r in rows.items():
        if "trained" in r:
            r |= {"fwd_s": med[rho][0], "bwd_s": med[rho][1], "bwd_ratio": med[rho][1] / med["plain"][1]}
        out.append({"model": kind, **r})
    tokens_step = sum(b.real_tokens for b in mbs)
    for r in out:
        r["step_tokens"] = tokens_step
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | ρ | tensors trained | ρ_bp (budget) | selection's FLOPs / full backward | measured backward / plain "
        "| backward s | forward s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['model']} | {r['rho']} | refused: {r['refused']} | | | | | |")
            continue
        plain = r["rho"] == "plain"
        tensors, budget, flops = (
            ("all", "-", "1") if plain else (r["tensors"], f"{r['rho_bp']:.3f}", f"{r['flops_ratio']:.3f}")
        )
        lines.append(
            f"| {r['model']} | {r['rho']} | {tensors} | {budget} | {flops} | "
            f"{r['bwd_ratio']:.3f} | {r['bwd_s']:.3f} | {r['fwd_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bench,tiny")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch (one per step)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.time()
    rows = [r for kind in a.models.split(",") for r in bench(kind, a.reps, a.tokens, a.samples)]
    print(markdown(rows))
    print(f"wall {time.time() - t0:.0f}s, load average {os.getloadavg()}, threads {a.threads}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
