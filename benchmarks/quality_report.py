"""Curation quality on the demo data: AUROC of each stage's sample score per planted corruption kind.

Runs ``recipes/quickstart.toml`` (the frozen demo draw scored by tiny models trained on *separate*
draws of the generator: the quickstart's, see ``pipeline/builtin/tiny_model.py``, or with ``--models quality``
the longer-trained set of ``benchmarks/quality_models.py``), then compares each sample score against
the ground truth in ``meta_corruption``. Signs were fixed before looking at results: a higher score
means "more suspicious".

| score                          | definition                                                       |
|--------------------------------|------------------------------------------------------------------|
| eu_plane.error                 | PPL over supervised tokens (current model)                        |
| eu_plane.uncertainty           | mean entropy over supervised tokens                               |
| excess_loss                    | -(mean current loss - reference loss): the clean-trained reference finds corruption hard |
| sstoken                        | -(mean retrospective excess loss, history - current)              |
| contrast                       | mean (log p_neg - log p_pos) over supervised tokens (cDPO models) |
| critical_tokens                | -(min p_CE over supervised tokens)                                |
| dv4llm                         | calibrated OT gradient towards held-out clean math samples        |
| random                         | a seeded uniform control                                          |

The sstoken sign (a token the current model has *not* improved on is suspicious) turned out to be
the opposite of what the method rewards when the warm current model was fine-tuned on the corrupted
data itself: see ``benchmarks/RESULTS.md``. It stays as fixed in advance.

AUROC is computed for each kind against the clean samples (``none``). For junk spans it also
prints, per token-pruning stage, the fraction of junk tokens pruned next to the fraction of all
supervised tokens pruned. Usage: ``python benchmarks/quality_report.py [--models builtin|quality] [--run-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SCORES = {
    "eu_plane.error": "select sample_id, error s from scores_eu_plane",
    "eu_plane.uncertainty": "select sample_id, uncertainty s from scores_eu_plane",
    "excess_loss": "select sample_id, -mean_excess s from scores_excess_loss",
    "sstoken": "select sample_id, -list_avg(rel) s from scores_sstoken",
    "contrast": "select c.sample_id, list_avg(list_transform(list_zip(c.logprob_neg, c.logprob_pos, s.loss_mask), "
    "lambda x: case when x[3] = 1 then x[1] - x[2] end)) s "
    "from signals_contrast c join samples s using (sample_id)",
    "critical_tokens": "select sample_id, -min_p_ce s from scores_critical_tokens",
    "dv4llm": "select sample_id, calibrated_gradient s from scores_dv4llm where role = 'candidate'",
}


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    allv = np.concatenate([pos, neg])
    ranks = allv.argsort(kind="stable").argsort().astype(float) + 1
    # average ranks over ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def junk_pruning(con) -> dict[str, tuple[float, float]]:
    rows = con.sql(
        "select sample_id, text, messages, offsets, loss_mask, meta_junk_spans from samples "
        "where meta_corruption = 'junk_span'"
    ).fetchall()
    junk: dict[str, list[bool]] = {}
    for sid, text, messages, offsets, mask, spans in rows:
        content = [m["content"] for m in json.loads(messages) if m["role"] == "assistant"][-1]
        start = text.find(content)
        spans = [(start + s, start + e) for s, e in json.loads(spans)]
        junk[sid] = [
            bool(m) and any(a <= o < b for a, b in spans) for o, m in zip(offsets, mask, strict=True)
        ]
    out = {}
    for stage in ("eu_plane", "excess_loss", "sstoken"):
        res = con.sql(
            f"select t.sample_id, t.token_keep, s.loss_mask from scores_{stage} t "
            "join samples s using (sample_id)"
        ).fetchall()
        pruned_junk = n_junk = pruned_all = n_all = 0
        for sid, keep, mask in res:
            for i, m in enumerate(mask):
                if not m:
                    continue
                pruned = not (keep[i] if keep is not None and keep[i] is not None else False)
                n_all += 1
                pruned_all += pruned
                if sid in junk and junk[sid][i]:
                    n_junk += 1
                    pruned_junk += pruned
        out[stage] = (pruned_junk / max(n_junk, 1), pruned_all / max(n_all, 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        choices=("builtin", "quality"),
        default="builtin",
        help="builtin: the quickstart's tiny models; quality: the longer-trained set of "
        "benchmarks/quality_models.py (built on first use, ~23 min on one core)",
    )
    ap.add_argument("--run-dir", default=None, help="default runs/quality-<models>")
    args = ap.parse_args()
    from winnow.pipeline.inspect_run import open_views
    from winnow.pipeline.recipe import load_recipe, run_loaded, with_models

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml")
    if args.models == "quality":
        sys.path.insert(0, str(Path(__file__).parent))
        from quality_models import QUICKSTART_ROLES, build_quality_models

        dirs = build_quality_models()
        recipe = with_models(recipe, {old: str(dirs[new]) for old, new in QUICKSTART_ROLES.items()})
    run_dir = args.run_dir or f"runs/quality-{args.models}"
    run_loaded(recipe, run_dir)
    con = open_views(run_dir).con
    kinds = dict(con.sql("select sample_id, meta_corruption from samples").fetchall())
    rng = np.random.default_rng(0)
    scores = {name: dict(con.sql(q).fetchall()) for name, q in SCORES.items()}
    scores["random"] = {sid: float(rng.random()) for sid in sorted(kinds)}
    kind_names = [k for k in sorted(set(kinds.values())) if k != "none"]
    header = f"{'score':24s}" + "".join(f"{k:>20s}" for k in kind_names)
    print(header)
    table = {}
    for name, sc in scores.items():
        row = {}
        clean = np.array([v for s, v in sc.items() if kinds.get(s) == "none" and v is not None])
        for k in kind_names:
            pos = np.array([v for s, v in sc.items() if kinds.get(s) == k and v is not None])
            row[k] = auroc(pos, clean) if len(pos) and len(clean) else float("nan")
        table[name] = row
        print(f"{name:24s}" + "".join(f"{row[k]:>20.3f}" for k in kind_names))
    print("\njunk-span tokens: fraction pruned vs fraction of all supervised tokens pruned")
    junk = junk_pruning(con)
    for stage, (j, a) in junk.items():
        print(f"{stage:24s} junk {j:.3f}   all {a:.3f}")
    # Rows that never became samples are not in the AUROC table; say which planted kinds they were.
    rejected = con.sql(
        "select json_extract_string(raw, '$.corruption') kind, reason, count(*) n from rejects "
        "group by all order by all"
    ).fetchall()
    print("\nrejected at ingest (not scored): " + ", ".join(f"{k} {r} {n}" for k, r, n in rejected))
    out = Path(__file__).parent / "out"
    from winnow.core.store import atomic_write_json

    atomic_write_json(
        out / f"quality_report_{args.models}.json",
        {
            "models": args.models,
            "auroc": table,
            "junk_pruning": junk,
            "rejected_at_ingest": [{"kind": k, "reason": r, "n": n} for k, r, n in rejected],
        },
    )


if __name__ == "__main__":
    main()
