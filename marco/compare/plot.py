"""Accuracy against tokens actually spent: one line per strategy through its budgets (matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from marco.compare.table import Comparison  # noqa: E402


def plot_comparison(comp: Comparison, path: str | Path) -> Path:
    """Write a PNG: x = mean generated tokens spent per problem, y = accuracy (%), with the 95% interval as
    error bars; each point is one budget, labelled with it."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    strategies = list(dict.fromkeys(r.strategy for r in comp.rows))
    for i, name in enumerate(strategies):
        rows = sorted((r for r in comp.rows if r.strategy == name), key=lambda r: r.tokens_per_problem)
        xs = [r.tokens_per_problem for r in rows]
        ys = [100 * r.accuracy for r in rows]
        err = [[max(0.0, 100 * (r.accuracy - r.low)) for r in rows], [max(0.0, 100 * (r.high - r.accuracy)) for r in rows]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=f"C{i % 10}", label=name, alpha=0.9, lw=1.5,
                    elinewidth=0.8)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(str(r.budget), (x, y), fontsize=6, alpha=0.6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("generated tokens spent per problem (mean)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{comp.dataset}: accuracy vs tokens spent (95% Wilson intervals; labels = budget)", fontsize=9)
    ax.grid(alpha=0.3)
    if strategies:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
