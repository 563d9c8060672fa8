"""The server process: plans rounds, aggregates uploads through a shared store.

Runs ParaBlock, FedBCD, Fed full FT, FedIT and FFA-LoRA (FLoRA runs in the simulator: train.py).

    python scripts/server.py --config configs/tiny.py --store file:///tmp/run/store --workdir runs/server
    python scripts/client.py --config configs/tiny.py --store file:///tmp/run/store --client-id 0   # one per client

If a client sends nothing for --config.comm.timeout_s seconds, the server stops with an error
naming it; its checkpoints (after each aggregation) stay in the workdir.
"""

import argparse
import json

from jaxblock import experiment, runtime


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--store", default=None, help="kvstore URL shared with the clients (default: config.comm.store)"
    )
    parser.add_argument("--workdir", default="runs/server")
    config, args = runtime.parse_args(parser)
    try:
        summary = experiment.serve(config, args.workdir, args.store)
    except ValueError as e:  # the user's config, data or files
        parser.exit(2, f"error: {e}\n")
    except (TimeoutError, FloatingPointError, RuntimeError) as e:  # the run itself failed
        parser.exit(1, f"error: {e}\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
