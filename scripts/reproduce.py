"""Runs a table of the paper on any config: every cell, over seeds, with the paper's numbers and verdicts.

    python scripts/reproduce.py --config configs/tiny.py --table T5 --seeds 3 --workdir runs/paper
    python scripts/reproduce.py --config configs/tiny.py --table all --seeds 3 --workdir runs/paper

Each cell is an ordinary training run (`scripts/train.py`, then `scripts/eval.py --no-base`) in
`WORKDIR/cells/<name>`, named by its resolved config, so a cell that two tables share runs once. A cell
with an `eval.json` is finished and never rerun; a killed sweep continues where it stopped (the
cell's own run resumes from its checkpoint). Then `WORKDIR/report.md` and `report.json` hold, per
table: each row's mean and standard deviation over seeds of exact match, eval loss and modelled
wall time (`jaxblock.compare`; every client's compute modelled as `--compute-s` per round), its
rank, the paper's number and its rank, and each claim's verdict (`jaxblock.paper` says how noise is
judged); and a runtime plot per table. `--config.KEY=VALUE` overrides apply to every cell.
DP1 and DP2 are ours, not the paper's (differential privacy: each method at each epsilon), and SA1
(secure aggregation, alone and with distributed DP); their report shows the calibrated z and the
epsilon spent where the paper's numbers would be. G1 is ours too (issue 32: ParaBlock vs FedBCD, each
factor of the gap alone: LM head, block size, schedule, self_weight, local learning rate; then
combinations); `all` runs the paper's tables only.

A cell that fails does not stop the sweep: its one-line error goes to `cell_error.txt` in its
workdir and to the report (on its row, if no seed of it finished), and the script exits 1 once the
report is written. A rerun tries the cell again.
"""

import argparse
import ast
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

from jaxblock.run import compare, paper, plots, runtime
from jaxblock.run.config import load_config, split_config_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ATTEMPT = "cell_time.attempt.json"  # a cell's run under way: its script, when it started, the seconds before it
FAILED = "cell_error.txt"  # a cell whose last attempt failed: the one-line error, shown in the report


def carried_seconds(workdir: str) -> dict:
    """The seconds earlier, interrupted attempts at a cell spent, per script: the scripts they
    finished, plus the one that was killed, up to the last file it wrote (so a cell resumed after a
    killed sweep counts all its time, not its last run's)."""
    path = os.path.join(workdir, ATTEMPT)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        attempt = json.load(f)
    seconds = attempt["seconds"]
    last = max(os.path.getmtime(os.path.join(d, n)) for d, _, names in os.walk(workdir) for n in names)
    seconds[attempt["script"]] = seconds.get(attempt["script"], 0.0) + max(0.0, last - attempt["started"])
    return seconds


def run_cell(config_path: str, overrides: list[str], workdir: str, log) -> None:
    """Trains and evaluates one cell, unless its eval.json says it is done; records the seconds it
    took, over every attempt, in `cell_time.json`."""
    if os.path.exists(os.path.join(workdir, "eval.json")):
        log(f"skip {os.path.basename(workdir)}: done")
        return
    clear_error(workdir)  # an earlier attempt's error no longer holds
    flags = [f"--config.{o}" for o in overrides]
    seconds = carried_seconds(workdir)
    os.makedirs(workdir, exist_ok=True)
    for script, extra in (("train.py", ["--no-progress"]), ("eval.py", ["--no-base"])):
        with open(os.path.join(workdir, ATTEMPT), "w") as f:
            json.dump({"script": script, "started": time.time(), "seconds": seconds}, f)
        start = time.perf_counter()
        cmd = [sys.executable, os.path.join(ROOT, "scripts", script), "--workdir", workdir, *extra]
        if script == "train.py":
            cmd[2:2] = ["--config", config_path, *flags]
        log(f"run  {os.path.basename(workdir)}: {script}")
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            lines = (done.stderr or done.stdout).strip().splitlines()
            error = f"{script} exited {done.returncode}" + (f": {lines[-1]}" if lines else "")
            with open(os.path.join(workdir, FAILED), "w") as f:
                f.write(error + "\n")
            raise RuntimeError(f"cell {workdir}: {error}")
        seconds[script] = seconds.get(script, 0.0) + time.perf_counter() - start
    with open(os.path.join(workdir, "cell_time.json"), "w") as f:
        json.dump(seconds, f)
    os.remove(os.path.join(workdir, ATTEMPT))
    log(f"done {os.path.basename(workdir)}: {sum(seconds.values()):.0f} s")


# What a finished cell's report rows are made of (a few tens of KB): --archive keeps these, not checkpoints.
RESULT_FILES = ("config.json", "metrics.jsonl", "eval.json", "cell_time.json", "summary.json")


def archive(workdir: str, to: str) -> None:
    """Copies a finished cell's result files to `to`/<cell name>/ (a directory one can commit)."""
    out = os.path.join(to, os.path.basename(workdir))
    os.makedirs(out, exist_ok=True)
    for name in RESULT_FILES:
        if os.path.exists(os.path.join(workdir, name)):
            shutil.copy2(os.path.join(workdir, name), os.path.join(out, name))


def unarchive(workdir: str, source: str) -> bool:
    """Restores a cell finished elsewhere from `source`/<cell name>/ into an empty workdir; True if it did."""
    kept = os.path.join(source, os.path.basename(workdir))
    if os.path.exists(os.path.join(workdir, "eval.json")) or not os.path.exists(os.path.join(kept, "eval.json")):
        return False
    os.makedirs(workdir, exist_ok=True)
    for name in RESULT_FILES:
        if os.path.exists(os.path.join(kept, name)):
            shutil.copy2(os.path.join(kept, name), os.path.join(workdir, name))
    clear_error(workdir)  # finished elsewhere: a local failure is history
    return True


def cell_seconds(workdir: str) -> float:
    """The machine time a finished cell took: `cell_time.json`, or for a cell run before it existed,
    from its first file (config.json, written at the start) to its eval.json."""
    path = os.path.join(workdir, "cell_time.json")
    if os.path.exists(path):
        with open(path) as f:
            return sum(json.load(f).values())
    return os.path.getmtime(os.path.join(workdir, "eval.json")) - os.path.getmtime(os.path.join(workdir, "config.json"))


def cell_error(workdir: str) -> str:
    """The one-line error of the cell's last attempt, or "" if it has not failed."""
    path = os.path.join(workdir, FAILED)
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read().strip()


def clear_error(workdir: str) -> None:
    if os.path.exists(os.path.join(workdir, FAILED)):
        os.remove(os.path.join(workdir, FAILED))


def command(config_path: str, overrides: list[str], workdir: str) -> str:
    flags = " ".join(f"--config.{o}" for o in overrides)
    return f"python scripts/train.py --config {config_path} {flags} --workdir {workdir}"


def summarize(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def cells(table: paper.Table, config, config_path: str, user: list[str], seeds: list[int], root: str, archive=None):
    """A table's runs: {row label: [(seed, overrides, workdir), ...]} for its rows that exist; a cell
    finished in `archive` (a directory of cells' result files) and not under `root` is named as there."""
    out, default = {}, load_config(config_path, []).to_dict()
    for row in table.rows:
        if row.missing:
            continue
        for seed in seeds:
            resolved = paper.resolve(row.overrides, config.rounds, config.num_clients, seed)
            overrides = [*user, *resolved, f"seed={seed}"]
            cell = load_config(config_path, overrides).to_dict()
            name = paper.find_cell(os.path.join(root, "cells"), cell, config.to_dict(), default)
            if archive and not os.path.exists(os.path.join(root, "cells", name, "eval.json")):
                kept = paper.find_cell(archive, cell, config.to_dict(), default)
                name = kept if os.path.exists(os.path.join(archive, kept, "eval.json")) else name
            out.setdefault(row.label, []).append((seed, overrides, os.path.join(root, "cells", name)))
    return out


def dp_spent(workdir: str) -> dict:
    """A DP cell's calibrated z and the epsilon its run spent (summary.json's `dp`); {} without DP."""
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        dp = json.load(f).get("dp")
    return {"noise_multiplier": dp["noise_multiplier"], "epsilon": dp["epsilon"]} if dp else {}


def run_table(table: paper.Table, runs: dict, config_path: str, args):
    """A table's report, as a dict, from its finished cells."""
    rows = []
    for row in table.rows:
        entry = {"label": row.label, "paper": row.paper, "missing": row.missing, "seeds": [], "commands": [],
                 "failed": []}  # fmt: skip
        rows.append(entry)
        if row.missing:
            continue
        for seed, overrides, workdir in runs[row.label]:
            if not os.path.exists(os.path.join(workdir, "eval.json")):  # failed, or --report-only on a running sweep
                if error := cell_error(workdir):
                    entry["failed"].append({"seed": seed, "workdir": workdir, "error": error})
                continue
            m = {**compare.modeled(workdir, table.link, None, args.compute_s), **compare.score(workdir)}
            with open(os.path.join(workdir, "eval.json")) as f:
                m["n_eval"] = json.load(f)["n"]
            m["cell_s"] = cell_seconds(workdir)
            m.update(dp_spent(workdir))
            entry["seeds"].append({"seed": seed, "workdir": workdir, **m})
            entry["commands"].append(command(config_path, overrides, workdir))
        if not entry["seeds"]:
            entry["missing"] = f"failed: {entry['failed'][0]['error']}" if entry["failed"] else "not run yet"
            continue
        for key in ("exact_match", "eval_loss", "modeled_wall_s", "wall_compute_s", "wall_exposed_s", "mb_up",
                    "cell_s", "noise_multiplier", "epsilon"):  # fmt: skip
            if all(key in s for s in entry["seeds"]):
                entry[key] = summarize([s[key] for s in entry["seeds"]])
    ran = {r["label"]: r for r in rows if r["seeds"]}
    for key, higher in (("exact_match", True), ("modeled_wall_s", False)):
        for label, rank in paper.ranks({k: r[key]["mean"] for k, r in ran.items()}, higher).items():
            ran[label][f"{key}_rank"] = rank
    for key, higher in (("gsm8k", True), ("rt_min", False)):
        known = {r["label"]: r["paper"][key] for r in rows if key in r["paper"]}
        for label, rank in paper.ranks(known, higher).items():
            next(r for r in rows if r["label"] == label)[f"paper_{key}_rank"] = rank
    claims = []
    for claim in table.claims:
        if claim.better not in ran or claim.worse not in ran:
            claims.append({"text": claim.text, "verdict": "missing rows"})
            continue
        key = "exact_match" if claim.metric == "exact_match" else "modeled_wall_s"
        better, worse = ([s[key] for s in ran[label]["seeds"]] for label in (claim.better, claim.worse))
        n_eval = ran[claim.better]["seeds"][0]["n_eval"]
        claims.append({"text": claim.text, **paper.verdict(better, worse, claim.metric, n_eval)})
    private = any(o.startswith(("dp.", "secagg.")) for row in table.rows for o in row.overrides)
    return {"table": table.name, "title": table.title, "link": table.bandwidth, "ours": table.ours, "rows": rows,
            "claims": claims, "private": private}  # fmt: skip


def markdown(report: dict) -> str:
    """One table's report as Markdown."""

    def cell(r, key, fmt):
        if key not in r:
            return "-"
        v = r[key]
        text = f"{fmt(v['mean'])} ± {fmt(v['sd'])}" if v["sd"] else fmt(v["mean"])
        return f"{text} ({r[key + '_rank']})" if key + "_rank" in r else text

    def pct(x):
        return f"{100 * x:.1f}%"

    lines = [
        f"## {report['table']}: {report['title']}",
        "",
        f"Modelled wall time over the link {report['link']} MB/s. (n) = rank among the rows. "
        f"Its cells took {sum(s['cell_s'] for r in report['rows'] for s in r['seeds']) / 60:.0f} min "
        "of this machine's time (train + eval).",
        "",
    ]
    if report.get("ours"):  # our own table: (DP) z and epsilon where the paper's numbers go
        rows = dp_rows if report.get("private", True) else own_rows
        return "\n".join(lines + rows(report, cell, pct) + claims_and_commands(report, "claim (ours)"))
    lines += [
        "| row | seeds | exact match | eval loss | modelled wall s | paper GSM8K | paper runtime (min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        p = r["paper"]
        paper_acc = f"{p['gsm8k']} ({r['paper_gsm8k_rank']})" if "gsm8k" in p else "-"
        paper_rt = f"{p['rt_min']} ({r['paper_rt_min_rank']})" if "rt_min" in p else "-"
        lines.append(_row(r, cell, pct, [paper_acc, paper_rt], [paper_acc, paper_rt]))
    return "\n".join(lines + claims_and_commands(report, "the paper's claim"))


def dp_rows(report: dict, cell, pct) -> list[str]:
    """A DP table's rows: z (calibrated per seed: record level depends on the partition's smallest
    client) and the epsilon spent beside the scores, and the machine's seconds per cell."""
    lines = ["| row | seeds | exact match | eval loss | modelled wall s | z | epsilon spent | machine s per cell |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["rows"]:
        if r["missing"]:
            lines.append(_row(r, cell, pct, [], ["", "", ""]))
            continue
        z, eps = cell(r, "noise_multiplier", lambda x: f"{x:.3f}"), cell(r, "epsilon", lambda x: f"{x:.2f}")
        lines.append(_row(r, cell, pct, [z, eps, cell(r, "cell_s", lambda x: f"{x:.0f}")], []))
    return lines


def own_rows(report: dict, cell, pct) -> list[str]:
    """An own table without privacy (G1): the scores and the machine's seconds per cell."""
    lines = ["| row | seeds | exact match | eval loss | modelled wall s | machine s per cell |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["rows"]:
        tail = [] if r["missing"] else [cell(r, "cell_s", lambda x: f"{x:.0f}")]
        lines.append(_row(r, cell, pct, tail, [""]))
    return lines


def _row(r: dict, cell, pct, tail: list[str], missing_tail: list[str]) -> str:
    """A table row: label, seeds, exact match, eval loss and modelled wall time, then `tail`; a row
    that did not run says why in place of its scores, then `missing_tail`."""
    if r["missing"]:
        why = r["missing"].replace("|", "\\|")  # an error's text must not split the row
        return _cells([r["label"], f"missing: {why}", "", "", "", *missing_tail])
    scores = [cell(r, "exact_match", pct), cell(r, "eval_loss", lambda x: f"{x:.3f}"),
              cell(r, "modeled_wall_s", lambda x: f"{x:.1f}")]  # fmt: skip
    return _cells([r["label"], str(len(r["seeds"])), *scores, *tail])


def _cells(values: list[str]) -> str:
    return "|" + "".join(f" {v} |" if v else " |" for v in values)


def claims_and_commands(report: dict, heading: str) -> list[str]:
    lines = []
    failed = [(r["label"], f) for r in report["rows"] if r["seeds"] for f in r.get("failed", [])]
    if failed:
        lines += [""] + [
            f"Failed, not in the row above: {label}, seed {f['seed']}: {f['error']}" for label, f in failed
        ]
    lines += ["", f"| {heading} | verdict | difference | 2 x standard error |", "|---|---|---|---|"]
    for c in report["claims"]:
        if "diff" in c:
            lines.append(f"| {c['text']} | **{c['verdict']}** | {c['diff']:+.4g} | {2 * c['se']:.4g} |")
        else:
            lines.append(f"| {c['text']} | {c['verdict']} | | |")
    lines += ["", "Commands (one per cell and seed; then `python scripts/eval.py --workdir WORKDIR --no-base`):", "",
              "```bash"]  # fmt: skip
    lines += [cmd for r in report["rows"] for cmd in r["commands"]]
    lines += ["```", ""]
    return lines


def plot(report: dict, path: str) -> None:
    bars = [
        {"label": "\n".join(textwrap.wrap(r["label"], 14)), "compute_s": r["wall_compute_s"]["mean"],
         "exposed_s": r["wall_exposed_s"]["mean"]}
        for r in report["rows"] if r["seeds"]
    ]  # fmt: skip
    if bars:
        link = compare.comm_label(ast.literal_eval(report["link"]))  # T8's ten links: two groups
        title = f"{report['table']}: modelled wall time, mean over seeds\nlinks: {link}"
        plots.runtime_bars(bars, path, title, "seconds, whole run")


FIG2_ALGORITHMS = ("parablock", "fedbcd", "fedcybgd", "fedit")
FIG2_BANDWIDTHS = (50, 100, 150)  # MB/s
FIG2_BATCHES = (2, 4, 8)


def figure2(config, compute_s: float, log) -> dict:
    """The paper's Figure 2, modelled without training: each algorithm's whole-run wall time over
    50/100/150 MB/s at per-client batch 2/4/8. A block's compute per round is `compute_s` (a
    full-model local training at the config's batch) times its step's FLOPs over the full model's
    (XLA's count, so deterministic); bytes and schedule come from the algorithm itself."""
    full = compare.block_flops(config, "fedavg_full")[0]
    results = {}
    for batch in FIG2_BATCHES:
        sized = config.copy_and_resolve_references()
        sized.batch_size = batch
        for name in FIG2_ALGORITHMS:
            round_s = [compute_s * f / full for f in compare.block_flops(sized, name)]
            for bw in FIG2_BANDWIDTHS:
                results[f"{name}/{bw}/{batch}"] = compare.modeled_run(sized, name, bw, round_s)
            log(f"fig2: batch {batch}, {name}: " + ", ".join(
                f"{bw} MB/s {results[f'{name}/{bw}/{batch}']['wall_s']:.1f} s" for bw in FIG2_BANDWIDTHS))  # fmt: skip
    claims = []
    for bw in (50, 100):  # "runtime reduction can exceed 30% at 50 and 100 M/s with ebs 2"
        pb, bcd = results[f"parablock/{bw}/2"]["wall_s"], results[f"fedbcd/{bw}/2"]["wall_s"]
        cut = 1 - pb / bcd
        claims.append({"text": f"ParaBlock's runtime is over 30% below FedBCD's at {bw} MB/s, batch 2",
                       "verdict": "holds" if cut > 0.30 else "does not hold", "diff": cut, "se": 0.0})  # fmt: skip
    return {"table": "fig2", "results": results, "claims": claims}


def figure2_markdown(report: dict) -> str:
    r = report["results"]
    settings = [f"{bw} MB/s, batch {b}" for b in FIG2_BATCHES for bw in FIG2_BANDWIDTHS]
    lines = ["## fig2: modelled runtime over bandwidth and batch (the paper's Figure 2)", "",
             "Whole-run modelled wall time in seconds (compute + exposed communication); no training.", "",
             "| algorithm | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]  # fmt: skip
    for name in FIG2_ALGORITHMS:
        cells = [f"{r[f'{name}/{bw}/{b}']['wall_s']:.1f}" for b in FIG2_BATCHES for bw in FIG2_BANDWIDTHS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| the paper's claim | verdict | ParaBlock's cut |", "|---|---|---|"]
    lines += [f"| {c['text']} | **{c['verdict']}** | {c['diff']:.0%} |" for c in report["claims"]]
    return "\n".join(lines) + "\n"


FIG2_NAMES = {"parablock": "ParaBlock", "fedbcd": "FedBCD", "fedcybgd": "FedCyBGD", "fedit": "FedIT"}


def plot_figure2(report: dict, path: str) -> None:
    """A panel per batch (rows) and link (columns), a bar per algorithm: four labels a panel."""
    r = report["results"]
    panels = {
        f"batch {b}, {bw} MB/s": [{"label": FIG2_NAMES[name], "compute_s": r[f"{name}/{bw}/{b}"]["compute_s"],
                                   "exposed_s": r[f"{name}/{bw}/{b}"]["exposed_s"]} for name in FIG2_ALGORITHMS]
        for b in FIG2_BATCHES for bw in FIG2_BANDWIDTHS
    }  # fmt: skip
    plots.figure2(panels, path, "Modelled whole-run wall time (the paper's Figure 2)", columns=len(FIG2_BANDWIDTHS))


def say(line: str) -> None:
    """Prints one whole line (cells run on threads)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--table",
        required=True,
        help=f"{', '.join(paper.ORDER)}, fig2 or all (the paper's tables; DP1, DP2, SA1, G1 are ours)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell: the config's seed, +1, ...")
    parser.add_argument("--workdir", default="runs/paper", help="one subdirectory per cell")
    parser.add_argument("--compute-s", type=float, default=0.6, help="every client's modelled compute per round")
    parser.add_argument("--jobs", type=int, default=1, help="cells trained at once (each is its own process)")
    parser.add_argument("--report-only", action="store_true", help="report the finished cells; train nothing")
    parser.add_argument("--rows", default="", help="a regex: train only the rows whose label matches (e.g. '\\(d\\)')")
    parser.add_argument(
        "--archive", default=None, help="a directory of finished cells' result files: read before, written after each"
    )
    config, args = runtime.parse_args(parser)
    paper_tables = [n for n in paper.ORDER if not paper.TABLES[n].ours]  # `all`: the paper's, as before
    names = [*paper_tables, "fig2"] if args.table == "all" else [args.table]
    unknown = [n for n in names if n not in paper.TABLES and n != "fig2"]
    if unknown:
        parser.error(f"--table {args.table}: choose {', '.join(paper.ORDER)}, fig2 or all")
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be >= 1")
    try:
        re.compile(args.rows)
    except re.error as e:
        parser.error(f"--rows {args.rows!r}: not a regular expression ({e})")
    config_path, user, _ = split_config_args(sys.argv[1:])
    seeds = [config.seed + i for i in range(args.seeds)]
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, "report.json")
    reports = {}
    if os.path.exists(path):
        with open(path) as f:
            reports = json.load(f)["tables"]
    runs = {
        n: cells(paper.TABLES[n], config, config_path, user, seeds, args.workdir, args.archive)
        for n in names
        if n != "fig2"
    }
    todo = {workdir: overrides for r in runs.values() for cell in r.values() for _, overrides, workdir in cell}
    if args.archive:
        restored = sum(unarchive(w, args.archive) for w in todo)
        say(f"{restored} finished cells restored from {args.archive}")
    say(f"{len(todo)} cells, {sum(os.path.exists(os.path.join(w, 'eval.json')) for w in todo)} done")
    cells_in_all = len(todo)
    if args.report_only:
        todo = {w: o for w, o in todo.items() if os.path.exists(os.path.join(w, "eval.json"))}
    elif args.rows:  # train only these rows' cells; the report still lists every row (the rest: what is done)
        chosen = {w for r in runs.values() for label, cell in r.items() if re.search(args.rows, label)
                  for _, _, w in cell}  # fmt: skip
        todo = {w: o for w, o in todo.items() if w in chosen or os.path.exists(os.path.join(w, "eval.json"))}

    failed = []

    def one(w: str) -> None:
        try:
            run_cell(config_path, todo[w], w, say)
        except RuntimeError as e:  # the sweep goes on; the report names the failure, and the exit code
            say(f"error: {e}")
            failed.append(str(e))
            return
        if args.archive:
            archive(w, args.archive)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))
    finished = [w for w in todo if os.path.exists(os.path.join(w, "eval.json"))]
    machine_s = sum(cell_seconds(w) for w in finished)
    for name in names:
        png = os.path.join(args.workdir, f"{name}_runtime.png")
        if name == "fig2":
            reports[name] = figure2(config, args.compute_s, say)
            plot_figure2(reports[name], png)
        else:
            reports[name] = run_table(paper.TABLES[name], runs[name], config_path, args)
            plot(reports[name], png)
        ordered = {n: reports[n] for n in [*paper.ORDER, "fig2"] if n in reports}
        with open(path, "w") as f:
            json.dump({"config": config_path, "overrides": user, "tables": ordered}, f, indent=1)
        with open(os.path.join(args.workdir, "report.md"), "w") as f:
            f.write(f"# The paper's tables on `{config_path}` {' '.join(user)}\n\n")
            f.write(f"{len(finished)} of {cells_in_all} distinct cells finished ({args.seeds} seeds each), "
                    f"{machine_s / 3600:.1f} h of machine time in all "
                    "(train + eval, summed over them).\n\n")  # fmt: skip
            f.write(paper.__doc__.split("Noise:")[1].strip().join(["Noise: ", "\n\n"]))
            f.writelines((figure2_markdown(r) if n == "fig2" else markdown(r)) + "\n" for n, r in ordered.items())
        print(f"{name}: " + "; ".join(f"{c['text']}: {c['verdict']}" for c in reports[name]["claims"]))
    print(f"report: {os.path.join(args.workdir, 'report.md')}")
    if failed:
        parser.exit(1, f"error: {len(failed)} cell{'s' if len(failed) > 1 else ''} failed; the first: {failed[0]}\n")


if __name__ == "__main__":
    main()
