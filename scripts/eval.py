"""Evaluates a run from its orbax checkpoint: GSM8K-style exact match and eval loss, base model too.

    python scripts/eval.py --workdir runs/demo            # latest checkpoint
    python scripts/eval.py --workdir runs/demo --step 10  # a given step
    python scripts/eval.py --workdir runs/demo --loss-by-token  # which reference tokens carry the eval loss

Writes DIR/eval.json and prints the figures.
"""

import argparse

from jaxblock.run import experiment


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--no-base", action="store_true", help="skip the base model")
    parser.add_argument("--base", default=None, help="the base model's directory, if it moved since training")
    parser.add_argument(
        "--loss-by-token", action="store_true", help="also list the reference tokens that carry most of the eval loss"
    )
    args = parser.parse_args()
    try:
        experiment.evaluate_run(
            args.workdir, args.step, base=not args.no_base, base_dir=args.base, loss_by_token=args.loss_by_token
        )
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
