"""Markdown helpers of the data card, on the ground floor so a stage's own card section (declared in
its module, ``Stage.card``) and the roof's card share them.

A card section is ``function(card, spec) -> list[str]`` of Markdown lines. ``card`` offers ``q(sql)``
(rows of a DuckDB query over the run's views: ``scores_<stage>``, ``samples``, ...), ``man`` (the
manifest), ``plot(fig, filename, caption)`` (writes a PNG beside the card, returns the image link
lines) and ``sample(sql, k)`` (at most ``k`` rows of a query, drawn uniformly, repeatably).
"""

from __future__ import annotations

from typing import Any


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (floats to 4 significant digits; ``|`` and newlines escaped)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def per_sample_section(card: Any, stage: str, col: str) -> list[str]:
    """A section summarising one per-sample column of ``scores_<stage>``: count, min, p10, median, p90, max."""
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
