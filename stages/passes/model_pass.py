"""The model pass: one forward of a causal LM over the samples, all requested signals into signals/<alias>/.

``winnow score DIR --model PATH --alias NAME --signals logprob,entropy,attention,embedding``.

Per samples shard it writes ``signals/<alias>/part-NNNNN.parquet`` (same part number) with
``sample_id`` and the requested columns, aligned with ``input_ids`` by the position convention
(ARCHITECTURE.md): every list has exactly ``n_tokens`` entries and index ``i`` is ``input_ids[i]`` as a
target, null where nothing was computed (index 0 always; prompt positions unless ``positions=all``):

* ``logprob``  list<float32>  log p(x_i | x_<i)
* ``entropy``  list<float32>  entropy of the distribution predicting position i (nats)
* ``attn_importance`` list<float32>, field metadata ``winnow.anchor=query``: ssToken's attention from
  the query at i to the non-supervised positions before it (:mod:`winnow.kernels.attention_importance`)
* ``embedding`` fixed_size_list<float32>[hidden]: mean of the last hidden state over the sample's tokens

How it stays exact, fast and small: samples are batched by a token budget (:mod:`.batching`, <=10%
padding, no cross-sample attention, per-sample shift), the body runs in eval + ``inference_mode`` with
``use_cache=False``, and the LM head runs only at the positions that need values, in fp32 chunks
(:mod:`.chunked_head`), never materialising full logits. Per-batch work lives in
:mod:`.model_scoring`, the shard loop (torchrun ranks, skip-if-committed, progress) in :mod:`.pass_runner`.

Measured (benchmarks/bench_model_pass.py, 2 idle cores, fp32, Llama hidden 256 x 4 layers, V=32k,
192 samples of log-normal length 16–1024, 54.5k tokens): 3,589 tokens/s vs 667 for batches of 8 padded
to the longest with full ``log_softmax`` logits (5.4x; 4.2x with ``positions=all``), max RSS 697 MB vs
3,798 MB (0.18x), 7.8% padding vs 61.5%, model FLOP/s 49% of the measured fp32 matmul peak. On the
builtin demo (1,978 samples, 160k tokens, builtin:tiny) all four signals ran at ~23k tokens/s.

Commit fingerprint = hash of the output-affecting parameters (signals, positions, attention layer,
resolved dtype), the weights fingerprint (:func:`.model_io.weights_fingerprint`) and
:data:`CODE_VERSION`. Batching parameters (token budget, head chunk, layout, device, threads) are left
out: they change values only at float-rounding level, and changing them should not recompute a run.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from winnow.pipeline.params import as_dict, build_params, parse_sets
from winnow.pipeline.steps import Step, spec
from winnow.pipeline.store import RunDir, UserError, stable_hash
from winnow.stages.passes.batching import LAYOUTS
from winnow.stages.passes.model_io import (
    check_tokenizer,
    config_fingerprint,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
    weights_fingerprint,
)
from winnow.stages.passes.model_scoring import read_samples, score_samples, signals_table
from winnow.stages.passes.pass_runner import (
    init_distributed,
    pass_entry,
    plan_shards,
    record_pass,
    return_large_blocks_to_os,
    run_shards,
    set_threads,
)

if TYPE_CHECKING:
    import torch

    from winnow.stages.passes.model_io import LoadedModel

CODE_VERSION = "model_pass/1"  # "<step>/<n>" like every step
SIGNALS = ("logprob", "entropy", "attention", "embedding")
POSITIONS = ("supervised", "all")
SAMPLE_COLUMNS = ["sample_id", "input_ids", "loss_mask", "n_tokens"]
_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_common(
    where: str, token_budget: int, head_chunk: int, dtype: str, layout: str, threads: int
) -> None:
    from winnow.stages.passes.model_io import DTYPES

    if token_budget != 0 and token_budget < 16:
        raise ValueError(
            f"{where}: token_budget={token_budget} is too small; use >= 16 (or 0 for the default)"
        )
    if head_chunk < 0:
        raise ValueError(
            f"{where}: head_chunk={head_chunk} must be >= 0 (0 picks ~32 MiB of logits per chunk)"
        )
    if dtype not in DTYPES:
        raise ValueError(f"{where}: dtype={dtype!r} is not one of {list(DTYPES)}")
    if layout not in ("auto", *LAYOUTS):
        raise ValueError(f"{where}: layout={layout!r} is not one of {['auto', *LAYOUTS]}")
    if threads < 0:
        raise ValueError(f"{where}: threads={threads} must be >= 0 (0 = cores / local ranks)")


@dataclass
class ModelPassParams:
    """Parameters of ``winnow score DIR --model PATH --alias NAME`` (``--set key=value`` for the rest)."""

    model: str  # local Hugging Face directory or builtin:<name>
    alias: str = "current"  # output table signals/<alias>/
    signals: list[str] = field(default_factory=lambda: ["logprob", "entropy"])
    positions: str = "supervised"  # supervised | all (targets with a value)
    token_budget: int = 0  # tokens per forward (rows x padded width); 0 = 4096 on CPU, 16384 on GPU
    head_chunk: int = 0  # positions per LM-head chunk; 0 = about 32 MiB of fp32 logits
    attention_layer: int = -1  # layer for attention importance (-1 = last, as ssToken)
    dtype: str = "auto"  # auto = fp32 on CPU, bf16 body on GPU (head always fp32)
    trust_remote_code: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N (torchrun: cuda:LOCAL_RANK)
    layout: str = "auto"  # auto | padded | packed (see winnow.stages.passes.batching)
    threads: int = 0  # CPU threads per rank; 0 = cores / local ranks

    def __post_init__(self) -> None:
        where = "model_pass"
        if not self.model:
            raise ValueError(f"{where}: model is required (a local Hugging Face directory or builtin:<name>)")
        if not _ALIAS_RE.match(self.alias) or self.alias == "contrast":
            raise ValueError(
                f"{where}: alias={self.alias!r} must be letters, digits, '_', '-', '.' (e.g. current, reference) "
                "and not 'contrast' (the contrast pass writes signals/contrast)"
            )
        bad = [s for s in self.signals if s not in SIGNALS]
        if bad or not self.signals:
            raise ValueError(f"{where}: signals={self.signals} must be a non-empty subset of {list(SIGNALS)}")
        self.signals = [s for s in SIGNALS if s in self.signals]  # canonical order, no duplicates
        if self.positions not in POSITIONS:
            raise ValueError(f"{where}: positions={self.positions!r} is not one of {list(POSITIONS)}")
        _check_common(where, self.token_budget, self.head_chunk, self.dtype, self.layout, self.threads)


# ------------------------------------------------------------------------------------- the step
def auto_token_budget(token_budget: int, device: torch.device) -> int:
    """0 -> 4096 tokens on CPU (no faster at 8192 here, and 100+ MB more memory), 16384 on GPU."""
    if token_budget > 0:
        return token_budget
    return 16384 if device.type == "cuda" else 4096


def pass_fingerprint(kind: str, model_fps: dict[str, str], settings: dict[str, Any]) -> str:
    return stable_hash({"step": kind, "code": CODE_VERSION, "models": model_fps, **settings})


def run_model_pass(run: RunDir, p: ModelPassParams) -> dict[str, Any]:
    """Score every pending samples shard with one model; returns the step's manifest entry."""
    t0 = time.time()
    d = init_distributed(p.device)
    try:
        model_dir = resolve_model_dir(p.model)
        check_tokenizer(run, model_dir, p.trust_remote_code)
        device = resolve_device(p.device)
        dtype = resolve_dtype(p.dtype, device)
        mfp = weights_fingerprint(model_dir)
        settings = {
            "signals": p.signals,
            "positions": p.positions,
            "attention_layer": p.attention_layer if "attention" in p.signals else None,
            "dtype": str(dtype),
            "config": config_fingerprint(model_dir),
        }
        fp = pass_fingerprint("model_pass", {"model": mfp}, settings)
        table = f"signals/{p.alias}"
        plan = plan_shards(run, table, fp, d)
        threads = set_threads(p.threads, d) if device.type == "cpu" else None
        if device.type == "cpu":
            return_large_blocks_to_os()
        budget = auto_token_budget(p.token_budget, device)
        info: dict[str, Any] = {}

        def load() -> LoadedModel:
            loaded = load_model(
                model_dir,
                device=device,
                dtype=dtype,
                layout=p.layout,
                trust_remote_code=p.trust_remote_code,
                fingerprint=mfp,
            )
            if "attention" in p.signals:
                import torch

                from winnow.kernels.attention_importance import check_attention

                with torch.inference_mode():
                    check_attention(loaded.model, loaded.body, p.attention_layer, device=device, dtype=dtype)
            info.update(layout=loaded.layout, attn_implementation=loaded.attn_implementation)
            return loaded

        def compute(loaded: LoadedModel, tbl: pa.Table, advance: Callable[[int], None]) -> pa.Table:
            seqs, masks, lengths = read_samples(tbl)
            res = score_samples(
                loaded,
                seqs,
                masks,
                signals=p.signals,
                positions=p.positions,
                token_budget=budget,
                head_chunk=p.head_chunk,
                attention_layer=p.attention_layer,
                advance=advance,
            )
            info["computed_tokens"] = info.get("computed_tokens", 0) + res.computed_tokens
            return signals_table(tbl["sample_id"].combine_chunks(), lengths, res, p.signals)

        extra = {"model_fingerprint": mfp, "model": str(model_dir), "alias": p.alias, "rank": d.rank}
        stats = run_shards(
            run,
            d=d,
            plan=plan,
            out_table=table,
            fingerprint=fp,
            extra=extra,
            columns=SAMPLE_COLUMNS,
            load=load,
            compute=compute,
            label=f"model_pass:{p.alias}",
        )
        infos = [x for x in d.gather(info) if x]
        padded = sum(x.get("computed_tokens", 0) for x in infos)
        entry = {
            "step": "model_pass",
            "alias": p.alias,
            "table": table,
            "model": str(model_dir),
            "model_fingerprint": mfp,
            "fingerprint": fp,
            "config": as_dict(p),
            "device": str(device),
            "dtype": str(dtype),
            "threads": threads,
            "token_budget": budget,
            "world_size": d.world,
            **({k: infos[0][k] for k in ("layout", "attn_implementation")} if infos else {}),
            **pass_entry(stats, plan, t0),
        }
        entry["counts"]["padding_fraction"] = round(1 - stats["tokens"] / padded, 4) if padded else None
        return record_pass(run, d, spec("model_pass").key(p), entry)
    finally:
        d.close()


STEP = Step(
    name="model_pass",
    params=ModelPassParams,
    run=run_model_pass,
)


def main(argv: list[str] | None = None, step: Step = STEP) -> int:
    """``python -m winnow.stages.passes.model_pass RUN_DIR key=value ...`` (torchrun-friendly entry point)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(f"usage: python -m {step.run.__module__} RUN_DIR key=value ...", file=sys.stderr)
        return 2
    try:
        params = build_params(step.params, parse_sets(argv[1:], step.name), where=step.name)
        entry = step.run(RunDir(argv[0]), params)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import os

    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(entry, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
