"""Compares the six algorithms on one config: what trains, its memory, its wire traffic, its score.

For each algorithm, from XLA's static analysis of one compiled local step (no training needed):
trainable parameters per round, AdamW state bytes, XLA temp bytes of the step (and its total:
arguments + outputs + temp, i.e. weights, batch, optimizer state and activations), and the values a
client sends up and receives down per round, as float32 bytes (the link model counts the same
values at `wire_dtype`). FLoRA's sizes are client 0's rank unless `lora.client_ranks` is empty.
For the block methods each figure is given for the block the most memory needs (block 0: its
backward runs through every layer above it) and as the mean over blocks where it varies. With
`--runs ALG=WORKDIR ...` it adds each run's exact match and eval loss from its eval.json.

    python scripts/bench_algorithms.py --config configs/tiny.py \
        --runs parablock=runs/parablock fedit=runs/fedit ...
"""

import argparse
import json
import os

import numpy as np

from jaxblock.fed import algorithms
from jaxblock.run import compare, runtime

ORDER = ("parablock", "fedbcd", "fedavg_full", "fedit", "ffa_lora", "flora", "fedcybgd", "fedbuff")


def costs(config, name: str) -> dict:
    algo, part, steps = compare.block_costs(config, name)
    clients = algo.participants(runtime.fed_config(config), 0)
    rows = []
    for b, step in enumerate(steps):
        up, down = algo.wire_params(part, b, clients, 0)
        down = sum(down.values()) if isinstance(down, dict) else down  # FedCyBGD: the turn's client only
        total = step["argument_bytes"] + step["output_bytes"] + step["temp_bytes"]
        rows.append({"trainable": part.blocks[b].params, **step, "total_bytes": total, "up": float(np.mean(up)) * 4,
                     "down": down * 4})  # fmt: skip
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return {"first": rows[0], "mean": mean, "blocks": part.num_blocks}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=[], help="ALG=WORKDIR: exact match, eval loss from eval.json")
    parser.add_argument("--only", default=",".join(ORDER), help="comma-separated algorithms (default: all)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    config, args = runtime.parse_args(parser)
    runs = dict(item.split("=", 1) for item in args.runs)
    unknown = set(runs) - set(algorithms.NAMES)
    if unknown:
        parser.error(f"--runs: unknown algorithms {sorted(unknown)}")
    mb = 2**20
    head = (
        f"{'algorithm':<12} {'trainable':>11} {'opt state MB':>13} {'XLA temp MB':>12} {'step total MB':>14} "
        f"{'up MB/round':>12} {'down MB/round':>14} {'exact match':>12} {'eval loss':>10}"
    )
    print(f"config: {config.model.num_layers} layers, batch {config.batch_size} x {config.seq_len}, "
          f"{config.num_clients} clients, lora rank {config.lora.rank} on {list(config.lora.targets)}")  # fmt: skip
    print(head)
    summary = {}
    only = args.only.split(",")
    if set(only) - set(ORDER):
        parser.error(f"--only: unknown algorithms {sorted(set(only) - set(ORDER))}")
    computed = {}
    for name in [n for n in ORDER if n in only]:
        # FedBCD's local step and wire are ParaBlock's (they differ only in when the server merges)
        c = computed["parablock"] if name == "fedbcd" and "parablock" in computed else costs(config, name)
        computed[name] = c
        f, m = c["first"], c["mean"]
        score = {}
        if name in runs:
            with open(os.path.join(runs[name], "eval.json")) as fh:
                e = json.load(fh)
            score = {"exact_match": e["finetuned"]["exact_match"], "eval_loss": e["finetuned"]["eval_loss"],
                     "base_exact_match": e.get("base", {}).get("exact_match")}  # fmt: skip
        em = f"{score['exact_match']:.1%}" if score else "-"
        loss = f"{score['eval_loss']:.3f}" if score else "-"
        varies = c["blocks"] > 1
        print(
            f"{name:<12} {f['trainable']:>11,} {f['opt_state_bytes'] / mb:>13.2f} {f['temp_bytes'] / mb:>12.2f} "
            f"{f['total_bytes'] / mb:>14.2f} "
            f"{m['up'] / mb:>12.3f} {m['down'] / mb:>14.3f} {em:>12} {loss:>10}"
            + (
                f"   (block 0; mean over {c['blocks']} blocks: {m['trainable']:,.0f} trainable, "
                f"{m['temp_bytes'] / mb:.2f} MB temp)"
                if varies
                else ""
            )  # fmt: skip
        )
        summary[name] = {"block0": f, "mean": m, "blocks": c["blocks"], **score}
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
