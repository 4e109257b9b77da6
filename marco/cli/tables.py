"""Rich tables more than one command prints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from rich.table import Table

if TYPE_CHECKING:
    from marco.data.filters import FilterReport
    from marco.tasks import DatasetInfo


def filter_report_table(report: "FilterReport", title: str) -> Table:
    """What each quality filter saw, removed and kept, with sample reasons (``import-cot``, ``synthesize``)."""
    table = Table(title=title)
    for name, justify in (("step", "left"), ("seen", "right"), ("removed", "right"), ("kept", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("sample reasons", overflow="fold")
    for s in report.steps:
        reasons = "; ".join(f"{name}: {why}" for name, why in s.samples)
        table.add_row(s.name, str(s.seen), str(s.removed), str(s.kept), reasons)
    return table


def datasets_table(infos: Sequence["DatasetInfo"], title: str) -> Table:
    """``marco data list``: one row per dataset (MGSM: per language)."""
    table = Table(title=title)
    for name, justify in (("dataset", "left"), ("subset", "left"), ("rows", "right"), ("read from", "left"),
                          ("licence", "left"), ("select with", "left")):  # fmt: skip
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for i in infos:
        rows = "-" if i.rows is None else str(i.rows)
        table.add_row(i.name, i.subset, rows, i.source, i.licence, i.select)
    return table
