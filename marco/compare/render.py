"""The comparison as text: the accuracy/tokens table and the paired tests (rich tables and markdown)."""

from __future__ import annotations

from rich.table import Table

from marco.compare.table import Comparison, CompareRow


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _depth(r: CompareRow) -> str:
    """Mean tree depth / mean depth of the chosen path ("–" when the store has none for this row)."""
    if r.tree_depth is None or r.path_depth is None:
        return "–"
    return f"{r.tree_depth:.1f} / {r.path_depth:.1f}"


def accuracy_table(comp: Comparison) -> Table:
    """Per strategy and budget: accuracy and its 95% interval, tokens spent, depth, wall time."""
    wall = f" · {comp.wall_s:.0f}s wall" if comp.wall_s is not None else ""
    table = Table(title=f"{comp.name} · {comp.dataset} · {comp.status}{wall}",
                  caption=f"95% interval: {comp.interval}; tokens: generated tokens actually spent per search; "
                          "depth: mean deepest node of the tree / of the chosen answer's path")
    for col, justify in (("strategy", "left"), ("budget", "right"), ("seeds", "right"), ("problems", "right"),
                         ("accuracy %", "right"), ("95% CI", "right"), ("tokens spent/problem", "right"),
                         ("depth tree / path", "right"), ("wall s", "right"), ("failed", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in comp.rows:
        table.add_row(r.strategy, str(r.budget), str(r.seeds), str(r.problems), _pct(r.accuracy),
                      f"{_pct(r.low)}–{_pct(r.high)}", f"{r.tokens_per_problem:.0f}", _depth(r), f"{r.wall_s:.1f}",
                      str(r.failed))
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
        "| strategy | budget | seeds | problems | accuracy % | 95% CI | tokens spent/problem | depth tree / path | wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in comp.rows:
        lines.append(f"| {r.strategy} | {r.budget} | {r.seeds} | {r.problems} | {_pct(r.accuracy)} | "
                     f"{_pct(r.low)}–{_pct(r.high)} | {r.tokens_per_problem:.0f} | {_depth(r)} | {r.wall_s:.0f} |")
    lines += ["", f"| strategy | budget | vs {comp.baseline}@ | wins | losses | ties | p |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in comp.paired:
        t = p.test
        lines.append(f"| {p.strategy} | {p.budget} | {p.baseline_budget} | {t.wins} | {t.losses} | {t.ties} | {t.p:.3g} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- the evaluation matrix
def _row_name(cell: dict) -> str:  # type: ignore[type-arg]
    model = cell["model_key"] if cell["model_key"] == cell["model"] else f"{cell['model_key']} ({cell['model']})"
    matched = f" at {cell['matched_to']}'s tokens" if cell.get("matched_to") else ""
    return f"{model} · {cell['strategy']}{matched}"


def matrix_layout(cells: list[dict]) -> tuple[list[tuple[str, int]], list[tuple[str, str]], dict]:  # type: ignore[type-arg]
    """Rows (name, budget), columns (dataset, lang) in first-seen order, and (row, column) -> cell."""
    rows = list(dict.fromkeys((_row_name(c), c["budget"]) for c in cells))
    cols = list(dict.fromkeys((c["dataset"], c["lang"]) for c in cells))
    grid = {((_row_name(c), c["budget"]), (c["dataset"], c["lang"])): c for c in cells}
    return rows, cols, grid


def _pair_text(p: dict | None) -> str:  # type: ignore[type-arg]
    return "·" if p is None else f"+{p['wins']}/−{p['losses']} p={p['p']:.2g}"


def matrix_markdown(cells: list[dict], title: str | None = None) -> str:  # type: ignore[type-arg]
    """The paper's table as GitHub markdown: one row per model, strategy and budget, one column per dataset
    and language; each cell accuracy % [95% Wilson interval], tokens spent per problem and (MCTS) mean tree
    depth; then the paired tests of every cell against the base greedy and the trained greedy cells."""
    rows, cols, grid = matrix_layout(cells)
    head = " | ".join(f"{d} {lang}" for d, lang in cols)
    lines = [f"### {title}", ""] if title else []
    lines += [f"| model · strategy | budget | {head} |", "| --- | ---: |" + " ---: |" * len(cols)]
    for row in rows:
        out = []
        for col in cols:
            c = grid.get((row, col))
            if c is None or c["accuracy"] is None:
                out.append("–")
                continue
            depth = f" · d{c['mean_depth']:.1f}" if c.get("mean_depth") is not None else ""
            depth += f" · b{c['search_budget']}" if c.get("matched_to") else ""
            out.append(f"{_pct(c['accuracy'])} [{_pct(c['ci_low'])}–{_pct(c['ci_high'])}] · {c['tokens_spent']:.0f} tok{depth}"
                       f" (n={c['n']})")
        lines.append(f"| {row[0]} | {row[1]} | " + " | ".join(out) + " |")
    lines += ["", "Accuracy % [95% Wilson interval] · generated tokens spent per problem (mean) · d = mean depth of "
              "the MCTS trees · b = the budget a strategy matched to another's spent tokens ran at.", "", f"| paired (wins/losses, exact p) | budget | "
              + " | ".join(f"{d} {lang} vs base greedy | vs trained greedy" for d, lang in cols) + " |",
              "| --- | ---: |" + " ---: | ---: |" * len(cols)]  # fmt: skip
    for row in rows:
        out = []
        for col in cols:
            c = grid.get((row, col))
            out += ["–", "–"] if c is None else [_pair_text(c.get("vs_base")), _pair_text(c.get("vs_trained"))]
        lines.append(f"| {row[0]} | {row[1]} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def matrix_table(cells: list[dict], title: str = "evaluation") -> Table:  # type: ignore[type-arg]
    """The same table for the terminal."""
    rows, cols, grid = matrix_layout(cells)
    table = Table(title=title, caption="accuracy % [95% Wilson] · tokens/problem; p: exact paired test vs base greedy")
    table.add_column("model · strategy")
    table.add_column("budget", justify="right")
    for d, lang in cols:
        table.add_column(f"{d} {lang}", justify="right")
    for row in rows:
        out = []
        for col in cols:
            c = grid.get((row, col))
            if c is None or c["accuracy"] is None:
                out.append("–")
                continue
            p = c.get("vs_base")
            out.append(f"{_pct(c['accuracy'])} [{_pct(c['ci_low'])}–{_pct(c['ci_high'])}] {c['tokens_spent']:.0f}t"
                       + (f" p={p['p']:.2g}" if p else ""))
        table.add_row(row[0], str(row[1]), *out)
    return table
