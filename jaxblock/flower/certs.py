"""The TLS certificates and SuperNode keys of a Flower federation (`scripts/flower_certs.py`): a CA,
the SuperLink's certificate for its host names, and each SuperNode's authentication key pair."""

from __future__ import annotations

import datetime
import ipaddress
import os

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


def files(hosts: list[str], nodes: int) -> dict[str, bytes]:
    """Every file of a federation with `nodes` SuperNodes and a SuperLink reached as `hosts`."""
    if not hosts:
        raise ValueError("--hosts names no host")
    if nodes < 0:
        raise ValueError(f"--nodes {nodes}: must be >= 0")
    out = make_certificates(hosts)
    for i in range(nodes):
        out.update(make_node_keys(i))
    return out


def write(directory: str, contents: dict[str, bytes]) -> None:
    """Writes `contents` into `directory`, private files readable by their owner only; a file that
    exists already is a ValueError before anything is written."""
    taken = [name for name in contents if os.path.exists(os.path.join(directory, name))]
    if taken:
        raise ValueError(f"--out {directory} already holds {', '.join(taken)}: choose a new directory")
    os.makedirs(directory, exist_ok=True)
    for name, data in contents.items():
        public = name.endswith((".crt", ".pub"))
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644 if public else 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
