"""Synthetic runs for stage tests: commit a samples shard or a ``signals/<alias>`` shard by hand, so a
stage can be tried without a tokenizer or a model (moved out of the package: only tests use them)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from winnow.pipeline.store import RunDir, UserError, part_name, stable_hash

SAMPLES = "samples"


def write_signals(
    run: RunDir,
    alias: str,
    part: int,
    sample_ids: list[str],
    columns: dict[str, list[list[float | None] | None]],
    *,
    model_fingerprint: str | None = None,
    model: str | None = None,
    attn_anchor: str = "query",
) -> None:
    """Commit one ``signals/<alias>`` shard computed outside winnow (or by hand, in tests).

    Lists must be aligned with the samples' ``input_ids`` (index i = token i as a target), with
    None where there is no value.
    """
    fields = [pa.field("sample_id", pa.string())]
    arrays: list[pa.Array] = [pa.array(sample_ids, type=pa.string())]
    for name, lists in columns.items():
        meta = {b"winnow.anchor": attn_anchor.encode()} if name == "attn_importance" else None
        fields.append(pa.field(name, pa.list_(pa.float32()), metadata=meta))
        arrays.append(pa.array(lists, type=pa.list_(pa.float32())))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    extra = {"model_fingerprint": model_fingerprint, "model": model}
    digest = run.table(SAMPLES).part_digest(part)
    if digest is None:
        raise UserError(
            f"samples/{part_name(part)} is not committed in {run.root}; signals follow samples shards"
        )
    run.table(f"signals/{alias}").write(
        part,
        table,
        fingerprint=stable_hash({"external": alias, "model": model_fingerprint}),
        inputs={f"{SAMPLES}/{part_name(part)}": digest},
        extra={k: v for k, v in extra.items() if v is not None},
    )


def write_synthetic_samples(
    run: RunDir,
    part: int,
    rows: list[dict[str, Any]],
) -> list[str]:
    """Commit a minimal samples shard from ``{"input_ids": [...], "loss_mask": [...], "meta_x": ...}`` rows.

    For tests and experiments that exercise a stage without ingesting text: the text columns are
    placeholders, ``sample_id`` is taken from the row or made from ``part`` and the row number.
    Returns the sample ids.
    """
    ids = [str(r.get("sample_id") or f"s{part:03d}-{i:04d}") for i, r in enumerate(rows)]
    n_tokens = [len(r["input_ids"]) for r in rows]
    for r, n in zip(rows, n_tokens, strict=True):
        if len(r["loss_mask"]) != n:
            raise ValueError(f"loss_mask has {len(r['loss_mask'])} entries for {n} input_ids")
    data: dict[str, pa.Array] = {
        "sample_id": pa.array(ids, type=pa.string()),
        "source": pa.array(["synthetic"] * len(rows), type=pa.string()),
        "row": pa.array(range(len(rows)), type=pa.int64()),
        "messages": pa.array(["[]"] * len(rows), type=pa.string()),
        "text": pa.array([""] * len(rows), type=pa.string()),
        "input_ids": pa.array([r["input_ids"] for r in rows], type=pa.list_(pa.int32())),
        "offsets": pa.array([[0] * n for n in n_tokens], type=pa.list_(pa.int32())),
        "loss_mask": pa.array([r["loss_mask"] for r in rows], type=pa.list_(pa.uint8())),
        "n_tokens": pa.array(n_tokens, type=pa.int32()),
        "n_loss_tokens": pa.array([int(sum(r["loss_mask"])) for r in rows], type=pa.int32()),
    }
    meta_keys = sorted({k for r in rows for k in r if k.startswith("meta_")})
    for key in meta_keys:
        data[key] = pa.array([r.get(key) for r in rows])
    run.table(SAMPLES).write(part, pa.table(data), fingerprint="synthetic", inputs={})
    return ids


def decimal_count(ratio: float, n: int, rounding: str) -> int:
    """``ratio * n`` rounded in exact decimal arithmetic: an expected count computed independently of the
    float arithmetic in ``winnow.stages.topk``. The ratio is taken as written (``repr``: 0.29 is 29/100)
    and, as the counting spec says, within 1e-9 of the rounding boundary counts as on it (0.9999999999999999
    of 10 is 10). ``rounding``: a :mod:`decimal` mode, ``ROUND_FLOOR``, ``ROUND_CEILING`` or ``ROUND_HALF_UP``.
    """
    import decimal

    tol = decimal.Decimal("1e-9")
    x = decimal.Decimal(repr(ratio)) * n + (-tol if rounding == "ROUND_CEILING" else tol)
    return int(x.quantize(decimal.Decimal(1), rounding=getattr(decimal, rounding)))
