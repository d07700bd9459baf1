"""DV4LLM / GOT-D distribution nudging as a stage: `winnow score RUN dv4llm --targets ...`.

Selects the candidates whose added mass most lowers the entropic OT distance to a target set
(ALGORITHMS.md §5): one Sinkhorn solve between target and candidate embeddings
(:mod:`winnow.kernels.sinkhorn`), then the candidates with the most negative calibrated gradient
``g_j - mean_{k != j} g_k`` (same order as the raw potential ``g``).

Targets are either a file of target-task texts, ingested into the run's ``targets/`` table with the
samples' tokenizer, or ``sql:<condition>`` over the samples table, in which case those samples
are the targets and are excluded from the candidates. Embeddings: ``tfidf`` (TF-IDF + TruncatedSVD,
no model; the default), ``minilm`` or a local model directory (mean-pooled, L2-normalised), or
``signals:<alias>`` (the mean-pooled hidden states of a model pass; SQL targets only, since a
targets file has no model pass of its own).

Output ``scores/dv4llm/`` per samples shard: ``role`` (target/candidate), ``potential`` (g_j),
``calibrated_gradient``, ``rank`` (0 = most negative) and ``selected``. The solve is global, so
every shard records the whole samples (and targets) table as its input and all shards are
recomputed when either changes. The absolute ε and the solver's convergence go in the manifest.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from winnow.pipeline.steps import Step
from winnow.pipeline.store import RunDir, UserError
from winnow.stages import stage_io as io
from winnow.stages import topk

CODE_VERSION = "dv4llm/1"


@dataclass
class DV4LLMParams:
    targets: str = ""  # a file of target texts, or "sql:<condition over samples>"
    embedding: str = "tfidf"  # tfidf | minilm | <local model dir> | signals:<alias>
    dim: int = 256  # TF-IDF SVD dimension
    budget: float = 0.5  # <= 1: fraction of candidates selected; > 1: a count
    eps_rel: float = 0.05  # entropic regularisation relative to the mean cost
    tol: float = 1e-3  # stop when the L1 marginal error is below this
    max_iter: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: give a target-text file or sql:<condition over samples>")
        if self.budget <= 0:
            raise ValueError(f"budget={self.budget}: use a fraction in (0, 1] or a count > 1")
        if self.eps_rel <= 0 or self.tol <= 0 or self.max_iter < 1 or self.dim < 2:
            raise ValueError("eps_rel and tol must be > 0, max_iter >= 1, dim >= 2")


def _content_text(messages_json: str) -> str:
    return "\n".join(m["content"] for m in json.loads(messages_json))


def condition_rows(run: RunDir, query: str, what: str) -> list[tuple]:
    """Rows of ``query`` over the run's views, where ``query`` embeds a user's SQL condition ``what``.

    Only DuckDB parser and binder errors mean the condition is wrong; a table the views hide as stale
    (catalog error) is reported as such, and IO errors (a corrupt Parquet shard) propagate unchanged.
    """
    import duckdb

    from winnow.pipeline.inspect_run import check_read_only, open_views

    try:  # the condition is pasted into ``query``: `1=1; COPY ... TO` must not run
        check_read_only(query)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None
    views = open_views(str(run.root), check_lengths=False)
    try:
        return views.con.sql(query).fetchall()
    except (duckdb.ParserException, duckdb.BinderException) as e:
        raise UserError(f"{what}: bad SQL condition ({e})") from None
    except duckdb.CatalogException as e:
        hidden = "; ".join(views.warnings) or "no table was hidden"
        raise UserError(f"{what}: {e} ({hidden})") from None


def _sql_targets(run: RunDir, condition: str) -> set[str]:
    rows = condition_rows(
        run, f"select sample_id from samples where {condition}", f"dv4llm targets {condition!r}"
    )
    if not rows:
        raise UserError(f"dv4llm targets: no sample matches {condition!r}")
    return {r[0] for r in rows}


def _ingest_targets(run: RunDir, path: str) -> list[str]:
    from winnow.pipeline.ingest import STEP as INGEST
    from winnow.pipeline.ingest import IngestParams

    model = run.table("samples").schema().metadata.get(b"winnow.model", b"").decode()
    INGEST.run(run, IngestParams(inputs=[path], model=model, table="targets"))
    return [
        _content_text(m)
        for m in run.table("targets").read(columns=["messages"]).column("messages").to_pylist()
    ]


def _embed(run: RunDir, p: DV4LLMParams, target_texts, cand_texts, target_ids, cand_ids):
    if p.embedding.startswith("signals:"):
        alias = p.embedding.split(":", 1)[1]
        table = run.table(f"signals/{alias}")
        if not table.exists():
            raise UserError(
                f"dv4llm: no signals/{alias}; run `winnow score RUN --model M --alias {alias} "
                "--signals embedding` first"
            )
        if target_texts is None:
            raise UserError(
                "dv4llm: embedding=signals:<alias> needs sql: targets (a targets file has no model pass)"
            )
        sig = table.read(columns=["sample_id", "embedding"]).to_pydict()
        emb = dict(zip(sig["sample_id"], sig["embedding"], strict=True))
        missing = [s for s in [*target_ids, *cand_ids] if emb.get(s) is None]
        if missing:
            raise UserError(f"dv4llm: {len(missing)} samples lack signals/{alias}.embedding (rerun the pass)")
        return (
            np.asarray([emb[s] for s in target_ids], np.float32),
            np.asarray([emb[s] for s in cand_ids], np.float32),
        )
    from winnow.stages.text_embeddings import embed_texts

    kw = {"dim": p.dim, "seed": p.seed} if p.embedding == "tfidf" else {}
    return embed_texts(target_texts, cand_texts, method=p.embedding, **kw)


def run_dv4llm(run: RunDir, p: DV4LLMParams) -> dict[str, Any]:
    from winnow.kernels.sinkhorn import calibrated_gradient, sinkhorn_potentials

    t0 = time.time()
    samples = run.table("samples")
    if not samples.exists():
        raise UserError(f"{run.root} has no samples: run `winnow ingest` first")
    sql = p.targets.startswith("sql:")
    target_texts = None if sql else _ingest_targets(run, p.targets)
    inputs = {"samples": samples.digest()}
    if not sql:
        inputs["targets"] = run.table("targets").digest()
    st = io.StageOutput(run, "dv4llm", p, CODE_VERSION, t0)
    recs = samples.records()
    parts = [r.part for r in recs]
    io.drop_orphans(st.out, parts)
    if io.all_fresh(st.out, parts, st.fp, inputs):
        return st.finish(len(parts))  # the ranking spans every shard: all fresh or all redone

    cols = samples.read(columns=["sample_id", "messages"]).to_pydict()
    ids, texts = cols["sample_id"], [_content_text(m) for m in cols["messages"]]
    is_target = _sql_targets(run, p.targets[4:]) if sql else set()
    cand_idx = [i for i, s in enumerate(ids) if s not in is_target]
    if not cand_idx:
        raise UserError("dv4llm: every sample is a target; nothing left to select from")
    if sql:
        target_texts = [texts[i] for i, s in enumerate(ids) if s in is_target]
    target_ids = [s for s in ids if s in is_target]
    x, y = _embed(run, p, target_texts, [texts[i] for i in cand_idx], target_ids, [ids[i] for i in cand_idx])
    res = sinkhorn_potentials(x, y, eps_rel=p.eps_rel, tol=p.tol, max_iter=p.max_iter, seed=p.seed)
    g = res.g.double().cpu()
    grad = calibrated_gradient(g).numpy()
    order = np.argsort(grad, kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    n_sel = topk.round_count(p.budget, len(cand_idx)) if p.budget <= 1 else min(int(p.budget), len(cand_idx))
    by_id = {
        ids[i]: (float(g[j]), float(grad[j]), int(rank[j]), bool(rank[j] < n_sel))
        for j, i in enumerate(cand_idx)
    }

    for rec in recs:
        part_ids = samples.read_part(rec.part, columns=["sample_id"]).column("sample_id").to_pylist()
        vals = [by_id.get(s) for s in part_ids]
        tbl = pa.table(
            {
                "sample_id": pa.array(part_ids, pa.string()),
                "role": pa.array(["candidate" if v else "target" for v in vals], pa.string()),
                "potential": pa.array([v[0] if v else None for v in vals], pa.float32()),
                "calibrated_gradient": pa.array([v[1] if v else None for v in vals], pa.float32()),
                "rank": pa.array([v[2] if v else None for v in vals], pa.int64()),
                "selected": pa.array([v[3] if v else False for v in vals], pa.bool_()),
            }
        )
        st.commit(rec.part, tbl, inputs)
    counts = {"targets": len(x), "candidates": len(cand_idx), "selected": n_sel, "solver": res.summary()}
    return st.finish(len(parts), counts)


STEP = Step(
    name="dv4llm",
    params=DV4LLMParams,
    run=run_dv4llm,
)
