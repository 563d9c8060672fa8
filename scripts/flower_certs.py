"""Makes the TLS certificates and SuperNode keys a Flower deployment of jaxblock needs (docs/flower.md).

    python scripts/flower_certs.py --out certs --hosts localhost,127.0.0.1 --nodes 2

writes, with private files readable by their owner only:
- ca.crt / ca.key: a certificate authority of this federation (SuperNodes and `flwr` trust ca.crt);
- superlink.crt / superlink.key: the SuperLink's certificate, signed by the CA, valid for --hosts;
- node_<i> / node_<i>.pub: SuperNode i's authentication key pair (ECDSA P-384, OpenSSH format), for
  `flower-supernode --auth-supernode-private-key node_<i>` and `flwr supernode register node_<i>.pub`.

An existing file is never overwritten (rerun with a new --out). For a real federation, use your own
CA if you have one; each SuperNode's private key stays on its machine, only its .pub is sent.
"""

import argparse
import sys

from jaxblock.flower import certs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a new directory for the files")
    parser.add_argument("--hosts", default="localhost,127.0.0.1", help="the SuperLink's names and addresses")
    parser.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make")
    args = parser.parse_args()
    try:
        made = certs.files([h.strip() for h in args.hosts.split(",") if h.strip()], args.nodes)
        certs.write(args.out, made)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {len(made)} files to {args.out}: {', '.join(made)}", file=sys.stderr)


if __name__ == "__main__":
    main()
