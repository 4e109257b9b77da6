"""Accuracy (or chrF) against tokens spent per problem, one point per strategy/action (matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from marco.report.tables import BatchReport  # noqa: E402


def plot_accuracy_vs_tokens(report: BatchReport, path: str | Path) -> Path:
    """Write a PNG: overall metric per label (large markers) and per language (small markers)."""
    scale = 100.0 if report.metric == "accuracy" else 1.0
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, row in enumerate(report.rows):
        colour = f"C{i % 10}"
        if row.overall is not None:
            ax.scatter([row.tokens_per_problem], [scale * row.overall], s=80, color=colour, label=row.label, zorder=3)
        for lang, value in row.cells.items():
            if value is not None:
                ax.scatter([row.tokens_per_problem], [scale * value], s=14, color=colour, alpha=0.45)
                ax.annotate(lang, (row.tokens_per_problem, scale * value), fontsize=7, alpha=0.6,
                            xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("accuracy (%)" if report.metric == "accuracy" else report.metric)
    ax.set_title(f"{report.name}: {report.metric} vs tokens spent")
    ax.grid(alpha=0.3)
    if report.rows:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
