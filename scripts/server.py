"""The server process: plans rounds, aggregates uploads through a shared store.

Runs every round-based algorithm (ParaBlock, FedBCD, Fed full FT, FedIT, FFA-LoRA, FLoRA, FedCyBGD).

    python scripts/server.py --config configs/tiny.py --store file:///tmp/run/store --workdir runs/server
    python scripts/client.py --config configs/tiny.py --store file:///tmp/run/store --client-id 0   # one per client

A client silent for --config.comm.timeout_s after a round's first update is left out of that round
(fewer than comm.min_clients stop the run); every upload is validated before it is merged, and
with --config.comm.keys=keys/server (scripts/keys.py) only signed ones are accepted. Rerunning
the same command after a crash resumes from the workdir's newest checkpoint on the same store.
"""

import argparse
import json

from jaxblock.run import experiment, runtime


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--store",
        default=None,
        help="kvstore URL or TensorStore kvstore spec (JSON, or @file) shared with the clients "
        "(default: config.comm.store)",
    )
    parser.add_argument("--workdir", default="runs/server", help="checkpoints, metrics.jsonl, summary.json")
    config, args = runtime.parse_args(parser)
    try:
        runtime.check_dir_arg(args.workdir, "--workdir")
        summary = experiment.serve(config, args.workdir, args.store)
    except ValueError as e:  # the user's config, data or files
        parser.exit(2, f"error: {e}\n")
    except (TimeoutError, FloatingPointError, RuntimeError) as e:  # the run itself failed
        parser.exit(1, f"error: {e}\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
