"""Fitting LeMo's block predictors (the roof's ``winnow lemo-fit``, :mod:`winnow.pipeline.lemo_fit`, calls
:func:`fit`): record each chosen layer's normed attention input and ground-truth block scores on the
samples, train one :class:`~winnow.trainer.lemo_math.BlockPredictor` per layer, measure its recall on
held-out samples.

As the authors' ``predictor_trainer.py`` (ALGORITHMS_TRAINING.md §7): one sequence per step, SmoothL1 on
``Î`` against the ground truth summed over layers, only predictor weights train, AdamW with β2 0.95,
linear warmup over 20 steps then a constant rate, 400 steps, the code's rate 2e-5. Measured on the builtin
tiny model with 47 chats of ~2k tokens (RESULTS.md "LeMo"): held-out recall at keep 0.4 was 0.452 at 2e-5,
0.452 at 1e-4 and 0.442 at 1e-3 (1e-3 also ended at a 6x higher training loss), against 0.433 untrained:
near chance at every rate, because this model's ground-truth column sums are nearly flat (coefficient of
variation 2-5% across a document's blocks), so there is little ranking to learn. Samples are cut to a whole number of blocks; samples under two blocks are skipped
(one block leaves nothing to choose). The captured states are kept in memory as float32 (``max_tokens``
bounds them: 262,144 tokens × hidden 4096 × 4 B = 4 GiB per layer for a 7B model, 128 MiB for the tiny
one). Recall: the share of the true top ``max(1, ⌊nb·keep⌋)`` blocks (by ground-truth column sums) that
the predictor's selection keeps, averaged over held-out samples; chance is ≈ ``keep``.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from winnow.trainer.lemo_math import BlockPredictor, block_scores, recall

Record = tuple[torch.Tensor, torch.Tensor]  # (normed attention input [L, D], ground truth [nb, nb])


def _qk(attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE ``q`` ``[H, L, d]`` and ``k`` ``[Hkv, L, d]`` of one sequence ``x`` ``[L, D]`` (after the
    per-head ``q_norm``/``k_norm`` of Qwen3-like layers, which come before RoPE)."""
    d = attn.head_dim
    q = attn.q_proj(x).view(x.shape[0], -1, d)
    k = attn.k_proj(x).view(x.shape[0], -1, d)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q.transpose(0, 1).float(), k.transpose(0, 1).float()


@torch.no_grad()
def capture(model: Any, seqs: list[torch.Tensor], layers: list[int], block: int) -> dict[int, list[Record]]:
    """Per layer, one record per sequence (each a whole number of blocks)."""
    from winnow.trainer.loss import unwrap

    body = unwrap(model).base_model
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        body.layers[i].self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.__setitem__(i, kw["hidden_states"] if "hidden_states" in kw else a[0]),
            with_kwargs=True,
        )
        for i in layers
    ]
    out: dict[int, list[Record]] = {i: [] for i in layers}
    try:
        for ids in seqs:
            body(input_ids=ids[None], use_cache=False)
            for i in layers:
                x = seen[i][0]
                q, k = _qk(body.layers[i].self_attn, x)
                out[i].append((x.float().cpu(), block_scores(q, k, block).cpu()))
    finally:
        for h in hooks:
            h.remove()
    return out


def _on(pred: BlockPredictor, t: torch.Tensor) -> torch.Tensor:
    return t.to(pred.q[0].weight.device)


def train_predictors(
    preds: dict[int, BlockPredictor], data: dict[int, list[Record]], steps: int, lr: float, seed: int
) -> list[float]:
    """SmoothL1 training, one sequence per step (shuffled epochs); the loss of each step (summed over layers)."""
    params = [q for p in preds.values() for q in p.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # 20 warmup steps
    n = len(next(iter(data.values())))
    order: list[int] = []
    rng = random.Random(seed)
    losses = []
    for _ in range(steps):
        if not order:
            order = rng.sample(range(n), n)
        j = order.pop()
        loss = sum(
            torch.nn.functional.smooth_l1_loss(p(_on(p, data[i][j][0])[None])[0], _on(p, data[i][j][1]))
            for i, p in preds.items()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def held_out_recall(
    preds: dict[int, BlockPredictor], data: dict[int, list[Record]], keep: float
) -> dict[int, float]:
    return {
        i: sum(recall(p(_on(p, x)[None])[0], _on(p, gt), keep) for x, gt in data[i]) / len(data[i])
        for i, p in preds.items()
    }


def fit(
    model: Any,
    train: list[torch.Tensor],
    held: list[torch.Tensor],
    layers: list[int],
    p: Any,  # winnow.pipeline.lemo_fit.LemoFitParams: block, keep, steps, lr, h1, h2, seed
) -> tuple[dict[int, BlockPredictor], dict[str, Any]]:
    """The fitted predictors and what the fit measured (for the JSON beside them)."""
    cfg = unwrap_config(model)
    n_heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // n_heads
    torch.manual_seed(p.seed)
    dev = next(
        model.parameters()
    ).device  # the predictors train where the model runs (records stay on the CPU)
    preds = {i: BlockPredictor(n_heads, head_dim, p.block, p.h1, p.h2).to(dev) for i in layers}
    tr = capture(model, train, layers, p.block)
    ho = capture(model, held, layers, p.block)
    before = held_out_recall(preds, ho, p.keep)
    losses = train_predictors(preds, tr, p.steps, p.lr, p.seed)
    after = held_out_recall(preds, ho, p.keep)
    h1, h2 = preds[layers[0]].sizes
    meta = {
        "block": p.block, "n_heads": n_heads, "head_dim": head_dim, "h1": h1, "h2": h2, "layers": layers,
        "keep": p.keep, "steps": p.steps, "lr": p.lr, "train_samples": len(train), "held_out_samples": len(held),
        "held_out_tokens": sum(len(s) for s in held), "loss_first": losses[0] if losses else None,
        "loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "recall": {str(i): after[i] for i in layers}, "recall_untrained": {str(i): before[i] for i in layers},
        "recall_mean": sum(after.values()) / len(after),
    }  # fmt: skip
    return preds, meta


def unwrap_config(model: Any) -> Any:
    from winnow.trainer.loss import unwrap

    return unwrap(model).config
