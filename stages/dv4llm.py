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

Under torchrun (``torchrun --nproc_per_node N --no-python -- winnow score RUN dv4llm ...``) the solve is
split over the ranks, one process being the same code with world size 1 (issue 29 item 3): the
embeddings go once to ``scores/dv4llm/.embeddings/embeddings.npy`` (:mod:`.dv4llm_embeddings`: how,
and why they are the same bytes at any world size), each rank reads only its contiguous share of the
candidates from it, the Sinkhorn passes exchange only per-target log-sums
(:func:`winnow.kernels.sinkhorn.sinkhorn_potentials` with ``group``), and ``g`` is all-gathered (4 bytes
a candidate) so that every rank ranks all candidates as one process does. Per-rank state is its share
of the embeddings in chunks, a few of its vectors, and 1 + 4 + 4 + 8 bytes a candidate (mask, g,
gradient, rank); before, one process held every text and embedding and a dict entry per candidate
(4.1 GB at 1M samples). The potentials agree with one process to the order of float sums (float32:
~1e-5); a candidate at the selection cut can flip (tests/stages/test_dv4llm_dist*.py count them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from winnow.core import collective
from winnow.core.markdown import md_table
from winnow.core.steps import Policy, Ref
from winnow.core.store import RunDir, UserError
from winnow.core.views import condition_rows
from winnow.stages import dv4llm_embeddings as emb
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
    fit_docs: int = 200_000  # TF-IDF + SVD fit: every target + seeded candidates, this many texts in all

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: give a target-text file or sql:<condition over samples>")
        if self.budget <= 0:
            raise ValueError(f"budget={self.budget}: use a fraction in (0, 1] or a count > 1")
        if self.eps_rel <= 0 or self.tol <= 0 or self.max_iter < 1 or self.dim < 2 or self.fit_docs < 2:
            raise ValueError("eps_rel and tol must be > 0, max_iter >= 1, dim >= 2, fit_docs >= 2")


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


def _rows_of(run: RunDir, table: str, part: int, pos: np.ndarray, column: str) -> list:
    """``column`` of the rows at positions ``pos`` of shard ``part`` of ``table``."""
    col = run.table(table).read_part(part, columns=[column]).column(column)
    return col.take(pa.array(pos, pa.int64())).to_pylist()


def _texts(run: RunDir, lay: emb.Layout, targets: bool, want: np.ndarray | None) -> tuple[list, list]:
    """One pass over the samples (rank 0): the SQL targets' texts (when ``targets``) and the texts of
    the candidates whose index is in ``want`` (sorted; None = every candidate), both in samples order."""
    t_texts, c_texts = [], []
    for part, mask, start in zip(lay.parts, lay.masks, lay.starts, strict=True):
        pos = np.flatnonzero(mask)
        keep = pos if want is None else pos[np.isin(np.arange(start, start + len(pos)), want)]
        tpos = np.flatnonzero(~mask) if targets else np.empty(0, np.int64)
        if len(keep) or len(tpos):
            msgs = run.table(io.SAMPLES).read_part(part, columns=["messages"]).column("messages")
            t_texts += [_content_text(m) for m in msgs.take(pa.array(tpos, pa.int64())).to_pylist()]
            c_texts += [_content_text(m) for m in msgs.take(pa.array(keep, pa.int64())).to_pylist()]
    return t_texts, c_texts


def _signal_rows(run: RunDir, alias: str, part: int, pos: np.ndarray) -> np.ndarray:
    """The ``signals/<alias>`` embeddings of samples shard ``part``'s rows ``pos`` (matched by id)."""
    ids = _rows_of(run, io.SAMPLES, part, pos, "sample_id")
    sig = run.table(f"signals/{alias}").read_part(part, columns=["sample_id", "embedding"]).to_pydict()
    got = dict(zip(sig["sample_id"], sig["embedding"], strict=True))
    missing = [s for s in ids if got.get(s) is None]
    if missing:
        raise UserError(
            f"dv4llm: {len(missing)} samples of shard {part} (e.g. {missing[0]}) lack "
            f"signals/{alias}.embedding (rerun the pass)"
        )
    return np.asarray([got[s] for s in ids], np.float32).reshape(len(ids), -1)


def _first(ctx: Ctx, lay: emb.Layout) -> tuple[int, list, Any]:
    """Rank 0's share of the embedding (:func:`emb.ensure`): the targets' rows, and every candidate's
    when it computes them all (TF-IDF fitted on every text; model encoders); else the fitted map."""
    from winnow.stages.text_embeddings import embed_texts, fit_indices, fit_tfidf_svd

    run, p = ctx.run, ctx.params
    sql = p.targets.startswith("sql:")
    if p.embedding.startswith("signals:"):
        alias = p.embedding.split(":", 1)[1]
        if not sql:
            raise UserError(
                "dv4llm: embedding=signals:<alias> needs sql: targets (a targets file has no model pass)"
            )
        parts = zip(lay.parts, lay.masks, strict=True)
        x = np.concatenate([_signal_rows(run, alias, part, np.flatnonzero(~m)) for part, m in parts])
        return x.shape[1], [(0, x)], None
    n_t = _n_targets(run, lay, sql)
    want = fit_indices(n_t, lay.n, p.fit_docs, p.seed) if p.embedding == "tfidf" else None
    t_texts, c_texts = _texts(run, lay, sql, want)
    t_texts = t_texts if sql else _target_texts(run)
    if want is None:  # rank 0 embeds every text, as one process always did
        kw = {"dim": p.dim, "seed": p.seed, "max_fit_docs": p.fit_docs} if p.embedding == "tfidf" else {}
        x, y = embed_texts(t_texts, c_texts, method=p.embedding, **kw)
        return x.shape[1], [(0, x), (n_t, y)], None
    model, fit_emb = fit_tfidf_svd(t_texts + c_texts, dim=p.dim, seed=p.seed)
    return fit_emb.shape[1], [(0, fit_emb[:n_t])], model


def _own_rows(
    ctx: Ctx, lay: emb.Layout, state: Any, rank: int, world: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Each rank's candidates' rows (:func:`emb.ensure`): TF-IDF through rank 0's map (broadcast), or
    the ``signals`` embeddings."""
    from winnow.stages.text_embeddings import TfidfSvd

    run, p = ctx.run, ctx.params
    n_t = _n_targets(run, lay, p.targets.startswith("sql:"))
    lo, hi = collective.split(lay.n, world, rank)
    model = None
    if p.embedding == "tfidf":
        terms = collective.broadcast_strings(state.terms if rank == 0 else None)
        idf = collective.broadcast_array(state.idf if rank == 0 else None)
        comps = collective.broadcast_array(state.components if rank == 0 else None)
        model = state if world == 1 else TfidfSvd(terms, idf, comps)
    for part, a, pos in lay.slices(lo, hi):
        if model is not None:
            texts = [_content_text(m) for m in _rows_of(run, io.SAMPLES, part, pos, "messages")]
            yield n_t + a, model.transform(texts)
        else:
            yield n_t + a, _signal_rows(run, p.embedding.split(":", 1)[1], part, pos)


def _n_targets(run: RunDir, lay: emb.Layout, sql: bool) -> int:
    if sql:
        return sum(len(m) - int(m.sum()) for m in lay.masks)
    return sum(r.rows for r in run.table("targets").records())


@dataclass
class _Solved:
    """The scan's result, per candidate in candidate order (:class:`emb.Layout`): potential ``g``,
    calibrated gradient (float32, as written) and rank; ``n_sel`` selected; the step's counts."""

    layout: emb.Layout
    g: np.ndarray
    grad: np.ndarray
    rank: np.ndarray
    n_sel: int
    counts: dict[str, Any]


def _solve(ctx: Ctx, lay: emb.Layout, path: Any, rank: int, world: int) -> tuple[np.ndarray, Any]:
    """This rank's Sinkhorn share (its candidates' rows read from ``path``); every candidate's ``g``."""
    from winnow.kernels.sinkhorn import sinkhorn_potentials

    p = ctx.params
    n_t = _n_targets(ctx.run, lay, p.targets.startswith("sql:"))
    lo, hi = collective.split(lay.n, world, rank)
    head, rows = emb.NpyRows(path, 0, n_t), emb.NpyRows(path, n_t + lo, n_t + hi)
    try:
        x = head[:]
        res = sinkhorn_potentials(
            x, rows, eps_rel=p.eps_rel, tol=p.tol, max_iter=p.max_iter, seed=p.seed, group=collective.group()
        )
    finally:
        head.close()
        rows.close()
    return collective.all_gather_rows(res.g.cpu()).numpy(), res


def _scan(ctx: Ctx) -> _Solved:
    """The global solve: embed targets and candidates (to a file of the run), one Sinkhorn solve split
    over the torchrun ranks (or one process), rank by calibrated gradient."""
    import torch

    from winnow.kernels.sinkhorn import calibrated_gradient

    run, p = ctx.run, ctx.params
    sql = p.targets.startswith("sql:")
    lay = emb.layout(run, ctx.parts, _sql_targets(run, p.targets[4:]) if sql else set())
    if not lay.n:
        raise UserError("dv4llm: every sample is a target; nothing left to select from")
    n_t = _n_targets(run, lay, sql)
    key = {"inputs": io.table_inputs(run, list(ctx.tables)), "params": [p.targets, p.embedding, p.dim],
           "fit": [p.seed, p.fit_docs], "code": CODE_VERSION}  # fmt: skip
    with collective.joined() as (rank, world):
        path = emb.ensure(
            run, key, n_t + lay.n, lambda: _first(ctx, lay), lambda st, r, w: _own_rows(ctx, lay, st, r, w)
        )
        g, res = _solve(ctx, lay, path, rank, world)
    grad = calibrated_gradient(torch.from_numpy(g).double()).numpy()
    order = np.argsort(grad, kind="stable")
    rank_of = np.empty(len(order), np.int64)
    rank_of[order] = np.arange(len(order))
    del order
    n_sel = topk.round_count(p.budget, lay.n) if p.budget <= 1 else min(int(p.budget), lay.n)
    counts = {"targets": n_t, "candidates": lay.n, "selected": n_sel, "solver": res.summary()}
    return _Solved(lay, g, grad.astype(np.float32), rank_of, n_sel, counts)


def _compute(ctx: Ctx, part: int, solved: _Solved) -> pa.Table:
    ids = ctx.run.table(io.SAMPLES).read_part(part, columns=["sample_id"]).column("sample_id")
    mask, start = solved.layout.where(part)
    cand = slice(start, start + int(mask.sum()))

    def column(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        full = np.zeros(len(mask), values.dtype)
        full[mask] = values
        return pa.array(full, typ, mask=~mask)  # targets: null

    selected = np.zeros(len(mask), bool)
    selected[mask] = solved.rank[cand] < solved.n_sel
    return pa.table(
        {
            "sample_id": pa.array(ids.to_pylist(), pa.string()),
            "role": pa.array(np.where(mask, "candidate", "target").tolist(), pa.string()),
            "potential": column(solved.g[cand], pa.float32()),
            "calibrated_gradient": column(solved.grad[cand], pa.float32()),
            "rank": column(solved.rank[cand], pa.int64()),
            "selected": pa.array(selected, pa.bool_()),
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
