"""Delta exchange through a TensorStore key-value store, with a modelled network link.

A store is a kvstore URL (`memory://`, `file:///path/`, `gs://` / `s3://` passed to TensorStore
untouched) or a TensorStore kvstore spec, as JSON text or `@file` holding it: the only way to give
an S3-compatible server's `endpoint`, `aws_region`, `aws_credentials`, `host_header` or
`use_conditional_write`. What a spec says about credentials (any member named like a credential,
secret, token or password) stays in this process: `public_store` is the store as files, logs and
messages may show it.

Layout under the store:

    round/<t>/plan                    JSON {block, clients}: what round t trains (server)
    round/<t>/client/<i>/<leaf>/      zarr3 array per leaf of client i's Delta_t^i
    round/<t>/client/<i>/COMMIT       JSON manifest, written after every array: the commit marker
    round/<t>/aggregate/<u>/<leaf>/   the aggregate of round t's deltas merged at the end of round u
                                      (u = t + s; several u when clients' stalenesses differ), COMMIT
    round/<u>/ack/<i>                 JSON {}: client i has applied every merge of the end of round u
    server/config                     JSON {hash, settings}: what every client must agree to (deleted
                                      by the server once the run is done, unless comm.keep_rounds)
    server/done                       JSON {rounds}, when the server has published every aggregate
    server/error                      JSON {message}, when the server gives up

A reader waits for a COMMIT before it reads any array, so it never sees half an update. Only the
trained block's leaves ever cross the wire, each as one zarr3 chunk of raw little-endian bytes (no
chunk grid to split it into and assemble it again, no compression). Byte counts are the exact
payload (array bytes in the wire dtype); the link model turns them into wall time.

Cleanup: the client that sees every client's ack of round u deletes `round/<u - max s>/` (see
comm.py for why nobody reads it again), so a finished run leaves only `server/done`; `comm.keep_rounds` keeps
every round. The file:// driver leaves each round's directory behind, empty.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator

import jax
import numpy as np
import tensorstore as ts

from jaxblock.fed.blocks import path_str, unflatten
from jaxblock.fed.wire import WIRE_DTYPES, _as_float32, on_wire_dtype
from jaxblock.net import signing


class TransportTimeout(TimeoutError):
    pass


def _under(prefix: str) -> ts.KvStore.KeyRange:
    """The keys that start with `prefix` (ending with '/'): up to, not including, prefix with '/' -> '0'."""
    return ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")  # '0' sorts right after '/'


_ALIGN = 64  # bytes: XLA's CPU client uses a NumPy array in place from this alignment up (NumPy gives 16)


def _aligned_arrays(like: list[tuple[tuple, np.dtype]]) -> list[np.ndarray]:
    """Uninitialised arrays of these (shape, dtype)s, each starting on a 64-byte boundary, carved
    out of one allocation.

    What is read from the store goes into jitted checks and merges next: an unaligned array would
    be copied first (0.6 s of CPU for a 805 MB block), an aligned one is used where it lies. One
    allocation for a whole tree is large enough for NumPy to put it on huge pages (it asks from
    4 MB up), which halves the cost of filling fresh memory: a 13 MB block's leaves are 0.6-1.5 MB."""
    sizes = [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in like]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + -(-n // _ALIGN) * _ALIGN)
    raw = np.empty(starts[-1] + _ALIGN, np.uint8)
    base = -raw.ctypes.data % _ALIGN
    return [
        raw[base + start : base + start + n].view(dtype).reshape(shape)
        for (shape, dtype), start, n in zip(like, starts[:-1], sizes, strict=True)
    ]


def _array_metadata(array: np.ndarray) -> dict:
    """zarr3 metadata of an array stored as one chunk of raw bytes (see the module docstring)."""
    return {
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, n) for n in array.shape]}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
    }


_SECRET = re.compile("credential|secret|token|password", re.IGNORECASE)  # spec members never shown
_USERINFO = re.compile(r"://[^/@\s\"]*@")  # a URL's user:password@


def parse_store(store: str | dict) -> str | dict:
    """`comm.store` / `--store` as TensorStore takes it: a URL (str) or a kvstore spec (dict), from a
    URL, a spec as JSON text (starts with '{') or '@path' to a file holding one. A message about a
    spec names no value of it (its text may hold a credential)."""
    if isinstance(store, dict):
        spec, origin = store, "--store"
    else:
        text, origin = store.strip(), "--store"
        if text.startswith("@"):
            path = os.path.expanduser(text[1:])
            try:
                with open(path) as f:
                    text = f.read().strip()
            except OSError as e:
                raise ValueError(f"--store @{path}: {e.strerror}") from None
            origin = f"--store @{path}"
            if not text.startswith("{"):
                raise ValueError(f"{origin}: the file must hold a TensorStore kvstore spec (a JSON object)")
        if not text.startswith("{"):
            if "://" not in text:
                raise ValueError(
                    f"--store {text!r}: give a URL such as file:///tmp/run or memory://, or a TensorStore "
                    "kvstore spec (JSON, or @file holding it)"
                )
            return text if text.endswith("/") else text + "/"
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{origin}: not JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("driver"), str):
        raise ValueError(f'{origin}: a TensorStore kvstore spec is a JSON object with a "driver" (s3, gcs, file, ...)')
    path = spec.get("path", "")
    if not isinstance(path, str):
        raise ValueError(f'{origin}: "path" must be a string')
    return {**spec, "path": path if not path or path.endswith("/") else path + "/"}


def _public(value):
    """A spec with every credential-like member (at any depth) left out."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if not _SECRET.search(k)}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


def _secrets(value, inside: bool = False) -> list[str]:
    """Every string under a credential-like member of a spec (to scrub from TensorStore's messages)."""
    if isinstance(value, dict):
        return [s for k, v in value.items() if not (inside and k == "type")  # a tag: default, profile, ...
                for s in _secrets(v, inside or bool(_SECRET.search(k)))]  # fmt: skip
    if isinstance(value, list):
        return [s for v in value for s in _secrets(v, inside)]
    return [str(value)] if inside and len(str(value)) >= 3 else []


def public_store(store: str | dict) -> str:
    """The store as config.json, checkpoints, summaries and messages show it: a URL (without any
    user:password@), or the spec as canonical JSON (sorted keys) without its credentials."""
    source = parse_store(store)
    shown = source if isinstance(source, str) else json.dumps(_public(source), sort_keys=True, separators=(",", ":"))
    return _USERINFO.sub("://", shown)


def store_name(store: str | dict) -> str:
    """A short name for messages: the URL as given, `s3://bucket/path/ at <endpoint>` for a spec of a
    bucket, else the public spec."""
    source = parse_store(store)
    if isinstance(source, str):
        return _USERINFO.sub("://", store.strip())
    if source["driver"] in ("s3", "gcs") and isinstance(source.get("bucket"), str):
        endpoint = source.get("endpoint")
        name = f"{source['driver']}://{source['bucket']}/{source['path']}"
        return _USERINFO.sub("://", name + (f" at {endpoint}" if isinstance(endpoint, str) else ""))
    return public_store(source)


class Store:
    """A kvstore holding zarr3 arrays and JSON markers; TensorStore makes it safe to share across threads.

    `store`: a URL, a kvstore spec (dict), or either as `comm.store` gives it (see parse_store).
    `source` reopens it (credentials included: never write it anywhere); `name` is for messages."""

    def __init__(self, store: str | dict, context: ts.Context | None = None):
        self.source = parse_store(store)
        self.name = store_name(store)
        # With a URL, arrays and markers are keys under it; with a spec, under its path.
        self.url = self.source if isinstance(self.source, str) else None
        self.spec = self.source if isinstance(self.source, dict) else None
        self.memory = self.url.startswith("memory://") if self.url else self.spec["driver"] == "memory"
        # memory:// stores are shared through one context. file:// reads map the file rather than
        # copy it into a buffer first: 3x less CPU. No TensorStore writer shrinks a file in place (it
        # writes a new one and renames it over); a hand that truncated one while it was read would
        # crash the reader (SIGBUS), but whoever can write the store can stop a run anyway.
        self.context = context or ts.Context({"file_io_mode": {"mode": "memmap"}})
        try:
            self.kv = ts.KvStore.open(self.source, context=self.context).result()
        except ValueError as e:  # a bad bucket name, a spec member TensorStore does not know, ...
            raise ValueError(f"--store {self.name}: {self.said(e)}") from None
        self.party_keys: signing.Keys | None = None  # set by a signing party: server/error must be the server's

    def scrub(self, message: str) -> str:
        """`message` without any value of the spec's credentials (TensorStore quotes what it refuses)."""
        for secret in _secrets(self.spec or {}):
            message = message.replace(secret, "***")
        return _USERINFO.sub("://", message)

    def said(self, error: Exception) -> str:
        """TensorStore's message on one line, without its annotations (the HTTP response body, ...)
        and without credentials."""
        return self.scrub(str(error).split(" [", 1)[0].replace("\n", " "))

    def check(self) -> None:
        """Reads the store once: one that cannot be reached (a wrong credential, no such bucket, no
        server) is a ValueError naming it, before anything else is done."""
        try:
            self.kv.read("server/done").result()
        except ValueError as e:
            raise ValueError(f"--store {self.name} cannot be read: {self.said(e)}") from None

    def _servers(self, error) -> bool:
        """Whether `server/error` is the server's (always, in a run without keys)."""
        if self.party_keys is None:
            return isinstance(error, dict) and "message" in error
        try:
            self.party_keys.check(error, "server", {"kind": "error"})
            return True
        except signing.BadSignature:
            return False  # anyone with store access can write it: a forged error stops nobody

    # -- JSON markers
    def put_json(self, key: str, value) -> None:
        self.kv.write(key, json.dumps(value).encode()).result()

    def get_json(self, key: str):
        result = self.kv.read(key).result()
        return json.loads(result.value) if result.state == "value" else None

    def wait_json(self, key: str, timeout_s: float, what: str, max_poll_s: float = 0.02):
        """Polls until `key` exists; TransportTimeout naming `what` after timeout_s.

        The poll interval backs off from 1 ms to `max_poll_s`: a wait that overlaps computation
        must not take CPU from it (a 2 ms poll measurably slowed the compute thread on 2 cores).
        """
        start = time.perf_counter()
        poll, next_error_check = 0.001, start
        while True:
            value = self.get_json(key)
            if value is not None:
                return value
            now = time.perf_counter()
            if now >= next_error_check:
                error = self.get_json("server/error")
                if error is not None and self._servers(error):
                    raise RuntimeError(f"the server stopped: {error['message']}")
                next_error_check = now + 0.5
            if now - start > timeout_s:
                raise TransportTimeout(f"{what}: nothing after {timeout_s:g}s")
            time.sleep(poll)
            poll = min(poll * 1.5, max_poll_s)

    # -- arrays
    def _array_spec(self, prefix: str, path: str) -> dict:
        if self.spec is None:
            return {"driver": "zarr3", "kvstore": f"{self.url}{prefix}/{path}/"}
        return {"driver": "zarr3", "kvstore": {**self.spec, "path": f"{self.spec['path']}{prefix}/{path}/"}}

    def publish(
        self, prefix: str, tree: dict, wire_dtype: str = "float32", before_commit=None, extra=None, seal=None
    ) -> int:
        """Writes every leaf of `tree` as a zarr3 array under `prefix`, then the COMMIT marker.

        Returns the payload bytes (array bytes in the wire dtype). `before_commit(nbytes)` runs
        between the arrays and the marker: a modelled link holds the upload there, so that readers
        see it no earlier than the link would have delivered it. `extra`: more fields for the
        marker (an aggregate's record of who was merged and who left out). `seal(manifest)`: the
        manifest signed (signing.Keys.seal), with the SHA-256 of every array's bytes in it.
        """
        leaves = [(path_str(p), on_wire_dtype(x, wire_dtype)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
        opening = [
            ts.open(
                {**self._array_spec(prefix, path), "metadata": _array_metadata(array)}, create=True,
                delete_existing=True, dtype=ts.dtype(array.dtype.name), shape=array.shape, context=self.context,
            )
            for path, array in leaves
        ]  # fmt: skip
        kept = self._kept([array for _, array in leaves])
        writes = [
            store.result().write(array, can_reference_source_data_indefinitely=True)
            for store, array in zip(opening, kept, strict=True)
        ]
        # Hashed while TensorStore's threads write (hashlib lets go of the GIL): the two overlap.
        digests = [signing.digest(array) for _, array in leaves] if seal is not None else None
        for w in writes:
            w.result()
        nbytes = sum(a.nbytes for _, a in leaves)
        manifest = {
            "leaves": [[p, list(a.shape), a.dtype.name] for p, a in leaves],
            "dtype": WIRE_DTYPES[wire_dtype].name,
            "bytes": nbytes,
            **(extra or {}),
        }
        if seal is not None:
            manifest = seal({**manifest, "digests": digests})
        if before_commit is not None:
            before_commit(nbytes)
        self.put_json(f"{prefix}/COMMIT", manifest)
        return nbytes

    def _kept(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """What TensorStore may reference instead of copying: left to itself, it copies every array
        into small fresh pages (0.5 s of CPU for a 805 MB block). A memory:// store keeps what it
        references for good, so it gets a copy of its own, on huge pages (0.2 s), that nobody can
        change; every other driver reads the caller's arrays only until the write is done (a
        Store's context has no cache pool that could hold on to them)."""
        if not self.memory:
            return arrays
        kept = _aligned_arrays([(a.shape, a.dtype) for a in arrays])
        for k, a in zip(kept, arrays, strict=True):
            np.copyto(k, a)
        return kept

    def arrays(self, prefix: str, manifest: dict, before_read=None) -> Iterator[tuple[str, np.ndarray]]:
        """(leaf path, array as stored, in the wire dtype) of a committed tree, in its manifest's order.

        `before_read(path, shape, dtype name)` sees every array as stored before anything is read
        (receive.read_checked refuses an array larger than its manifest there). Every read is under
        way before the first array is yielded, so what a caller does with one (a digest) overlaps
        the reads of the rest."""
        paths = [path for path, *_ in manifest["leaves"]]
        opening = [ts.open(self._array_spec(prefix, path), open=True, context=self.context) for path in paths]
        stored = [o.result() for o in opening]
        if before_read is not None:
            for path, array in zip(paths, stored, strict=True):
                before_read(path, tuple(array.shape), array.dtype.name)
        # Read into arrays of ours rather than TensorStore's own: aligned and on huge pages (see
        # _aligned_arrays), which halves the read's CPU time.
        outs = _aligned_arrays([(tuple(array.shape), array.dtype.numpy_dtype) for array in stored])
        reads = [
            (path, out, ts.array(out, copy=False, write=True, context=self.context).write(array))
            for path, out, array in zip(paths, outs, stored, strict=True)
        ]
        for path, out, read in reads:
            read.result()
            yield path, out

    def fetch(self, prefix: str, manifest: dict, before_read=None) -> tuple[dict, int]:
        """Reads a committed tree (floating arrays as float32, integer ones as they are) and its payload
        bytes; `before_read` as in `arrays`."""
        tree = unflatten((path, _as_float32(x)) for path, x in self.arrays(prefix, manifest, before_read))
        return tree, int(manifest["bytes"])

    def delete(self, key: str) -> None:
        self.kv.delete_range(ts.KvStore.KeyRange(key, key + "\x00")).result()

    def delete_round(self, t: int) -> None:
        """Removes everything under round/<t>/ (the simulator once it has aggregated round t, server
        mode once every client has acked it). Deleting twice is harmless."""
        self.kv.delete_range(_under(f"round/{t}/")).result()

    def wait_fetch(self, prefix: str, timeout_s: float, what: str) -> tuple[dict, int]:
        return self.fetch(prefix, self.wait_json(f"{prefix}/COMMIT", timeout_s, what))

    def keys(self, prefix: str) -> list[str]:
        """Every key under `prefix` (ending with '/'), without the prefix."""
        return [k.decode() for k in self.kv.list(_under(prefix), strip_prefix_length=len(prefix)).result()]

    def acked(self, t: int) -> set[int]:
        """The clients that have acked round t's aggregate."""
        return {int(k) for k in self.keys(f"round/{t}/ack/")}


# Keys, in one place.
def plan_key(t: int) -> str:
    return f"round/{t}/plan"


def delta_prefix(t: int, client: int) -> str:
    return f"round/{t}/client/{client}"


def aggregate_prefix(t: int, at: int) -> str:
    """Round t's deltas merged at the end of round `at` (t + s; per-client staleness splits a round)."""
    return f"round/{t}/aggregate/{at}"


def ready_key(client: int) -> str:
    """Client i has built its model and data and is ready for round 0 (the server waits for a quorum)."""
    return f"ready/{client}"


def ack_key(t: int, client: int) -> str:
    return f"round/{t}/ack/{client}"


def holds_a_run(store: Store) -> bool:
    """True if a server has used this store: any key under round/ or server/.

    Not just round/0/plan: cleanup deletes it, and a killed server leaves neither server/done nor
    server/error, only its later rounds.
    """
    return bool(store.keys("round/") or store.keys("server/"))


def ready_clients(store: Store, keys=None) -> set[int]:
    """The clients that have said they are ready (with keys: signed by themselves)."""
    ready = set()
    for k in store.keys("ready/"):
        if not k.isdigit():
            continue
        doc = store.get_json(ready_key(int(k)))
        try:
            if keys is not None:
                keys.check(doc, signing.client_name(int(k)), {"kind": "ready", "client": int(k)})
            ready.add(int(k))
        except signing.BadSignature:
            pass
    return ready
