"""The summaries of every metric as plain-text tables, for the terminal."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "-"
    return True


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns: numbers right-aligned so their digits line up, text left-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = [bool(rows) and all(_is_number(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def format_table(summary: Mapping[str, Any]) -> str:
    """Plain-text tables of any summary this module returns, for the terminal.

    Generic over the shape rather than one formatter per metric: top-level numbers go in one
    row (the COCO stats, mIoU), dicts of numbers become one row each (PQ's All / Things /
    Stuff), and lists of dicts become a table each (per-class results). Numbers show three
    decimals; None (a metric that is undefined) shows as "-".
    """
    scalars = {k: v for k, v in summary.items() if not isinstance(v, (Mapping, list))}
    groups = {k: v for k, v in summary.items() if isinstance(v, Mapping)}
    tables = {k: v for k, v in summary.items() if isinstance(v, list)}
    blocks = []
    if scalars:
        header = list(scalars)
        blocks.append(_grid(header, [[_cell(scalars[k]) for k in header]]))
    if groups:
        columns = list(dict.fromkeys(c for group in groups.values() for c in group))
        rows = [[name, *(_cell(group.get(c)) for c in columns)] for name, group in groups.items()]
        blocks.append(_grid(["", *columns], rows))
    for title, items in tables.items():
        if not items:
            continue
        columns = list(dict.fromkeys(c for item in items for c in item))
        rows = [[_cell(item.get(c)) for c in columns] for item in items]
        blocks.append(f"{title}:\n" + _grid(columns, rows))
    return "\n\n".join(blocks)
