"""``compiled.summary()``: the per-layer table drawn by ``rich``.

The returned ``Summary`` is a ``str`` (the table in plain box-drawing characters, so ``print`` and
``in`` work as on any string) that a rich console (``rich.print``, ``ditq inspect``) renders in
colour: each layer's SQNR is green at or above ``SQNR_GOOD_DB``, red below ``SQNR_BAD_DB``, yellow
in between; the HTML view uses the same bounds for its colour scale.
"""

from __future__ import annotations

import io

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

SQNR_BAD_DB = 15.0
SQNR_GOOD_DB = 30.0
SQNR_HEADER = "SQNR dB"


def sqnr_style(cell: str) -> str:
    try:
        db = float(cell)
    except ValueError:
        return "dim"
    return "green" if db >= SQNR_GOOD_DB else "red" if db < SQNR_BAD_DB else "yellow"


def _table(header: list[str], rows: list[list[str]], colour: bool) -> Table:
    table = Table(show_edge=True, header_style="bold" if colour else "")
    for name in header:
        table.add_column(name, justify="right" if name == SQNR_HEADER else "left", no_wrap=True)
    column = header.index(SQNR_HEADER) if SQNR_HEADER in header else None
    for row in rows:
        cells = [Text(str(c), style=sqnr_style(c) if colour and i == column else "") for i, c in enumerate(row)]
        table.add_row(*cells)
    return table


def render_plain(renderable) -> str:
    console = Console(width=100_000, file=io.StringIO(), color_system=None, record=True, soft_wrap=False)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


class Summary(str):
    """Text of the summary; ``__rich__`` gives the coloured table."""

    head: str
    header: list[str]
    rows: list[list[str]]

    tail: str

    def __new__(cls, head: str, header: list[str], rows: list[list[str]], tail: str = "") -> Summary:
        text = head + "\n" + render_plain(_table(header, rows, colour=False)) + (f"\n\n{tail}" if tail else "")
        self = super().__new__(cls, text)
        self.head, self.header, self.rows, self.tail = head, header, rows, tail
        return self

    def __rich__(self) -> Group:
        parts = [Text(self.head), _table(self.header, self.rows, colour=True)]
        return Group(*parts, Text("\n" + self.tail)) if self.tail else Group(*parts)


__all__ = ["SQNR_BAD_DB", "SQNR_GOOD_DB", "Summary", "render_plain", "sqnr_style"]
