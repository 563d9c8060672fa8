"""Runtime plots in the style of the paper's Figure 2 (compute vs exposed communication, stacked), and
exact match against modelled wall time, one line per run."""

from __future__ import annotations

import math
import textwrap

COMPUTE, EXPOSED = "#4c72b0", "#c9a227"
OUTLIER = 4.0  # a bar over this many times the median is cut at the axis (its total written in it)


def _pyplot():
    """(pyplot, the legend's handles), imported when a figure is drawn: matplotlib costs ~0.5 s at
    startup, which a process that never plots (a client, a refused command) should not pay."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    return plt, [Patch(color=COMPUTE, label="computation"), Patch(color=EXPOSED, label="exposed communication")]


def runtime_bars(rows: list[dict], path: str, title: str, ylabel: str = "seconds") -> None:
    """Stacked bars, one per row: `compute_s` below, `exposed_s` (waiting on the network) above, each
    bar's total written over it.

    Args:
      rows: dicts with `label` (e.g. 'ParaBlock\\n100 MB/s'), `compute_s` and `exposed_s`, in seconds.
      ylabel: what the seconds are (e.g. 'seconds, whole run').
    """
    width = max(4.5, 1.1 * len(rows))
    plt, legend = _pyplot()
    fig, ax = plt.subplots(figsize=(width, 4.0), layout="constrained")
    _stacked(ax, rows)
    ax.set_ylabel(ylabel)
    ax.set_title(_wrap(title, int(13 * width)), fontsize=10)  # never wider than the figure
    fig.legend(handles=legend, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure2(panels: dict[str, list[dict]], path: str, title: str, columns: int = 3) -> None:
    """The paper's Figure 2: one panel per setting (e.g. link and batch size), stacked compute /
    exposed bars, `columns` panels a row, one legend for all.

    Args:
      panels: {panel title: rows as `runtime_bars` takes them}.
    """
    columns = min(columns, len(panels))
    nrows = math.ceil(len(panels) / columns)
    bars = max(len(rows) for rows in panels.values())
    plt, legend = _pyplot()
    fig, axes = plt.subplots(
        nrows, columns, figsize=(columns * max(3.2, 0.8 * bars), 2.7 * nrows + 0.8), layout="constrained", squeeze=False
    )
    for i, (name, rows) in enumerate(panels.items()):
        ax = axes[i // columns][i % columns]
        _stacked(ax, rows)
        ax.set_title(name, fontsize=9)
        if i % columns == 0:
            ax.set_ylabel("modelled seconds, whole run", fontsize=8)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.legend(handles=legend, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_curves(curves: list[dict], path: str, title: str) -> None:
    """Exact match against modelled wall time, one line per run (its evaluations during training).

    Args:
      curves: dicts with `label` (e.g. 'pb (parablock)') and `points`: [(modelled seconds, exact
        match in [0, 1]), ...] in the run's order.
    """
    plt, _ = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0), layout="constrained")
    for curve in curves:
        seconds, em = zip(*curve["points"], strict=True)
        ax.plot(seconds, [100 * x for x in em], marker="o", markersize=3, label=curve["label"])
    ax.set_xlabel("modelled wall time, seconds")
    ax.set_ylabel("exact match, %")
    ax.set_ylim(bottom=0)
    ax.set_title(_wrap(title, 70), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _wrap(text: str, width: int) -> str:
    """`text` in lines of at most `width` characters, a figure and its unit ("2 MB/s") on one line."""
    lines = [w for line in text.replace(" MB/s", "\u00a0MB/s").splitlines() for w in textwrap.wrap(line, width)]
    return "\n".join(lines).replace("\u00a0", " ")


def _stacked(ax, rows: list[dict]) -> None:
    """Draws `rows` as stacked bars on `ax`, labels horizontal (wrapped), totals over the bars. A bar
    over `OUTLIER` x the median total (FedCyBGD's sequential turns) would flatten every other bar:
    the axis stops above the others and the cut bar's total is written in it, marked "cut"."""
    labels = [r["label"] if "\n" in r["label"] else "\n".join(textwrap.wrap(r["label"], 12)) for r in rows]
    compute = [r["compute_s"] for r in rows]
    exposed = [r["exposed_s"] for r in rows]
    totals = [c + e for c, e in zip(compute, exposed, strict=True)]
    median = sorted(totals)[len(totals) // 2]
    cut = [len(rows) > 2 and t > OUTLIER * median > 0 for t in totals]
    shown = max([t for t, c in zip(totals, cut, strict=True) if not c] or [1.0])
    top = 1.3 * shown if any(cut) else 1.2 * max(totals or [1.0])
    x = range(len(rows))
    ax.bar(x, compute, color=COMPUTE)
    ax.bar(x, exposed, bottom=compute, color=EXPOSED)
    for i, (total, is_cut) in enumerate(zip(totals, cut, strict=True)):
        text = f"{total:.3g}" if total < 10 else f"{total:.1f}" if total < 1000 else f"{total:.0f}"  # as the tables
        if is_cut:
            ax.text(i, 0.97 * top, f"{text}\n(cut)", ha="center", va="top", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0})  # fmt: skip
        else:
            ax.text(i, total + 0.01 * top, text, ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, top)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
