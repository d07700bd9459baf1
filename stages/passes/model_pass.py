"""The model pass: one forward of a causal LM over the samples, all requested signals into signals/<alias>/.

``winnow score DIR --model PATH --alias NAME --signals logprob,entropy,attention,embedding``.

Per samples shard it writes ``signals/<alias>/part-NNNNN.parquet`` (same part number) with
``sample_id`` and the requested columns, aligned with ``input_ids`` by the position convention
(ARCHITECTURE.md): every list has exactly ``n_tokens`` entries and index ``i`` is ``input_ids[i]`` as a
target, null where nothing was computed (index 0 always; prompt positions unless ``positions=all``):

* ``logprob``  list<float32>  log p(x_i | x_<i)
* ``entropy``  list<float32>  entropy of the distribution predicting position i (nats)
* ``attn_importance`` list<float32>, field metadata ``winnow.anchor=query``: ssToken's attention from
  the query at i to the non-supervised positions before it (:mod:`winnow.kernels.attention_importance`,
  captured from the model by :mod:`.attention_capture`)
* ``embedding`` fixed_size_list<float32>[hidden]: mean of the last hidden state over the sample's tokens

How it stays exact, fast and small: samples are batched by a token budget (:mod:`.batching`, <=10%
padding, no cross-sample attention, per-sample shift), the body runs in eval + ``inference_mode`` with
``use_cache=False``, and the LM head runs only at the positions that need values, in fp32 chunks
(:mod:`.chunked_head`), never materialising full logits. Per-batch work lives in
:mod:`.model_scoring`; the step scaffold it shares with the contrast pass (settings, resolution,
fingerprints, threads, manifest) in :mod:`.pass_step`, the shard loop in :mod:`.pass_runner`.

Measured (benchmarks/bench_model_pass.py, 2 idle cores, fp32, Llama hidden 256 x 4 layers, V=32k,
192 samples of log-normal length 16–1024, 54.5k tokens): 3,589 tokens/s vs 667 for batches of 8 padded
to the longest with full ``log_softmax`` logits (5.4x; 4.2x with ``positions=all``), max RSS 697 MB vs
3,798 MB (0.18x), 7.8% padding vs 61.5%, model FLOP/s 49% of the measured fp32 matmul peak. On the
builtin demo (1,978 samples, 160k tokens, builtin:tiny) all four signals ran at ~23k tokens/s.

Commit fingerprint (:func:`.pass_step.pass_fingerprint`) = hash of the output-affecting parameters
(signals, positions, attention layer, resolved dtype), the weights fingerprint
(:func:`winnow.core.models.weights_fingerprint`) and the passes' code version.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from winnow.core.steps import Step
from winnow.core.store import RunDir
from winnow.stages.passes.model_scoring import read_samples, score_samples, signals_table
from winnow.stages.passes.pass_step import (
    ALIAS_RE,
    CODE_VERSION,
    PassContext,
    PassJob,
    PassSettings,
    run_pass,
)

if TYPE_CHECKING:
    from winnow.core.model_io import LoadedModel

__all__ = ["CODE_VERSION", "SIGNALS", "STEP", "ModelPassParams", "run_model_pass", "score_samples"]

SIGNALS = ("logprob", "entropy", "attention", "embedding")


@dataclass
class ModelPassParams(PassSettings):
    """Parameters of ``winnow score DIR --model PATH --alias NAME`` (``--set key=value`` for the rest)."""

    model: str  # local Hugging Face directory or builtin:<name>
    alias: str = "current"  # output table signals/<alias>/
    signals: list[str] = field(default_factory=lambda: ["logprob", "entropy"])  # any of SIGNALS
    attention_layer: int = -1  # layer for attention importance (-1 = last, as ssToken)

    def __post_init__(self) -> None:
        where = "model_pass"
        if not self.model:
            raise ValueError(f"{where}: model is required (a local Hugging Face directory or builtin:<name>)")
        if not ALIAS_RE.match(self.alias) or self.alias == "contrast":
            raise ValueError(
                f"{where}: alias={self.alias!r} must be letters, digits, '_', '-', '.' (e.g. current, reference) "
                "and not 'contrast' (the contrast pass writes signals/contrast)"
            )
        bad = [s for s in self.signals if s not in SIGNALS]
        if bad or not self.signals:
            raise ValueError(f"{where}: signals={self.signals} must be a non-empty subset of {list(SIGNALS)}")
        self.signals = [s for s in SIGNALS if s in self.signals]  # canonical order, no duplicates
        self.check_settings(where)


def _load(p: ModelPassParams, ctx: PassContext) -> LoadedModel:
    loaded = ctx.load("model")
    if "attention" in p.signals:
        import torch

        from winnow.core.attention_capture import check_attention

        with torch.inference_mode():
            check_attention(loaded.model, loaded.body, p.attention_layer, device=ctx.device, dtype=ctx.dtype)
    return loaded


def _compute(
    p: ModelPassParams, ctx: PassContext, loaded: LoadedModel, tbl: pa.Table, advance: Callable[[int], None]
) -> pa.Table:
    seqs, masks, lengths = read_samples(tbl)
    res = score_samples(
        loaded,
        seqs,
        masks,
        signals=p.signals,
        positions=p.positions,
        token_budget=ctx.token_budget,
        head_chunk=p.head_chunk,
        attention_layer=p.attention_layer,
        advance=advance,
    )
    ctx.info["computed_tokens"] = ctx.info.get("computed_tokens", 0) + res.computed_tokens
    return signals_table(tbl["sample_id"].combine_chunks(), lengths, res, p.signals)


def run_model_pass(run: RunDir, p: ModelPassParams) -> dict[str, Any]:
    """Score every pending samples shard with one model; returns the step's manifest entry."""
    settings = {
        "signals": p.signals,
        "positions": p.positions,
        "attention_layer": p.attention_layer if "attention" in p.signals else None,
    }
    job = PassJob(
        kind="model_pass",
        alias=p.alias,
        models={"model": p.model},
        settings=settings,
        load=lambda ctx: _load(p, ctx),
        compute=lambda ctx, loaded, tbl, advance: _compute(p, ctx, loaded, tbl, advance),
    )
    return run_pass(run, p, job)


STEP = Step(
    name="model_pass",
    params=ModelPassParams,
    run=run_model_pass,
)
