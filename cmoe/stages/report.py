"""Result tables as header + rows of strings: the one owner of their cells (accuracy matrix included).

Renderers only lay the strings out: `TextTable.markdown` for Prefect artifacts and results.md,
`cmoe.cli.common.rich_table` for the terminal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MISSING = "–"  # a value that does not exist: a task not learned yet, a metric a method does not define


@dataclass(frozen=True)
class TextTable:
    """A table whose cells are already formatted."""

    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        """The table as GitHub-flavoured Markdown."""
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self.rows])


@dataclass(frozen=True)
class Row:
    """One row of an accuracy matrix: its leading labels, one accuracy per task, its trailing cells."""

    labels: Sequence[str]
    acc: Sequence[float | None]
    trailing: Sequence[str] = field(default_factory=tuple)


def cell(value: float | None, spec: str = ".1f") -> str:
    """One formatted value (percent with one decimal by default); MISSING when there is none."""
    return MISSING if value is None else format(value, spec)


def accuracy_table(labels: Sequence[str], tasks: Sequence[str], rows: Iterable[Row],
                   trailing: Sequence[str] = ()) -> TextTable:
    """Accuracy matrix: columns `labels`, one per task (percent), then `trailing`; one row per `Row`."""
    return TextTable([*labels, *tasks, *trailing],
                     [[*r.labels, *(cell(x) for x in r.acc), *r.trailing] for r in rows])
