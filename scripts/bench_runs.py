"""Compares finished runs: exact match, eval loss, modelled wall time and bytes on the wire.

Each WORKDIR is a finished `scripts/train.py` run evaluated by `scripts/eval.py`. The modelled wall
time replays the run's `metrics.jsonl` through the link model (`comm.modeled_timeline`): per round
the slowest client's compute plus its exposed communication, summed over rounds (clients train in
parallel; a FedCyBGD turn has one client working). `--bandwidth` re-models every run over other
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
compute and communication add up).
"""

import argparse
import ast
import json
import os

from jaxblock import comm, experiment, plots, runtime, transport
from jaxblock.config import model_config

MB = 1e6


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def modeled(workdir: str, bandwidth=None, latency=None, compute_s: float | None = None) -> dict:
    """Modelled wall, compute and exposed seconds and per-client MB up/down of a run's metrics.

    compute_s: every participant's compute per round, in place of the measured one (runs made on a
    shared machine at different times compare only in their communication then).
    """
    config = experiment.read_config(workdir)
    fed = runtime.fed_config(config)
    history = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if compute_s is not None and "modeled_time_s" not in history[-1]:
        history = [{**m, "client_compute_s": {c: compute_s for c in m["clients"]}} for m in history]
    if "modeled_time_s" in history[-1] or bandwidth is None:  # the run's own links
        bandwidth, latency = config.comm.bandwidth_mbps, config.comm.latency_ms
    links = [transport.link_for(c, bandwidth, latency) for c in range(fed.num_clients)]
    partition = runtime.make_partition(config, model_config(config))
    rows = []
    for i in range(len(history)):
        rows += comm.modeled_timeline(fed, partition, links, history[: i + 1])
    slowest: dict = {}  # round -> the row of its slowest client
    for r in rows:
        if r["compute_s"] + r["exposed_wait_s"] >= sum(slowest.get(r["round"], (0.0, 0.0))):
            slowest[r["round"]] = (r["compute_s"], r["exposed_wait_s"])
    wall_compute, wall_exposed = (sum(column) for column in zip(*slowest.values(), strict=True))
    if "modeled_time_s" in history[-1]:  # FedBuff: its clock, split as its clients' time adds up
        clock, busy = history[-1]["modeled_time_s"], sum(r["compute_s"] for r in rows)
        share = busy / (busy + sum(r["exposed_wait_s"] for r in rows))
        wall_compute, wall_exposed = clock * share, clock * (1 - share)
    n = fed.num_clients
    return {
        "algorithm": fed.algorithm,
        "rounds": len(history),
        "trainings": sum(len(m["clients"]) for m in history),
        "modeled_wall_s": float(wall_compute + wall_exposed),
        "wall_compute_s": float(wall_compute),
        "wall_exposed_s": float(wall_exposed),
        "compute_s": sum(r["compute_s"] for r in rows) / n,
        "exposed_s": sum(r["exposed_wait_s"] for r in rows) / n,
        "mb_up": sum(r["bytes_up"] for r in rows) / n / MB,
        "mb_down": sum(r["bytes_down"] for r in rows) / n / MB,
        "link": comm_label(bandwidth),
    }


def comm_label(bandwidth) -> str:
    if isinstance(bandwidth, (list, tuple)):
        return "per client " + ",".join(f"{b:g}" if isinstance(b, (int, float)) else str(b) for b in bandwidth)
    if isinstance(bandwidth, (int, float)):
        return f"{bandwidth:g} MB/s"
    return "unlimited" if bandwidth is None else str(bandwidth)


def score(workdir: str) -> dict:
    path = os.path.join(workdir, "eval.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        e = json.load(f)["finetuned"]
    return {"exact_match": e["exact_match"], "eval_loss": e["eval_loss"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=WORKDIR of finished, evaluated runs")
    parser.add_argument("--bandwidth", help="re-model every run over this link: MB/s, a preset or a per-client list")
    parser.add_argument("--latency", help="per-transfer latency in ms (a number or a per-client list)")
    parser.add_argument("--compute-s", type=float, help="model each participant's compute per round as this")
    parser.add_argument("--plot", help="a PNG: the runs' modelled wall time, compute vs exposed communication")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args()
    parse = lambda v: None if v is None else (ast.literal_eval(v) if v[:1] in "[0123456789." else v)  # noqa: E731
    bandwidth, latency = parse(args.bandwidth), parse(args.latency)
    summary = {}
    print(f"{'run':<20} {'algorithm':<10} {'exact match':>11} {'eval loss':>9} {'rounds':>6} {'trainings':>9} "
          f"{'modelled wall s':>15} {'compute s':>9} {'exposed s':>9} {'MB up':>8} {'MB down':>8}  link")  # fmt: skip
    for item in args.runs:
        name, workdir = item.split("=", 1)
        m = {**modeled(workdir, bandwidth, latency, args.compute_s), **score(workdir)}
        em = f"{m['exact_match']:.1%}" if "exact_match" in m else "-"
        loss = f"{m['eval_loss']:.3f}" if "eval_loss" in m else "-"
        print(f"{name:<20} {m['algorithm']:<10} {em:>11} {loss:>9} {m['rounds']:>6} {m['trainings']:>9} "
              f"{m['modeled_wall_s']:>15.1f} {m['compute_s']:>9.1f} {m['exposed_s']:>9.1f} {m['mb_up']:>8.1f} "
              f"{m['mb_down']:>8.1f}  {m['link']}")  # fmt: skip
        summary[name] = m
    if args.plot:
        link = comm_label(bandwidth) if bandwidth is not None else next(iter(summary.values()))["link"]
        bars = [
            {"label": f"{name}\n{m['algorithm']}" + ("" if m["link"] == link else f"\n(its own {m['link']})"),
             "compute_s": m["wall_compute_s"], "exposed_s": m["wall_exposed_s"]}
            for name, m in summary.items()
        ]  # fmt: skip
        plots.runtime_bars(bars, args.plot, f"Modelled wall time of the whole run (link: {link})", "seconds")
        print(f"plot: {args.plot}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
