"""The GPU check's ``lemo`` section (registered in ``gpu_sections.SECTIONS``): LeMo / JENGA training steps
(``winnow.trainer.lemo``) against dense LoRA on the check's Llama (1B shape on the GPU, bf16 autocast,
SDPA), one document of ``batch × seq`` tokens (8,192 on the GPU), LoRA r 8, α 16 on q, k, v, o.

Paths: ``dense_lora`` (the reference); ``lemo_keep1`` (keep 1, dense MLP: its first loss must equal the
reference's, the same function); ``lemo`` (keep 0.4 in the code's layers ``n//2-1 .. n-2``, MLP backward
through 20% of the neurons): step seconds and, on CUDA, the peak memory of a step beyond the model
(``max_memory_allocated``), and the ratios against dense LoRA (the paper: up to 1.93x less memory, 1.36x
faster). The predictors are random (``BlockPredictor`` at the code's sizes): selection quality does not
change cost. Imports no polars, duckdb or datasets (checked, as the lora section does).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import types

import numpy as np
import torch
from gpu_sections import Section, build_llama, check, rel_loss, sync, timed


def _predictors(folder, c: dict, block: int) -> None:
    from winnow.trainer.lemo import default_layers, save_predictors
    from winnow.trainer.lemo_math import BlockPredictor

    d = c["hidden"] // c["heads"]
    layers = default_layers(c["layers"])
    torch.manual_seed(0)
    preds = {i: BlockPredictor(c["heads"], d, block) for i in layers}
    h1, h2 = preds[layers[0]].sizes
    save_predictors(
        folder,
        preds,
        {"block": block, "n_heads": c["heads"], "head_dim": d, "h1": h1, "h2": h2, "layers": layers},
    )


def lemo(s: Section) -> None:
    loaded = set(sys.modules)
    from winnow.trainer.lemo import LemoParams
    from winnow.trainer.lora import LoraParams, apply_lora
    from winnow.trainer.loss import WeightedLMLoss
    from winnow.trainer.method import MethodContext

    c = s.c
    n = c["batch"] * c["seq"]
    block = 64 if s.dev == "cuda" else 16
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, c["vocab"], (1, n), generator=g).to(s.dev)
    args = (ids, torch.arange(n - 1, device=s.dev), ids[0, 1:], torch.ones(n - 1, device=s.dev))
    batch = types.SimpleNamespace(position_ids=np.arange(n)[None])
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if s.bf16 else contextlib.nullcontext
    folder = tempfile.mkdtemp(prefix="gpu_lemo_")
    _predictors(__import__("pathlib").Path(folder), c, block)
    ref: dict = {}

    def run(name: str, keep: float, mlp_keep: float) -> dict:
        if s.dev == "cuda":
            torch.cuda.empty_cache()
        dev = torch.device(s.dev)
        model = apply_lora(
            build_llama(s).float(), LoraParams(r=8, alpha=16, target="q_proj,k_proj,v_proj,o_proj"), dev
        )
        method = None
        if name != "dense_lora":
            method = LemoParams(predictors=folder, keep=keep, mlp_keep=mlp_keep, block=block)
            method.trainable(model, MethodContext(device=dev))
        module = WeightedLMLoss(model).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        change = (lambda: method.forward_change(batch, model)) if method else contextlib.nullcontext
        with torch.no_grad(), amp(), change():
            first = float(module(*args)) / (n - 1)

        def one():
            opt.zero_grad(set_to_none=True)
            with amp(), change():
                module(*args).backward()
            opt.step()

        one()  # warm-up; the AdamW state exists from here on
        out = {"loss": first, "tokens": n}
        if s.dev == "cuda":
            sync(s.dev)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            one()
            sync(s.dev)
            out["peak_GiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
        _, sec = timed(one, s.dev, c["reps"])
        out["step_s"] = round(sec, 4)
        if method is not None:
            out["kept"] = method.metrics().get("lemo_kept")
        if name == "dense_lora":
            ref.update(out)
        elif name == "lemo_keep1":
            check(out, "first loss vs dense LoRA", rel_loss(first, ref["loss"]), 5e-3 if s.bf16 else 1e-6)
        return out

    dense = s.path("dense_lora", lambda: run("dense_lora", 1.0, 1.0), block=block)
    if dense["ok"]:
        s.path("lemo_keep1", lambda: run("lemo_keep1", 1.0, 1.0), block=block)
        lo = s.path("lemo", lambda: run("lemo", 0.4, 0.2), block=block, keep=0.4, mlp_keep=0.2)
        if lo["ok"]:
            ratios = {"dense_over_lemo_step_s": round(dense["step_s"] / lo["step_s"], 3)}
            if "peak_GiB" in lo:
                ratios["dense_over_lemo_peak"] = round(dense["peak_GiB"] / max(lo["peak_GiB"], 1e-9), 3)
            s.rec.update(lambda d: d["sections"][s.name].__setitem__("ratios", ratios))
    heavy = [m for m in ("polars", "duckdb", "datasets") if m in sys.modules and m not in loaded]
    s.path("no_heavy_imports", lambda: {"ok": not heavy, "imported": heavy})
