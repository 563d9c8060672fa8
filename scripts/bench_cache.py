"""Measures what the persistent compilation cache saves: train.py and eval.py, cold and warm.

Each repeat runs a short `scripts/train.py` (a fresh workdir each time) and `scripts/eval.py` on it,
first with an empty cache directory (cold: every executable is compiled and written) and then again
with the cache that run filled (warm: the executables are loaded), interleaved so that the machine's
load hits both alike. Times are whole-process wall seconds (start-up, compile, the run), so the
difference is the compile time a resumed or repeated run saves.

    python scripts/bench_cache.py --config configs/tiny.py --rounds 3 --repeats 3 [--json]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args()
    times = {(phase, cache): [] for phase in ("train", "eval") for cache in ("cold", "warm")}
    root = tempfile.mkdtemp(prefix="bench_cache_")
    try:
        for i in range(args.repeats):
            cache = os.path.join(root, f"cache{i}")
            for state in ("cold", "warm"):  # the warm run reads what the cold one wrote
                workdir = os.path.join(root, f"run{i}_{state}")
                train = [sys.executable, "scripts/train.py", "--config", args.config, "--workdir", workdir,
                         f"--config.rounds={args.rounds}", f"--config.compilation_cache_dir={cache}"]  # fmt: skip
                times["train", state].append(timed(train))
                times["eval", state].append(timed([sys.executable, "scripts/eval.py", "--workdir", workdir]))
                print(f"repeat {i + 1}/{args.repeats} {state}: train {times['train', state][-1]:.1f} s, "
                      f"eval {times['eval', state][-1]:.1f} s", flush=True)  # fmt: skip
            entries = sum(name.endswith("-cache") for name in os.listdir(cache))  # beside each: its -atime
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = {f"{phase}_{state}_s": statistics.median(v) for (phase, state), v in times.items()}
    for phase in ("train", "eval"):
        cold, warm = summary[f"{phase}_cold_s"], summary[f"{phase}_warm_s"]
        summary[f"{phase}_saved_s"] = cold - warm
        print(f"{phase:>5}.py: cold {cold:6.1f} s, warm {warm:6.1f} s, saved {cold - warm:5.1f} s ({cold / warm:.2f}x)")
    summary["cache_entries"] = entries
    print(f"medians of {args.repeats} interleaved repeats; {entries} executables cached by one run")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
