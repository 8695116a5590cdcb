"""What the run, compare and sweep figures share: matplotlib without a display, per-round axes."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: no display on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_round_plot(fig, ax, ylabel: str, title: str, path: Path) -> None:
    """Finish axes with rounds along x (whole rounds only) and write the figure. The legend sits
    right of the axes, where it cannot hide a curve."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = zero-shot)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
