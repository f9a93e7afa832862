"""The one table writer: Markdown tables for the files (summary.md, settings.md, report.md) and rich tables for the
terminal, with one way of showing a cell."""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table


def cell(value: Any, digits: int = 4) -> str:
    """A value as a table shows it: numbers to `digits` decimals (large ones to one), nothing for missing values,
    overrides' long floats (Optuna's lr=0.00049464081829378) to 4 significant digits."""
    if isinstance(value, Enum):
        value = value.value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 100 else f"{value:.1f}"
    text = str(value)
    if text.count(".") == 1 and text.replace(".", "").replace("e-", "").isdigit() and len(text) > 8:
        return f"{float(text):.4g}"
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table. By hand: pandas' to_markdown needs the optional tabulate package."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def rich_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    styles: Sequence[str] = (),
    caption: str | None = None,
) -> Table:
    """A rich table for the terminal, without outer edges; a dotted column name breaks after its dots (`model.` over
    `dropout`) where rich would cut it anywhere to fit."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, show_edge=False)
    for column in columns:
        table.add_column(escape(column.replace(".", ".\n")), overflow="fold")
    for index, row in enumerate(rows):
        table.add_row(*(escape(cell(value)) for value in row), style=styles[index] if index < len(styles) else None)
    return table
