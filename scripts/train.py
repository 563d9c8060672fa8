"""Federated fine-tuning in one process, resumable: ParaBlock (default) or any of the other seven algorithms.

    python scripts/train.py --config configs/tiny.py --workdir runs/tiny
    python scripts/train.py --config configs/tiny.py --config.algorithm=fedbcd --config.rounds=20 --workdir runs/fedbcd
    python scripts/train.py --config configs/llama3_2_3b.py --workdir runs/llama3_2_3b   # on a GPU box

Rerunning the same command on the same workdir resumes from its newest checkpoint that restores
(a damaged step is set aside in DIR/set_aside/, never deleted), or from --step N.
"""

import argparse
import json
import os

from jaxblock.run import experiment, runtime


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="default: runs/<config name>")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    parser.add_argument(
        "--step", type=int, default=None, help="resume from this checkpoint step (newer ones are set aside)"
    )
    config, args = runtime.parse_args(parser)
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(runtime.config_path()))[0])
    try:
        summary = experiment.train(config, workdir, progress=not args.no_progress, step=args.step)
    except (ValueError, FloatingPointError) as e:
        parser.exit(2, f"error: {e}\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "fed"}, indent=2))


if __name__ == "__main__":
    main()
