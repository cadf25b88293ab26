"""Plots that more than one step draws (the per-round solve rate of mcts-sample, redrawn by `report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_rounds(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [row["round"] for row in rows]
    ax.plot(xs, [row["solve_rate"] for row in rows], marker="o", label="solve rate (a correct answer in the tree)")
    ax.plot(xs, [row["accuracy"] for row in rows], marker="s", linestyle="--", label="accuracy (the chosen answer)")
    for x, row in zip(xs, rows):
        ax.annotate(f"{row['solve_rate']:.2f}", (x, row["solve_rate"]), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8)
    ax.set_xticks(xs)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("round")
    ax.set_ylabel("share of problems")
    ax.set_title("mcts-sample: per-round solve rate")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
