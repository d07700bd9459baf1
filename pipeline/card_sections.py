"""Per-stage sections of the data card, named by each stage's registry entry (``StepSpec.card``).

A section is ``function(card, spec) -> list[str]`` of Markdown lines; it reads the stage's DuckDB
view (``scores_<stage>``) through ``card.q`` and may add a plot with the card's helpers. A stage
without a section of its own gets :func:`generic`: its row count, how many it keeps when it writes a
``keep`` column, and the share of scored supervised tokens its ``token_keep`` keeps.
"""

from __future__ import annotations

from typing import Any


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (the card and its sections share it; it lives here so card -> sections is one-way)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def eu_plane(card: Any, spec: Any) -> list[str]:
    rows = card.q(
        "select quadrant, count(*), count_if(keep), median(error), median(uncertainty) "
        "from scores_eu_plane group by 1 order by 1"
    )
    return [
        "### EU plane (Q-Tuning)",
        "",
        md_table(["quadrant", "samples", "kept", "median PPL", "median entropy"], [list(r) for r in rows]),
        "",
        *card._eu_kept_by(),
        *card._eu_plot(),  # the image link: the plot was written but not linked before
    ]


def _per_sample(card: Any, stage: str, col: str) -> list[str]:
    (r,) = card.q(
        f"select count({col}), min({col}), quantile_cont({col}, 0.1), median({col}), "
        f"quantile_cont({col}, 0.9), max({col}) from scores_{stage}"
    )
    return [
        f"### {stage}: `{col}` per sample",
        "",
        md_table(["scored", "min", "p10", "median", "p90", "max"], [list(r)]),
        "",
    ]


def excess_loss(card: Any, spec: Any) -> list[str]:
    return _per_sample(card, "excess_loss", "mean_excess")


def critical_tokens(card: Any, spec: Any) -> list[str]:
    return _per_sample(card, "critical_tokens", "min_p_ce")


def dv4llm(card: Any, spec: Any) -> list[str]:
    rows = card.q("select role, count(*), count_if(selected) from scores_dv4llm group by 1 order by 1")
    return ["### DV4LLM", "", md_table(["role", "samples", "selected"], [list(r) for r in rows]), ""]


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
