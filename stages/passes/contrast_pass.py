"""The two-model contrast pass of cDPO (ALGORITHMS.md §4): ``signals/contrast/``.

``winnow score DIR --contrast --positive P --negative N [--beta 1.0]``.

For every target position ``i`` (supervised by default) of every sample, with ``z_pos``/``z_neg`` the
logits of the positive and negative models at position ``i-1``::

    p_ce[i] = softmax((1 + beta) * z_pos - beta * z_neg)[x_i]      (beta = 1: 2 z_pos - z_neg, the paper's)

plus each model's own ``log p(x_i | x_<i)`` (``logprob_pos``, ``logprob_neg``). Critical tokens are the
ones with low ``p_ce`` in rejected responses; the cDPO weight of a rejected token is ``1 - p_ce``.

Both bodies run on the same batch (same batching as the model pass, :mod:`.batching`), and the two
heads are applied together in fp32 chunks at the needed positions only
(:func:`.chunked_head.contrast_scores`): never full logits for a batch. Both models must share the
samples' tokenizer (checked, exit 2 otherwise) and the same vocabulary size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from winnow.pipeline.params import as_dict
from winnow.pipeline.steps import Step, spec
from winnow.pipeline.store import RunDir, UserError
from winnow.stages.passes.model_io import (
    check_tokenizer,
    config_fingerprint,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
    weights_fingerprint,
)
from winnow.stages.passes.model_pass import (
    POSITIONS,
    SAMPLE_COLUMNS,
    _check_common,
    auto_token_budget,
    main,
    pass_fingerprint,
)
from winnow.stages.passes.model_scoring import forward_hidden, gather_targets, list_column, read_samples
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
    from winnow.stages.passes.model_io import LoadedModel

TABLE = "signals/contrast"
OUT_COLUMNS = ("p_ce", "logprob_pos", "logprob_neg")


@dataclass
class ContrastParams:
    """Parameters of ``winnow score DIR --contrast --positive P --negative N``."""

    positive: str  # model trained on correct responses (local dir or builtin:<name>)
    negative: str  # model trained on incorrect responses
    beta: float = 1.0  # contrast strength: (1 + beta) z_pos - beta z_neg
    positions: str = "supervised"  # supervised | all
    token_budget: int = 0  # 0 = 4096 on CPU, 16384 on GPU
    head_chunk: int = 0  # positions per head chunk (two models' logits live at once); 0 = auto
    dtype: str = "auto"
    trust_remote_code: bool = False
    device: str = "auto"
    layout: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        where = "contrast_pass"
        if not self.positive or not self.negative:
            raise ValueError(f"{where}: give both positive and negative models (--positive P --negative N)")
        if not self.beta >= 0:
            raise ValueError(f"{where}: beta={self.beta} must be >= 0 (the paper uses 1.0)")
        if self.positions not in POSITIONS:
            raise ValueError(f"{where}: positions={self.positions!r} is not one of {list(POSITIONS)}")
        _check_common(where, self.token_budget, self.head_chunk, self.dtype, self.layout, self.threads)


def contrast_samples(
    pos: LoadedModel,
    neg: LoadedModel,
    seqs: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    beta: float = 1.0,
    positions: str = "supervised",
    token_budget: int = 4096,
    head_chunk: int = 0,
    advance: Callable[[int], None] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """p_ce, logprob_pos, logprob_neg on the flat token axis of ``seqs`` (+ the computed-position mask)."""
    import torch

    from winnow.kernels.switch import contrast_scores
    from winnow.stages.passes.batching import collate, plan_batches

    lengths = np.array([len(x) for x in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = {c: np.zeros(int(offsets[-1]), np.float32) for c in OUT_COLUMNS}
    valid = np.zeros(int(offsets[-1]), bool)
    with torch.inference_mode():
        for plan in plan_batches(lengths, token_budget, pos.layout):
            col = collate(plan, seqs, pos.layout, pos.device, pos.pad_id)
            src, tgt, dest = gather_targets(col, seqs, masks, positions, offsets)
            if len(src):
                idx = torch.from_numpy(src).to(pos.device)
                h_pos = forward_hidden(pos, col).reshape(-1, pos.hidden_size)[idx]  # (N, d_pos)
                h_neg = forward_hidden(neg, col).reshape(-1, neg.hidden_size)[idx]  # (N, d_neg)
                scores = contrast_scores(
                    pos.head, h_pos, neg.head, h_neg, torch.from_numpy(tgt).to(pos.device), beta, head_chunk
                )
                for c, v in zip(OUT_COLUMNS, scores, strict=True):
                    out[c][dest] = v.cpu().numpy()
                valid[dest] = True
            if advance is not None:
                advance(plan.real_tokens)
    return out, valid


def run_contrast_pass(run: RunDir, p: ContrastParams) -> dict[str, Any]:
    t0 = time.time()
    d = init_distributed(p.device)
    try:
        dirs = {"positive": resolve_model_dir(p.positive), "negative": resolve_model_dir(p.negative)}
        for role, path in dirs.items():
            check_tokenizer(run, path, p.trust_remote_code, what=f"{role} model")
        device = resolve_device(p.device)
        dtype = resolve_dtype(p.dtype, device)
        fps = {role: weights_fingerprint(path) for role, path in dirs.items()}
        settings = {"beta": p.beta, "positions": p.positions, "dtype": str(dtype)}
        settings["config"] = {role: config_fingerprint(path) for role, path in dirs.items()}
        fp = pass_fingerprint("contrast_pass", fps, settings)
        plan = plan_shards(run, TABLE, fp, d)
        threads = set_threads(p.threads, d) if device.type == "cpu" else None
        if device.type == "cpu":
            return_large_blocks_to_os()
        budget = auto_token_budget(p.token_budget, device)

        def load() -> tuple[LoadedModel, LoadedModel]:
            pair = tuple(
                load_model(
                    dirs[r],
                    device=device,
                    dtype=dtype,
                    layout=p.layout,
                    trust_remote_code=p.trust_remote_code,
                    fingerprint=fps[r],
                )
                for r in ("positive", "negative")
            )
            if pair[0].head.vocab_size != pair[1].head.vocab_size:
                raise UserError(
                    f"positive and negative models have different vocabularies ({pair[0].head.vocab_size} vs "
                    f"{pair[1].head.vocab_size}); the contrast needs one token space"
                )
            if pair[0].layout != pair[1].layout:  # one batch feeds both bodies
                raise UserError(
                    "positive and negative models need the same attention layout; set layout=padded"
                )
            return pair  # type: ignore[return-value]

        def compute(pair, tbl: pa.Table, advance: Callable[[int], None]) -> pa.Table:
            seqs, masks, lengths = read_samples(tbl)
            vals, valid = contrast_samples(
                pair[0],
                pair[1],
                seqs,
                masks,
                beta=p.beta,
                positions=p.positions,
                token_budget=budget,
                head_chunk=p.head_chunk,
                advance=advance,
            )
            cols = {"sample_id": tbl["sample_id"].combine_chunks()}
            cols |= {c: list_column(vals[c], valid, lengths) for c in OUT_COLUMNS}
            return pa.table(cols)

        extra = {
            "model_fingerprint": fps,
            "model": {r: str(path) for r, path in dirs.items()},
            "alias": "contrast",
            "beta": p.beta,
            "rank": d.rank,
        }
        stats = run_shards(
            run,
            d=d,
            plan=plan,
            out_table=TABLE,
            fingerprint=fp,
            extra=extra,
            columns=SAMPLE_COLUMNS,
            load=load,
            compute=compute,
            label="model_pass:contrast",
        )
        entry = {
            "step": "contrast_pass",
            "alias": "contrast",
            "table": TABLE,
            "model": {r: str(path) for r, path in dirs.items()},
            "model_fingerprint": fps,
            "fingerprint": fp,
            "config": as_dict(p),
            "device": str(device),
            "dtype": str(dtype),
            "threads": threads,
            "world_size": d.world,
            **pass_entry(stats, plan, t0),
        }
        return record_pass(run, d, spec("contrast_pass").key(p), entry)
    finally:
        d.close()


STEP = Step(
    name="contrast_pass",
    params=ContrastParams,
    run=run_contrast_pass,
)


if __name__ == "__main__":
    import sys

    sys.exit(main(step=STEP))
