"""Figures of the benchmark summaries (matplotlib's Agg canvas, no pyplot global state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import atomic_write


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure on its own Agg canvas. matplotlib is imported here, not with the
    module: it costs every ``relprop`` command over a second of start-up otherwise."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_perturbation(summary: dict[str, Any], path: str | Path) -> None:
    """Accuracy vs removed fraction, one panel per mode and one line per method (AUC in
    the legend)."""
    modes = sorted({mode for entries in summary["results"].values() for mode in entries},
                   key=("positive", "negative").index)
    fig = new_figure((5.5 * max(len(modes), 1), 4.2))
    for k, mode in enumerate(modes, 1):
        ax = fig.add_subplot(1, len(modes), k)
        for method, entries in summary["results"].items():
            entry = entries.get(mode)
            if not entry or entry["accuracy"] is None:
                continue
            x = [100 * f for f in entry["fractions"]]
            y = [100 * a for a in entry["accuracy"]]
            ax.plot(x, y, marker="o", markersize=3, label=f"{method} (AUC {entry['auc']:.2f})")
        ax.set_title(f"{mode} perturbation")
        ax.set_xlabel("removed pixels (%)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, dpi=120, format="png"))
