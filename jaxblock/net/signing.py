"""Ed25519 signatures on everything that crosses the store: who wrote it, for which round, unchanged.

Each party has its own key pair (`scripts/keys.py` makes them, one directory per party):

    keys/server/    server.key (private), client_<i>.pub for every client
    keys/client_<i>/ client_<i>.key (private), server.pub, client_<j>.pub for every other client

(A client checks its peers' signatures on secure aggregation's key adverts and shares: with only
the server's key it would have to take the server's word for them, and a server that swapped a
key could open that client's shares and unmask its update.)

A client signs each delta's COMMIT manifest: its round, block, client id, leaf names, shapes and the
SHA-256 of every array's bytes as sent. The server signs each plan, aggregate (with its record of
who was merged), its config, `server/done` and `server/error`. A reader checks the signature against
the key of the party the key's place in the store names, and the signed round, block and client
against what it expects, and then the bytes against the signed digests: a forged, altered or
replayed (an earlier round's, re-committed) document is rejected with its reason.

Why Ed25519 and not HMAC: a public key only verifies, so the server holds no secret that could
sign as a client, clients hold nothing that could sign as the server, and a delta's signature
proves to anyone with the public key which client sent it (the server's log can be audited).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat


class BadSignature(ValueError):
    """A document whose signature is missing, invalid, or signed for something else: `reason` says which."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _message(doc: dict) -> bytes:
    return json.dumps({k: v for k, v in doc.items() if k != "signature"}, sort_keys=True).encode()


def digest(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes as they are on the wire (C order).

    Hashed where they lie (as bytes: bfloat16 has no buffer format), not through a copy: SHA-256
    runs at ~1.1 GB/s here, and copying a 805 MB block first cost as much again."""
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


class Keys:
    """One party's keys: its private key (to sign) and the public keys of the parties it reads."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise ValueError(f"comm.keys={directory!r}: no such directory (make keys with scripts/keys.py)")
        self.directory = directory
        private = [f for f in os.listdir(directory) if f.endswith(".key")]
        if len(private) != 1:
            raise ValueError(f"comm.keys={directory!r}: expected one private *.key file, found {len(private)}")
        self.name = private[0][: -len(".key")]
        with open(os.path.join(directory, private[0]), "rb") as f:
            self._private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(f.read().decode().strip()))
        self._public: dict[str, Ed25519PublicKey] = {self.name: self._private.public_key()}  # it reads its own too
        for f in os.listdir(directory):
            if f.endswith(".pub"):
                with open(os.path.join(directory, f), "rb") as fh:
                    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(fh.read().decode().strip()))
                self._public[f[: -len(".pub")]] = key

    def seal(self, doc: dict) -> dict:
        """The document with `signer` and `signature` (over every other field) added."""
        doc = {**doc, "signer": self.name}
        return {**doc, "signature": self._private.sign(_message(doc)).hex()}

    def check(self, doc, signer: str, expect: dict) -> dict:
        """The document, if `signer` signed it and its fields equal `expect`; BadSignature otherwise."""
        if not isinstance(doc, dict) or "signature" not in doc:
            raise BadSignature("unsigned", f"no signature where {signer} must sign")
        if doc.get("signer") != signer:
            raise BadSignature("forged", f"signed as {doc.get('signer')!r}, expected {signer}")
        key = self._public.get(signer)
        if key is None:
            raise BadSignature("forged", f"no public key for {signer} in {self.directory}")
        try:
            key.verify(bytes.fromhex(str(doc["signature"])), _message(doc))
        except (InvalidSignature, ValueError):
            raise BadSignature("forged", f"the signature is not {signer}'s") from None
        for k, v in expect.items():
            if doc.get(k) != v:
                reason = "replayed" if k == "round" else "forged"
                raise BadSignature(reason, f"signed for {k}={doc.get(k)!r}, expected {v!r}")
        return doc


def client_name(client: int) -> str:
    return f"client_{client}"


def make_keys(out: str, num_clients: int) -> list[str]:
    """Writes one directory per party under `out` (see the module docstring); returns their paths.
    Private keys are readable by their owner only."""

    def pair():
        private = Ed25519PrivateKey.generate()
        raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex()
        return raw, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    def write(path: str, text: str, private: bool = False) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")

    parties = ["server", *[client_name(i) for i in range(num_clients)]]
    keys = {p: pair() for p in parties}
    for party in parties:
        d = os.path.join(out, party)
        if os.path.exists(d):
            raise ValueError(f"{d} exists: keys are never overwritten (remove it or choose another --out)")
    for party in parties:
        d = os.path.join(out, party)
        os.makedirs(d)
        write(os.path.join(d, f"{party}.key"), keys[party][0], private=True)
        readers = [p for p in parties if p != party]
        for other in readers:
            write(os.path.join(d, f"{other}.pub"), keys[other][1])
    return [os.path.join(out, p) for p in parties]
