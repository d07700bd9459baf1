"""The data card's section for a stage that declares none of its own.

A stage's section is declared in its module (``Stage.card``, ``function(card, spec) -> list[str]`` of
Markdown lines reading ``scores_<stage>`` through ``card.q``; helpers in :mod:`winnow.core.markdown`).
A stage without one gets :func:`generic`: its row count, how many it keeps when it writes a ``keep``
column, and the share of scored supervised tokens its ``token_keep`` keeps.
"""

from __future__ import annotations

from typing import Any

from winnow.core.markdown import md_table  # noqa: F401  (re-exported for older readers)


def generic(card: Any, spec: Any) -> list[str]:
    view = f"scores_{spec.name}"
    cols = {r[0] for r in card.q(f"select column_name from (describe {view})")}
    header, values = ["samples"], [card.q(f"select count(*) from {view}")[0][0]]
    if "keep" in cols:
        header.append("kept")
        values.append(card.q(f"select count_if(keep) from {view}")[0][0])
    if "token_keep" in cols:
        (kept, scored) = card.q(
            f"select coalesce(sum(list_sum(token_keep::integer[])), 0)::bigint, "
            f"sum(list_count(token_keep))::bigint from {view}"
        )[0]
        header += ["scored tokens", "kept tokens"]
        values += [scored, kept]
    return [f"### {spec.name}", "", spec.help, "", md_table(header, [values]), ""]


def user_policy(card: Any, view: str, folder: str, policy: str) -> list[str]:
    """A ``python:`` selection (:mod:`winnow.stages.user_policy`): which function wrote it (spec and source
    digest, from the manifest) and how its token weights are spread over the kept samples' tokens: how many
    weigh exactly 1, more (up-weighted, e.g. TL-Training's key tokens) or less, and the weight mass above 1."""
    entry = card.man.get("steps", {}).get(f"select:{folder}", {})
    digest = str(entry.get("code_version", "")).partition("+user:")[2] or "?"
    one, up, down, mass, lo, mid, hi = card.q(
        "select count_if(w = 1), count_if(w > 1), count_if(w > 0 and w < 1), "
        "coalesce(sum(w) filter (where w > 1) / nullif(sum(w), 0), 0), min(w) filter (where w > 1), "
        f"median(w) filter (where w > 1), max(w) from (select unnest(token_weight) as w from {view} where keep)"
    )[0]
    fmt = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
    return [
        f"A user policy: `{policy}` (source sha256 `{digest}`...), called once per shard.",
        "",
        md_table(
            [
                "weight = 1",
                "weight > 1",
                "0 < weight < 1",
                "weight mass above 1",
                "min / median / max above 1",
            ],
            [[one, up, down, f"{mass:.1%}", f"{fmt(lo)} / {fmt(mid)} / {fmt(hi)}"]],
        ),
        "",
    ]
