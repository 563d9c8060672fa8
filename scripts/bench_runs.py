"""Compares finished runs: exact match, eval loss, modelled wall time and bytes on the wire.

Each WORKDIR is a finished `scripts/train.py` run evaluated by `scripts/eval.py`. The modelled wall
time replays the run's `metrics.jsonl` through the link model (`timeline.modeled_timeline`): per round
the slowest client's compute plus its exposed communication, summed over rounds and ParaBlock's final
flush (clients train in parallel; a FedCyBGD turn has one client working); the table's "compute s"
and "exposed s" are that sum's two parts, as `--plot` draws them. MB up and down are a client's whole
run (the flush's last upload included), mean over clients. `--bandwidth` re-models every run over other
links (a number in MB/s, a preset such as 100MBps, or a list with one value per client), so that
runs trained with one link can be compared over another: training never depends on the link.
`--compute-s` replaces the measured compute (clients run one after another in the simulator, on a
machine that other jobs may share) by one figure per client per round, so that runs compare in
their communication alone.
FedBuff's clock is modelled while it trains (its arrival order depends on it), so it is always
reported over the run's own links.

    python scripts/bench_runs.py --runs parablock=runs/i13/parablock fedcybgd=runs/i13/fedcybgd \
        --bandwidth 100 [--plot runs/i13/wall.png] [--json]

`--plot` draws the paper's Figure 2 for these runs: per run, its modelled wall time split into the
slowest client's compute and its exposed communication (FedBuff: its clock, split as its clients'
compute and communication add up). `--accuracy-plot` draws exact match against modelled wall time,
one line per run, from the evaluations made while it trained (`--config.eval.every=N`; the links
and compute as the table's), ending at the final model's.

    python scripts/bench_runs.py --runs parablock=runs/pb fedbcd=runs/bcd --accuracy-plot runs/em_vs_wall.png
"""

import argparse
import ast
import json
import os

from jaxblock.run import plots
from jaxblock.run.compare import comm_label, eval_curve, modeled, score


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=WORKDIR of finished, evaluated runs")
    parser.add_argument("--bandwidth", help="re-model every run over this link: MB/s, a preset or a per-client list")
    parser.add_argument("--latency", help="per-transfer latency in ms (a number or a per-client list)")
    parser.add_argument("--compute-s", type=float, help="model each participant's compute per round as this")
    parser.add_argument("--plot", help="a PNG: the runs' modelled wall time, compute vs exposed communication")
    parser.add_argument("--accuracy-plot", help="a PNG: exact match vs modelled wall time (runs with eval.every)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args()
    runs = []
    for item in args.runs:  # every run checked before any is read: one line, exit 2, as eval.py
        name, _, workdir = item.partition("=")
        if not name or not workdir:
            parser.exit(2, f"error: --runs {item}: give NAME=WORKDIR (e.g. parablock=runs/tiny)\n")
        if not os.path.isfile(os.path.join(workdir, "config.json")):
            parser.exit(2, f"error: --runs {item}: {workdir} is not a jaxblock run directory (no config.json)\n")
        runs.append((name, workdir))
    parse = lambda v: None if v is None else (ast.literal_eval(v) if v[:1] in "[0123456789." else v)  # noqa: E731
    bandwidth, latency = parse(args.bandwidth), parse(args.latency)
    curves = {}
    for name, workdir in runs if args.accuracy_plot else []:
        curves[name] = eval_curve(workdir, bandwidth, latency, args.compute_s)
        if not curves[name]:
            parser.exit(2, f"error: --accuracy-plot: run {name} ({workdir}) has no evaluations in its metrics.jsonl "
                           "(train it with --config.eval.every=N)\n")  # fmt: skip
    summary = {}
    print(
        "modelled wall s = compute s + exposed s: per round (and the final flush) the slowest client's\n"
        "compute and exposed communication, summed (FedBuff: its clock). MB up, MB down: a client's whole run."
    )
    print(f"{'run':<20} {'algorithm':<10} {'exact match':>11} {'eval loss':>9} {'rounds':>6} {'trainings':>9} "
          f"{'modelled wall s':>15} {'compute s':>9} {'exposed s':>9} {'MB up':>8} {'MB down':>8}  link")  # fmt: skip
    for name, workdir in runs:
        m = {**modeled(workdir, bandwidth, latency, args.compute_s), **score(workdir)}
        em = f"{m['exact_match']:.1%}" if "exact_match" in m else "-"
        loss = f"{m['eval_loss']:.3f}" if "eval_loss" in m else "-"
        print(f"{name:<20} {m['algorithm']:<10} {em:>11} {loss:>9} {m['rounds']:>6} {m['trainings']:>9} "
              f"{m['modeled_wall_s']:>15.1f} {m['wall_compute_s']:>9.1f} {m['wall_exposed_s']:>9.1f} "
              f"{m['mb_up']:>8.1f} {m['mb_down']:>8.1f}  {m['link']}")  # fmt: skip
        summary[name] = m
    if args.plot:
        link = comm_label(bandwidth) if bandwidth is not None else next(iter(summary.values()))["link"]
        bars = [
            {"label": f"{name}\n{m['algorithm']}" + ("" if m["link"] == link else f"\n(its own {m['link']})"),
             "compute_s": m["wall_compute_s"], "exposed_s": m["wall_exposed_s"]}
            for name, m in summary.items()
        ]  # fmt: skip
        plots.runtime_bars(
            bars, args.plot, f"Modelled wall time of the whole run (links: {link})", "seconds, whole run"
        )
        print(f"plot: {args.plot}")
    if args.accuracy_plot:
        link = comm_label(bandwidth) if bandwidth is not None else next(iter(summary.values()))["link"]
        lines = [
            {"label": name if name == summary[name]["algorithm"] else f"{name} ({summary[name]['algorithm']})",
             "points": [(p["modeled_wall_s"], p["exact_match"]) for p in points]}
            for name, points in curves.items()
        ]  # fmt: skip
        plots.accuracy_curves(lines, args.accuracy_plot, f"Exact match vs modelled wall time (links: {link})")
        print(f"accuracy plot: {args.accuracy_plot}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
