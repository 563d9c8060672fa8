"""Runtime plots in the style of the paper's Figure 2: compute vs exposed communication per round."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def runtime_bars(rows: list[dict], path: str, title: str, ylabel: str = "seconds per round") -> None:
    """Stacked bars, one per row: `compute_s` below, `exposed_s` (waiting on the network) above.

    Args:
      rows: dicts with `label` (e.g. 'ParaBlock\\n100 MB/s'), `compute_s` and `exposed_s`, in seconds.
    """
    labels = [r["label"] for r in rows]
    compute = [r["compute_s"] for r in rows]
    exposed = [r["exposed_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows)), 3.6))
    ax.bar(labels, compute, color="#4c72b0", label="computation")
    ax.bar(labels, exposed, bottom=compute, color="#c9a227", label="exposed communication")
    for i, (c, e) in enumerate(zip(compute, exposed, strict=True)):
        ax.text(i, c + e, f"{c + e:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylim(0, 1.18 * max(c + e for c, e in zip(compute, exposed, strict=True)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
