"""The comparison as text: the accuracy/tokens table and the paired tests (rich tables and markdown)."""

from __future__ import annotations

from rich.table import Table

from marco.compare.table import Comparison


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def accuracy_table(comp: Comparison) -> Table:
    """Per strategy and budget: accuracy and its 95% interval, tokens spent, wall time."""
    wall = f" · {comp.wall_s:.0f}s wall" if comp.wall_s is not None else ""
    table = Table(title=f"{comp.name} · {comp.dataset} · {comp.status}{wall}",
                  caption=f"95% interval: {comp.interval}; tokens: generated tokens actually spent per search")
    for col, justify in (("strategy", "left"), ("budget", "right"), ("seeds", "right"), ("problems", "right"),
                         ("accuracy %", "right"), ("95% CI", "right"), ("tokens spent/problem", "right"),
                         ("wall s", "right"), ("failed", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in comp.rows:
        table.add_row(r.strategy, str(r.budget), str(r.seeds), str(r.problems), _pct(r.accuracy),
                      f"{_pct(r.low)}–{_pct(r.high)}", f"{r.tokens_per_problem:.0f}", f"{r.wall_s:.1f}", str(r.failed))
    return table


def paired_table(comp: Comparison) -> Table:
    """Each strategy against the baseline on the same problems: wins, losses, ties, p."""
    table = Table(title=f"paired against {comp.baseline} on the same problems", caption=comp.paired_test)
    for col in ("strategy", "budget", f"vs {comp.baseline}@", "wins", "losses", "ties", "p"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for p in comp.paired:
        t = p.test
        table.add_row(p.strategy, str(p.budget), str(p.baseline_budget), str(t.wins), str(t.losses), str(t.ties),
                      f"{t.p:.3g}")
    return table


def markdown(comp: Comparison) -> str:
    """Both tables as GitHub markdown (for docs/results.md)."""
    lines = [
        "| strategy | budget | seeds | problems | accuracy % | 95% CI | tokens spent/problem | wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in comp.rows:
        lines.append(f"| {r.strategy} | {r.budget} | {r.seeds} | {r.problems} | {_pct(r.accuracy)} | "
                     f"{_pct(r.low)}–{_pct(r.high)} | {r.tokens_per_problem:.0f} | {r.wall_s:.0f} |")
    lines += ["", f"| strategy | budget | vs {comp.baseline}@ | wins | losses | ties | p |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in comp.paired:
        t = p.test
        lines.append(f"| {p.strategy} | {p.budget} | {p.baseline_budget} | {t.wins} | {t.losses} | {t.ties} | {t.p:.3g} |")
    return "\n".join(lines) + "\n"
