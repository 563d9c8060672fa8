"""A client process: trains its block each round, exchanges deltas via the store.

Runs every round-based algorithm (ParaBlock, FedBCD, Fed full FT, FedIT, FFA-LoRA, FLoRA, FedCyBGD).

python scripts/client.py --config configs/tiny.py --store file:///tmp/run/store --client-id 0 --workdir runs/client0

Its state is checkpointed in <workdir>/client_<i>/ every round: rerunning the command rejoins the run.
A config whose result-changing settings differ from the server's is refused, listing the keys.
"""

import argparse

from jaxblock.run import experiment, runtime


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--store",
        default=None,
        help="kvstore URL or TensorStore kvstore spec (JSON, or @file) shared with the server "
        "(default: config.comm.store)",
    )
    parser.add_argument("--client-id", type=int, required=True, help="this client's id, 0 .. num_clients-1")
    parser.add_argument("--workdir", default="runs/clients", help="timeline.jsonl is appended here")
    config, args = runtime.parse_args(parser)
    try:
        runtime.check_dir_arg(args.workdir, "--workdir")
        experiment.client(config, args.client_id, args.workdir, args.store)
    except ValueError as e:  # the user's config, data or files
        parser.exit(2, f"error: client {args.client_id}: {e}\n")
    except (TimeoutError, RuntimeError) as e:  # the run itself failed
        parser.exit(1, f"error: client {args.client_id}: {e}\n")
    print(f"client {args.client_id}: done")


if __name__ == "__main__":
    main()
