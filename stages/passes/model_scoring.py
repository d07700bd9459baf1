"""Per-batch scoring for model passes: batches in, per-token signal arrays on a shard's token axis out.

:func:`score_samples` is the engine of :mod:`winnow.stages.passes.model_pass` (and its helpers are shared by
:mod:`winnow.stages.passes.contrast_pass`): it plans batches (:mod:`.batching`), runs the body once per batch
in ``inference_mode`` with ``use_cache=False``, shifts per sample (:func:`gather_targets`: the state at
``i - 1`` predicts token ``i``, never across samples), applies the chunked fp32 head
(:mod:`.chunked_head`) at those positions only, recomputes attention importance from the captured
layer input (:mod:`.attention_capture`) and averages the last hidden state per sample. Values land
in flat arrays over the shard's tokens with a validity mask, which become Arrow lists with exactly
``n_tokens`` entries and nulls where nothing was computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from winnow.core.errors import UserError

if TYPE_CHECKING:
    import torch

    from winnow.core.layout import Collated
    from winnow.core.model_io import LoadedModel

COLUMNS = {
    "logprob": "logprob",
    "entropy": "entropy",
    "attention": "attn_importance",
    "embedding": "embedding",
}
QUERY_ANCHOR = {b"winnow.anchor": b"query"}


def split_lists(column: pa.ChunkedArray | pa.Array, dtype: Any) -> list[np.ndarray]:
    """A list<int> column -> one numpy array per row (views into one buffer)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


def target_positions(mask: np.ndarray, positions: str) -> np.ndarray:
    """Indices i >= 1 that get a value: supervised targets (loss_mask[i] == 1) or every target."""
    if positions == "all":
        return np.arange(1, len(mask), dtype=np.int64)
    return np.flatnonzero(np.asarray(mask[1:]) != 0).astype(np.int64) + 1


def gather_targets(
    col: Collated,
    seqs: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    positions: str,
    offsets: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample shift: for each target ``i`` of each sample, the flat index of the hidden state that
    predicts it (``start + i - 1``, always inside the same sample), the target id, and the index of
    ``i`` in the shard's flat token axis (``offsets[sample] + i``)."""
    src, tgt, dest = [], [], []
    for k, s in enumerate(col.samples):
        idx = target_positions(masks[s], positions)
        src.append(col.starts[k] + idx - 1)
        tgt.append(np.asarray(seqs[s])[idx])
        dest.append(offsets[s] + idx)
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return cat(src, np.int64), cat(tgt, np.int64), cat(dest, np.int64)


def forward_hidden(loaded: LoadedModel, col: Collated, use_cache: bool = False) -> torch.Tensor:
    """Last hidden states (R, W, d) of the body. ``use_cache`` exists only so a test can show the
    trap it avoids: with a cache transformers drops the packed-sample mask."""
    kwargs = {"position_ids": col.position_ids} if col.layout == "packed" else {}
    return loaded.body(input_ids=col.input_ids, use_cache=use_cache, **kwargs).last_hidden_state


@dataclass
class ShardSignals:
    """Per-token values on the shard's flat token axis (``valid`` marks computed positions) + embeddings."""

    values: dict[str, np.ndarray]
    valid: np.ndarray
    embedding: np.ndarray | None = None
    computed_tokens: int = 0


def _attention(capture, col: Collated, src: np.ndarray, masks, lengths: np.ndarray, n_flat: int, device):
    """Attention importance of the captured layer: prompt tokens as keys, each target's query itself."""
    import torch

    from winnow.core.attention_capture import attention_importance

    keys = np.zeros(n_flat, bool)
    queries = np.zeros(n_flat, bool)
    queries[src + 1] = True  # the query at target position i itself (query-anchored)
    for k, s in enumerate(col.samples):
        keys[col.starts[k] : col.starts[k] + lengths[s]] = np.asarray(masks[s]) == 0
    shape = col.input_ids.shape
    return attention_importance(
        capture.module,
        capture.hidden,
        capture.position_embeddings,
        col.segment,
        torch.from_numpy(keys).to(device).view(shape),
        torch.from_numpy(queries).to(device).view(shape),
    )


def _mean_hidden(col: Collated, flat, device) -> np.ndarray:
    """Each sample's mean last hidden state (its embedding), float32."""
    import torch

    seg = col.segment.reshape(-1)
    real = seg >= 0
    sums = torch.zeros(len(col.samples), flat.shape[1], dtype=torch.float32, device=device)
    sums.index_add_(0, seg[real], flat[real].float())
    counts = torch.from_numpy(col.lengths.clip(min=1)).to(device, torch.float32)
    return (sums / counts[:, None]).cpu().numpy()


def score_samples(
    loaded: LoadedModel,
    seqs: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    signals: Sequence[str],
    positions: str = "supervised",
    token_budget: int = 4096,
    head_chunk: int = 0,
    attention_layer: int = -1,
    advance: Callable[[int], None] | None = None,
    use_cache: bool = False,
) -> ShardSignals:
    """Every requested signal for a list of samples (token ids + loss masks)."""
    import torch

    from winnow.core.attention_capture import AttentionCapture
    from winnow.core.layout import collate, plan_batches
    from winnow.kernels.switch import logprob_entropy

    lengths = np.array([len(x) for x in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    per_token = [s for s in ("logprob", "entropy", "attention") if s in signals]
    out = ShardSignals({s: np.zeros(total, np.float32) for s in per_token}, np.zeros(total, bool))
    d = loaded.hidden_size
    out.embedding = np.zeros((len(seqs), d), np.float32) if "embedding" in signals else None
    head_needed = "logprob" in signals or "entropy" in signals
    capture = AttentionCapture(loaded.body, attention_layer) if "attention" in signals else None
    with torch.inference_mode(), capture or contextlib.nullcontext():
        for plan in plan_batches(lengths, token_budget, loaded.layout):
            col = collate(plan, seqs, loaded.layout, loaded.device, loaded.pad_id)
            hidden = forward_hidden(loaded, col, use_cache=use_cache)  # (R, W, d)
            flat = hidden.reshape(-1, d)
            src, tgt, dest = gather_targets(col, seqs, masks, positions, offsets)
            out.valid[dest] = True
            src_t = torch.from_numpy(src).to(loaded.device)
            if head_needed and len(src):
                lp, ent = logprob_entropy(
                    loaded.head,
                    flat[src_t],
                    torch.from_numpy(tgt).to(loaded.device),
                    head_chunk,
                    entropy="entropy" in signals,
                )
                if "logprob" in signals:
                    out.values["logprob"][dest] = lp.cpu().numpy()
                if ent is not None:
                    out.values["entropy"][dest] = ent.cpu().numpy()
            if capture is not None and len(src):
                imp = _attention(capture, col, src, masks, lengths, flat.shape[0], loaded.device)
                out.values["attention"][dest] = imp.reshape(-1)[src_t + 1].cpu().numpy()
                capture.release()
            if out.embedding is not None:
                out.embedding[col.samples] = _mean_hidden(col, flat, loaded.device)
            out.computed_tokens += plan.computed_tokens
            del hidden, flat
            if advance is not None:
                advance(plan.real_tokens)
    return out


def list_column(values: np.ndarray, valid: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32(), mask=~valid))


def signals_table(
    sample_ids: pa.Array, lengths: np.ndarray, res: ShardSignals, signals: Sequence[str]
) -> pa.Table:
    cols: list[pa.Array] = [sample_ids]
    fields = [pa.field("sample_id", pa.string())]
    for s in ("logprob", "entropy", "attention"):
        if s in signals:
            cols.append(list_column(res.values[s], res.valid, lengths))
            meta = QUERY_ANCHOR if s == "attention" else None
            fields.append(pa.field(COLUMNS[s], pa.list_(pa.float32()), metadata=meta))
    if "embedding" in signals and res.embedding is not None:
        d = res.embedding.shape[1]
        flat = pa.array(res.embedding.reshape(-1), type=pa.float32())
        cols.append(pa.FixedSizeListArray.from_arrays(flat, d, mask=pa.array(lengths == 0)))
        fields.append(pa.field("embedding", pa.list_(pa.float32(), d)))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def read_samples(tbl: pa.Table) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    seqs = split_lists(tbl["input_ids"], np.int64)
    masks = split_lists(tbl["loss_mask"], np.uint8)
    lengths = np.array([len(x) for x in seqs], dtype=np.int64)
    n_tokens = tbl["n_tokens"].to_numpy()
    bad = np.flatnonzero(lengths != n_tokens)
    if len(bad) or any(len(m) != len(x) for m, x in zip(masks, seqs, strict=True)):
        raise UserError("samples table is inconsistent: n_tokens / loss_mask lengths differ from input_ids")
    return seqs, masks, lengths
