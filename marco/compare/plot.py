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


def plot_matrix(cells: list[dict], path: str | Path) -> Path:  # type: ignore[type-arg]
    """One panel per (dataset, language): accuracy (%) against generated tokens spent per problem, one series
    per model and strategy through its budgets, 95% Wilson intervals as error bars."""
    cols = list(dict.fromkeys((c["dataset"], c["lang"]) for c in cells)) or [("", "")]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols) + 1.5, 4.2), dpi=120, squeeze=False)
    series = list(dict.fromkeys((c["model_key"], c["strategy"]) for c in cells))
    for ax, (dataset, lang) in zip(axes[0], cols):
        for i, (model, strategy) in enumerate(series):
            pts = sorted((c for c in cells if (c["model_key"], c["strategy"]) == (model, strategy)
                          and (c["dataset"], c["lang"]) == (dataset, lang) and c["accuracy"] is not None),
                         key=lambda c: c["tokens_spent"])  # fmt: skip
            if not pts:
                continue
            ys = [100 * c["accuracy"] for c in pts]
            err = [[100 * (c["accuracy"] - c["ci_low"]) for c in pts], [100 * (c["ci_high"] - c["accuracy"]) for c in pts]]
            ax.errorbar([c["tokens_spent"] for c in pts], ys, yerr=err, marker="osD^vP*X"[i % 8], capsize=3, color=f"C{i % 10}",
                        label=f"{model} · {strategy}", alpha=0.9, lw=1.2, elinewidth=0.8)
        ax.set_title(f"{dataset} {lang}", fontsize=9)
        ax.set_xlabel("tokens spent per problem (mean)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    legend: dict[str, object] = {}
    for ax in axes[0]:  # a series may be missing from some panels
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    if handles:
        fig.tight_layout(rect=(0, 0, 0.8, 1))
        fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(0.805, 0.5))
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
