"""`make demo`: federated ParaBlock fine-tuning of the bundled tiny model, evaluated from its checkpoint.

    python scripts/demo.py --config configs/tiny.py --workdir runs/demo

Trains (10 clients, Dirichlet(0.6) over the problem source), then evaluates the base model and
the fine-tuned one restored from the orbax checkpoint on the held-out split, prints a table and
writes it to WORKDIR/summary.json.
"""

import argparse
import json
import os
import shutil

from jaxblock.run import experiment, runtime


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo", help="the run directory (train, then evaluate)")
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first")
    config, args = runtime.parse_args(parser)
    if args.fresh and os.path.isdir(args.workdir):
        shutil.rmtree(args.workdir)
    try:
        train = experiment.train(config, args.workdir)
        result = experiment.evaluate_run(args.workdir)
    except (ValueError, FloatingPointError) as e:
        parser.exit(2, f"error: {e}\n")
    summary = {
        **train,
        "algorithm": train["algorithm"],
        "rounds": train["rounds"],
        "wall_s": train["wall_s"],
        "base_exact_match": result["base"]["exact_match"],
        "exact_match": result["finetuned"]["exact_match"],
        "base_eval_loss": result["base"]["eval_loss"],
        "eval_loss": result["finetuned"]["eval_loss"],
        "eval_examples": result["n"],
    }
    with open(os.path.join(args.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    rows = [
        ("algorithm", summary["algorithm"]),
        ("rounds", summary["rounds"]),
        ("wall seconds (training)", f"{summary['wall_s']:.0f}"),
        ("base exact match", f"{summary['base_exact_match']:.1%}"),
        ("fine-tuned exact match", f"{summary['exact_match']:.1%}"),
        ("eval loss (base -> fine-tuned)", f"{summary['base_eval_loss']:.3f} -> {summary['eval_loss']:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"\nheld-out problems: {result['n']}; written to {os.path.join(args.workdir, 'summary.json')}")
    with open(os.path.join(args.workdir, "predictions_finetuned.jsonl")) as f:
        records = [json.loads(line) for line in f]
    for label, want in (("a right answer", True), ("a wrong answer", False)):  # one of each, labelled
        r = next((r for r in records if r["correct"] is want), None)
        if r is not None:
            print(f"{label}: {r['question']!r} -> {r['output']!r} (gold {r['gold']:g})")
    print(f"every answer: {os.path.join(args.workdir, 'predictions_finetuned.jsonl')}")


if __name__ == "__main__":
    main()
