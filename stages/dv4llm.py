"""DV4LLM / GOT-D distribution nudging as a stage: `winnow score RUN dv4llm --targets ...`.

Selects the candidates whose added mass most lowers the entropic OT distance to a target set
(ALGORITHMS.md §5): one Sinkhorn solve between target and candidate embeddings
(:mod:`winnow.kernels.sinkhorn`), then the candidates with the most negative calibrated gradient
``g_j - mean_{k != j} g_k`` (same order as the raw potential ``g``).

Targets are either a file of target-task texts, ingested into the run's ``targets/`` table with the
samples' tokenizer by the ``ingest`` step (``table = "targets"`` in a recipe; ``winnow score RUN dv4llm
--targets FILE`` runs that step first) and read here through the store, or ``sql:<condition>`` over the samples table, in which case those samples
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
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from winnow.core.markdown import md_table
from winnow.core.steps import Policy, Ref
from winnow.core.store import RunDir, UserError
from winnow.core.views import condition_rows
from winnow.stages import stage_io as io
from winnow.stages import topk
from winnow.stages.stage import Ctx, Stage

CODE_VERSION = "dv4llm/1"


@dataclass(kw_only=True)
class DV4LLMParams:
    targets: str = ""  # a file of target texts, or "sql:<condition over samples>"
    embedding: str = "tfidf"  # tfidf | minilm | <local model dir> | signals:<alias>
    dim: int = 256  # TF-IDF SVD dimension
    budget: float = 0.5  # <= 1: fraction of candidates selected; > 1: a count
    eps_rel: float = 0.05  # entropic regularisation relative to the mean cost
    tol: float = 1e-3  # stop when the L1 marginal error is below this
    max_iter: int = 1000  # Sinkhorn iterations at most
    seed: int = 0  # the TF-IDF SVD's and the Sinkhorn solver's draws

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: give a target-text file or sql:<condition over samples>")
        if self.budget <= 0:
            raise ValueError(f"budget={self.budget}: use a fraction in (0, 1] or a count > 1")
        if self.eps_rel <= 0 or self.tol <= 0 or self.max_iter < 1 or self.dim < 2:
            raise ValueError("eps_rel and tol must be > 0, max_iter >= 1, dim >= 2")


def _content_text(messages_json: str) -> str:
    return "\n".join(m["content"] for m in json.loads(messages_json))


def _sql_targets(run: RunDir, condition: str) -> set[str]:
    rows = condition_rows(
        run, f"select sample_id from samples where {condition}", f"dv4llm targets {condition!r}"
    )
    if not rows:
        raise UserError(f"dv4llm targets: no sample matches {condition!r}")
    return {r[0] for r in rows}


def _target_texts(run: RunDir) -> list[str]:
    """The texts of the run's ``targets/`` table (written by ``ingest`` with ``table = "targets"``; the
    CLI's ``--targets FILE`` runs that step first), read through the store."""
    table = run.table("targets")
    return [_content_text(m) for m in table.read(columns=["messages"]).column("messages").to_pylist()]


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


@dataclass
class _Solved:
    """The scan's result: per candidate (by sample_id) its potential, calibrated gradient, rank and
    whether it is selected; the step's counts."""

    by_id: dict[str, tuple[float, float, int, bool]]
    counts: dict[str, Any]


def _scan(ctx: Ctx) -> _Solved:
    """The global solve: embed targets and candidates, one Sinkhorn solve, rank by calibrated gradient."""
    from winnow.kernels.sinkhorn import calibrated_gradient, sinkhorn_potentials

    run, p = ctx.run, ctx.params
    sql = p.targets.startswith("sql:")
    target_texts = None if sql else _target_texts(run)
    cols = run.table(io.SAMPLES).read(columns=["sample_id", "messages"]).to_pydict()
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
    counts = {"targets": len(x), "candidates": len(cand_idx), "selected": n_sel, "solver": res.summary()}
    return _Solved(by_id, counts)


def _compute(ctx: Ctx, part: int, solved: _Solved) -> pa.Table:
    samples = ctx.run.table(io.SAMPLES)
    part_ids = samples.read_part(part, columns=["sample_id"]).column("sample_id").to_pylist()
    vals = [solved.by_id.get(s) for s in part_ids]
    return pa.table(
        {
            "sample_id": pa.array(part_ids, pa.string()),
            "role": pa.array(["candidate" if v else "target" for v in vals], pa.string()),
            "potential": pa.array([v[0] if v else None for v in vals], pa.float32()),
            "calibrated_gradient": pa.array([v[1] if v else None for v in vals], pa.float32()),
            "rank": pa.array([v[2] if v else None for v in vals], pa.int64()),
            "selected": pa.array([v[3] if v else False for v in vals], pa.bool_()),
        }
    )


def _policy(rows: dict[str, dict], ids: list[str], p: Any) -> tuple[dict[str, bool], dict[str, str]]:
    """GOT-D's sample half: the selected candidates, plus the targets unless ``keep_targets=false``."""
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


def card_section(card: Any, spec: Any) -> list[str]:
    rows = card.q("select role, count(*), count_if(selected) from scores_dv4llm group by 1 order by 1")
    return ["### DV4LLM", "", md_table(["role", "samples", "selected"], [list(r) for r in rows]), ""]


def _check(ctx: Ctx) -> None:
    """The tables the scan reads exist (exit 2 naming the step that writes them)."""
    p, run = ctx.params, ctx.run
    if not p.targets.startswith("sql:") and not run.table("targets").exists():
        raise UserError(
            f"dv4llm: {run.root} has no targets/ table; ingest the target texts first: "
            f"`winnow score {run.root} dv4llm --targets {p.targets}` does, or a recipe step "
            f'`step = "ingest"` with `table = "targets"`'
        )
    for table in _signals_read(p):
        if not run.table(table).exists():
            alias = table.split("/", 1)[1]
            raise UserError(
                f"dv4llm: no {table}; run `winnow score RUN --model M --alias {alias} --signals embedding` first"
            )


def _signals_read(p: DV4LLMParams) -> list[str]:
    return [f"signals/{p.embedding.split(':', 1)[1]}"] if p.embedding.startswith("signals:") else []


STAGE = Stage(
    name="dv4llm",
    help="GOT-D optimal-transport selection of the candidates closest to a target set.",
    params=DV4LLMParams,
    code_version=CODE_VERSION,
    reads=("samples", Ref("targets", lambda p: not p.targets.startswith("sql:")), _signals_read),
    columns=("selected", "role"),
    check=_check,
    scan=_scan,
    compute=_compute,
    counts=lambda solved: solved.counts,
    card=card_section,
    policy=Policy(("role", "selected"), _policy),
)
STEP = STAGE  # the runnable step (``STEP.run(run, params)``) is the stage itself
