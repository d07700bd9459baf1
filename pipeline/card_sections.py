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
