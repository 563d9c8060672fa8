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
import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certificates(hosts: list[str]) -> dict[str, bytes]:
    """{file name: bytes} of the CA and the SuperLink's certificate for `hosts`."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("jaxblock federation CA"))
        .issuer_name(_name("jaxblock federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca.crt": ca.public_bytes(pem),
        "ca.key": _private_pem(ca_key),
        "superlink.crt": cert.public_bytes(pem),
        "superlink.key": _private_pem(key),
    }


def _private_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_node_keys(i: int) -> dict[str, bytes]:
    """SuperNode i's key pair in OpenSSH format, as Flower's node authentication reads it."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return {f"node_{i}": private, f"node_{i}.pub": public + f" jaxblock-node-{i}\n".encode()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a new directory for the files")
    parser.add_argument("--hosts", default="localhost,127.0.0.1", help="the SuperLink's names and addresses")
    parser.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make")
    args = parser.parse_args()
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if not hosts:
        parser.exit(2, "error: --hosts names no host\n")
    if args.nodes < 0:
        parser.exit(2, f"error: --nodes {args.nodes}: must be >= 0\n")
    files = make_certificates(hosts)
    for i in range(args.nodes):
        files.update(make_node_keys(i))
    taken = [name for name in files if os.path.exists(os.path.join(args.out, name))]
    if taken:
        parser.exit(2, f"error: --out {args.out} already holds {', '.join(taken)}: choose a new directory\n")
    os.makedirs(args.out, exist_ok=True)
    for name, data in files.items():
        path = os.path.join(args.out, name)
        public = name.endswith((".crt", ".pub"))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644 if public else 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    print(f"wrote {len(files)} files to {args.out}: {', '.join(files)}", file=sys.stderr)


if __name__ == "__main__":
    main()
