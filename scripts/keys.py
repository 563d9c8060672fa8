"""Makes the Ed25519 keys of a run: one directory per party, each holding what that party needs.

    python scripts/keys.py --clients 10 --out keys
    # keys/server/    server.key + client_<i>.pub      -> the server: --config.comm.keys=keys/server
    # keys/client_3/  client_3.key + server.pub + client_<j>.pub -> client 3: --config.comm.keys=keys/client_3

Hand each directory to its party only; a private key (*.key, mode 600) never leaves its owner.
Existing directories are never overwritten.
"""

import argparse

from jaxblock.net import signing


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True, help="how many clients the run has")
    parser.add_argument("--out", default="keys", help="a directory per party is made under it")
    args = parser.parse_args()
    if args.clients < 1:
        parser.error("--clients must be >= 1")
    try:
        for path in signing.make_keys(args.out, args.clients):
            print(path)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
