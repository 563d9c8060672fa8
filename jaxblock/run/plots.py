"""Runtime plots in the style of the paper's Figure 2: compute vs exposed communication per round."""

from __future__ import annotations

import textwrap

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
    width = max(4.0, 1.1 * len(rows))
    fig, ax = plt.subplots(figsize=(width, 3.6))
    ax.bar(labels, compute, color="#4c72b0", label="computation")
    ax.bar(labels, exposed, bottom=compute, color="#c9a227", label="exposed communication")
    for i, (c, e) in enumerate(zip(compute, exposed, strict=True)):
        ax.text(i, c + e, f"{c + e:.3g}" if c + e < 1000 else f"{c + e:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title("\n".join(textwrap.wrap(title, int(11 * width))), fontsize=10)  # never wider than the figure
    ax.legend(fontsize=8, loc="upper left")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylim(0, 1.35 * max(c + e for c, e in zip(compute, exposed, strict=True)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure2(panels: dict[str, list[dict]], path: str, title: str) -> None:
    """The paper's Figure 2: one panel per setting (e.g. batch size), stacked compute / exposed bars.

    Args:
      panels: {panel title: rows as `runtime_bars` takes them}.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (name, rows) in zip(list(axes) if len(panels) > 1 else [axes], panels.items(), strict=True):
        compute = [r["compute_s"] for r in rows]
        exposed = [r["exposed_s"] for r in rows]
        totals = [c + e for c, e in zip(compute, exposed, strict=True)]
        top = 2.5 * sorted(totals)[len(totals) // 2]  # an outlier (FedCyBGD) would flatten every other bar
        ax.bar([r["label"] for r in rows], compute, color="#4c72b0", label="computation")
        ax.bar([r["label"] for r in rows], exposed, bottom=compute, color="#c9a227", label="exposed communication")
        for i, total in enumerate(totals):
            if total > top:
                ax.text(i, top * 0.97, f"{total:.0f}", ha="center", va="top", fontsize=6, rotation=90, color="white")
        ax.set_ylim(0, top)
        ax.set_title(name + " (bars above the axis: total written in them)", fontsize=8)
        ax.tick_params(axis="x", labelsize=6, rotation=90)
    axes_list = list(axes) if len(panels) > 1 else [axes]
    axes_list[0].set_ylabel("modelled seconds, whole run")
    axes_list[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
