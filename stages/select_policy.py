"""Selection policies (`winnow select DIR POLICY`): scores in, a keep flag per sample and a weight per
token out, into ``selection/<name>/`` — the table a trainer consumes.

A policy has two halves, chosen separately so that methods combine:

* **which samples** (``POLICY``): ``eu_plane`` (Q-Tuning's quadrants: the stage's ``keep``),
  ``critical_tokens`` (cDPO for SFT: keep the samples labelled correct), ``dv4llm`` (GOT-D: the
  ``selected`` candidates, plus the target samples unless ``keep_targets=false``), ``excess_loss`` and
  ``sstoken`` (token-level methods: every sample), ``all``, or ``sql`` (``--set keep="<DuckDB boolean
  expression over the samples view>"``; subqueries reach every other view, e.g. ``sample_id in
  (select sample_id from scores_eu_plane where keep)``). The reason recorded for each sample is the
  scoring stage's own (``kept_q2``, ``dropped_q1``, ``incorrect``, ...) or the policy's
  (``selected``, ``not_selected``, ``target``, ``sql_keep``, ``sql_drop``, ``all``).
* **which tokens** (``tokens``): the policy's own by default — the ``token_keep`` of eu_plane,
  excess_loss or sstoken, all supervised tokens otherwise — or any of ``loss_mask`` (every
  supervised token), ``eu_plane`` / ``excess_loss`` / ``sstoken`` (that stage's ``token_keep``) or
  ``p_ce`` (cDPO's chosen-side weight, ``scores/critical_tokens.token_score``, on correct samples).
  ``winnow select RUN critical_tokens --set tokens=excess_loss`` drops wrong answers and trains on
  Rho-1's tokens of the rest.

``token_weight[i]`` is 0 wherever ``loss_mask[i] == 0``, on dropped samples, and on tokens the
token half did not select; a kept sample whose weights all come out 0 is dropped with reason
``no_token_weight`` (nothing left to train on). Output columns: ``sample_id``, ``keep``, ``reason``,
``policy``, ``n_supervised``, ``n_weighted`` (tokens with weight > 0), ``weight_sum`` and
``token_weight`` (list<float32>, ``n_tokens`` entries). Every sample of ``samples/`` has a row.

Freshness: the output records whole-table digests of every table the policy read (a SQL policy reads
the whole run), so a changed score reselects everything; an unchanged rerun writes nothing.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from winnow.pipeline.steps import Step
from winnow.pipeline.store import RunDir, UserError
from winnow.stages import stage_io as io

CODE_VERSION = "select/1"
POLICIES = ("eu_plane", "excess_loss", "sstoken", "critical_tokens", "dv4llm", "all", "sql")
TOKEN_SOURCES = ("loss_mask", "eu_plane", "excess_loss", "sstoken", "p_ce")
_DEFAULT_TOKENS = {"eu_plane": "eu_plane", "excess_loss": "excess_loss", "sstoken": "sstoken"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class SelectParams:
    policy: str
    name: str = ""  # selection/<name>/; default: the policy's name
    tokens: str = ""  # "" = the policy's own token half; else one of TOKEN_SOURCES
    keep: str = ""  # policy=sql: a DuckDB boolean expression over the samples view
    keep_targets: bool = True  # policy=dv4llm: keep the target samples too

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; policies: {list(POLICIES)}")
        if self.tokens and self.tokens not in TOKEN_SOURCES:
            raise ValueError(f"tokens={self.tokens!r}: use one of {list(TOKEN_SOURCES)} (or leave it unset)")
        if (self.policy == "sql") != bool(self.keep):
            raise ValueError(
                'policy sql needs --set keep="<boolean SQL over samples>"; other policies take no keep='
            )
        self.name = self.name or self.policy
        if not _NAME_RE.match(self.name):
            raise ValueError(f"name={self.name!r}: use letters, digits, '_', '-' or '.'")

    @property
    def token_source(self) -> str:
        return self.tokens or _DEFAULT_TOKENS.get(self.policy, "loss_mask")


def _score_table(run: RunDir, stage: str, columns: list[str]) -> dict[str, dict]:
    """sample_id -> {column: value} of ``scores/<stage>``, refusing a missing or stale table."""
    table = run.table(f"scores/{stage}")
    stale = run.stale_tables().get(f"scores/{stage}")
    if stale:
        raise UserError(f"scores/{stage} is stale ({stale[0]}): rerun `winnow score {run.root} {stage}`")
    data = table.read(columns=["sample_id", *columns]).to_pydict()
    return {sid: {c: data[c][i] for c in columns} for i, sid in enumerate(data["sample_id"])}


def _sample_half(run: RunDir, p: SelectParams, ids: list[str]) -> tuple[dict[str, bool], dict[str, str]]:
    if p.policy == "all" or p.policy in ("excess_loss", "sstoken"):
        reason = "all" if p.policy == "all" else "token_level"
        return dict.fromkeys(ids, True), dict.fromkeys(ids, reason)
    if p.policy == "sql":
        return _sql_keep(run, p.keep, ids)
    if p.policy == "dv4llm":
        rows = _score_table(run, "dv4llm", ["role", "selected"])
        keep, why = {}, {}
        for sid in ids:
            r = rows.get(sid)
            if r is None:
                keep[sid], why[sid] = False, "unscored"
            elif r["role"] == "target":
                keep[sid], why[sid] = p.keep_targets, "target" if p.keep_targets else "target_excluded"
            else:
                keep[sid], why[sid] = bool(r["selected"]), "selected" if r["selected"] else "not_selected"
        return keep, why
    rows = _score_table(run, p.policy, ["keep", "reason"])  # eu_plane, critical_tokens
    keep = {sid: bool(rows.get(sid, {}).get("keep")) for sid in ids}
    why = {sid: (rows[sid]["reason"] if sid in rows else "unscored") for sid in ids}
    return keep, why


def _sql_keep(run: RunDir, expr: str, ids: list[str]) -> tuple[dict[str, bool], dict[str, str]]:
    from winnow.pipeline.inspect_run import open_views

    con = open_views(str(run.root), check_lengths=False).con
    try:
        got = dict(con.sql(f"SELECT sample_id, coalesce(({expr}), false) FROM samples").fetchall())
    except Exception as e:  # duckdb raises many error classes; all mean the expression is wrong
        raise UserError(f"keep={expr!r}: bad SQL condition over samples ({e})") from None
    keep = {sid: bool(got.get(sid, False)) for sid in ids}
    return keep, {sid: "sql_keep" if k else "sql_drop" for sid, k in keep.items()}


def _token_half(run: RunDir, source: str) -> dict[str, list] | None:
    """sample_id -> per-token selection (bools, or p_CE weights); None means every supervised token."""
    if source == "loss_mask":
        return None
    if source == "p_ce":
        rows = _score_table(run, "critical_tokens", ["token_score", "is_correct"])
        return {sid: (r["token_score"] if r["is_correct"] else None) for sid, r in rows.items()}
    rows = _score_table(run, source, ["token_keep"])
    return {sid: r["token_keep"] for sid, r in rows.items()}


def token_weights(loss_mask: np.ndarray, keep: bool, selected: list | None, use_all: bool) -> np.ndarray:
    """float32 weights for one sample: loss_mask x the token half's selection (null selects nothing)."""
    w = loss_mask.astype(np.float32)
    if not keep:
        return np.zeros_like(w)
    if use_all:
        return w
    if selected is None:
        return np.zeros_like(w)
    sel = np.array([0.0 if v is None else float(v) for v in selected], dtype=np.float32)
    assert len(sel) == len(w), "per-token list length differs from n_tokens"
    return w * sel


def run_select(run: RunDir, p: SelectParams) -> dict:
    started = time.time()
    samples = run.table(io.SAMPLES)
    if not samples.exists():
        raise UserError(f"{run.root} has no samples: run `winnow ingest` first")
    parts = [r.part for r in samples.records()]
    source = p.token_source
    read = set()
    if p.policy in ("eu_plane", "critical_tokens", "dv4llm"):
        read.add(p.policy)
    if source != "loss_mask":
        read.add("critical_tokens" if source == "p_ce" else source)
    for stage in sorted(read):
        if not run.table(f"scores/{stage}").exists():
            raise UserError(f"{run.root} has no scores/{stage}: run `winnow score {run.root} {stage}` first")
    tables = {f"scores/{stage}" for stage in read}
    if p.policy == "sql":  # the expression may read any view
        tables |= {t for t in run.tables() if not t.startswith("selection/")}
    st = io.StageOutput(
        run, "select", p, CODE_VERSION, started, table=f"selection/{p.name}", key=f"select:{p.name}"
    )
    inputs = io.table_inputs(run, sorted({io.SAMPLES, *tables}))
    io.drop_orphans(st.out, parts)
    counts: dict = {}
    if not io.all_fresh(st.out, parts, st.fp, inputs):
        ids = samples.read(columns=["sample_id"]).column("sample_id").to_pylist()
        keep, why = _sample_half(run, p, ids)
        selected = _token_half(run, source)
        kept = weighted = 0
        for part in parts:
            cols = samples.read_part(part, columns=["sample_id", "loss_mask"]).to_pydict()
            rows = {k: [] for k in ("keep", "reason", "n_supervised", "n_weighted", "weight_sum", "w")}
            for sid, mask in zip(cols["sample_id"], cols["loss_mask"], strict=True):
                sel = None if selected is None else selected.get(sid)
                w = token_weights(np.asarray(mask), keep[sid], sel, selected is None)
                k, r = keep[sid], why[sid]
                if k and not w.any():
                    k, r = False, "no_token_weight"
                rows["keep"].append(k)
                rows["reason"].append(r)
                rows["n_supervised"].append(int(np.sum(mask)))
                rows["n_weighted"].append(int((w > 0).sum()))
                rows["weight_sum"].append(float(w.sum(dtype=np.float64)))
                rows["w"].append(w)
                kept += k
                weighted += int((w > 0).sum())
            table = pa.table(
                {
                    "sample_id": pa.array(cols["sample_id"], pa.string()),
                    "keep": pa.array(rows["keep"], pa.bool_()),
                    "reason": pa.array(rows["reason"], pa.string()),
                    "policy": pa.array([p.policy] * len(rows["keep"]), pa.string()),
                    "n_supervised": pa.array(rows["n_supervised"], pa.int32()),
                    "n_weighted": pa.array(rows["n_weighted"], pa.int32()),
                    "weight_sum": pa.array(rows["weight_sum"], pa.float64()),
                    "token_weight": pa.array([w.tolist() for w in rows["w"]], pa.list_(pa.float32())),
                }
            )
            st.commit(part, table, inputs)
        counts = {"samples": len(ids), "kept": kept, "dropped": len(ids) - kept, "weighted_tokens": weighted}
    return st.finish(len(parts), counts)


STEP = Step(
    name="select",
    params=SelectParams,
    run=run_select,
    key=lambda p: f"select:{p.name or p.policy}",
    help="selection policy: scores -> keep per sample + token_weight per token in selection/<name>/",
)
