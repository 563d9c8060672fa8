"""ParaBlock vs FedBCD on one config and seed: final train loss, its gap, and held-out exact match.

    python scripts/bench_parity.py --config configs/tiny.py --workdir runs/parity
    python scripts/bench_parity.py --config configs/tiny.py --config.optimizer.learning_rate=5e-4 --workdir runs/p5e-4

Runs (or resumes) WORKDIR/parablock and WORKDIR/fedbcd one after the other, with the config's
settings and seed, then prints each final train loss (the server model's mean loss over every
client's first 8 batches), their absolute and relative gap, the round at which each run's
training loss first fell below a few levels, and (unless --no-eval) exact match on the held-out split.
"""

import argparse
import json
import os

from jaxblock.run import experiment, runtime

ALGORITHMS = ("parablock", "fedbcd")


def first_round_below(rows: list[dict], level: float) -> int | None:
    """The first round whose mean local training loss (metrics.jsonl rows) is below `level`, or None."""
    return next((row["round"] for row in rows if row["loss"] < level), None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/parity")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out exact match")
    config, args = runtime.parse_args(parser)
    results = {}
    try:
        for algorithm in ALGORITHMS:
            config.algorithm = algorithm
            workdir = os.path.join(args.workdir, algorithm)
            summary = experiment.train(config, workdir)
            em = None if args.no_eval else experiment.evaluate_run(workdir, base=False)["finetuned"]["exact_match"]
            results[algorithm] = {"loss": summary["final_train_loss"], "wall_s": summary["wall_s"], "em": em}
    except (ValueError, FloatingPointError) as e:
        parser.exit(2, f"error: {e}\n")
    p, f = results["parablock"]["loss"], results["fedbcd"]["loss"]
    levels = [level for level in (1.0, 0.3, 0.1, 0.03, 0.01) if level > min(p, f)]
    below_header = ("   first round with loss below " + " / ".join(f"{lv:g}" for lv in levels)) if levels else ""
    print(f"\n{'algorithm':<10} {'final train loss':>16} {'exact match':>11} {'wall s':>7}{below_header}")
    for algorithm in ALGORITHMS:
        r = results[algorithm]
        em = "-" if r["em"] is None else f"{r['em']:.1%}"
        with open(os.path.join(args.workdir, algorithm, "metrics.jsonl")) as fh:  # read once, not per level
            rows = [json.loads(line) for line in fh]
        rounds = [first_round_below(rows, lv) for lv in levels]
        below = ("   " + " / ".join(map(str, rounds))) if levels else ""
        print(f"{algorithm:<10} {r['loss']:>16.4f} {em:>11} {r['wall_s']:>7.0f}{below}")
    gap = abs(p - f) / min(p, f)
    print(f"final train loss: |ParaBlock - FedBCD| = {abs(p - f):.4f} nats, {gap:.1%} of the smaller")
    with open(os.path.join(args.workdir, "parity.json"), "w") as fh:
        json.dump({**results, "abs_gap": abs(p - f), "rel_gap": gap}, fh, indent=2)


if __name__ == "__main__":
    main()
