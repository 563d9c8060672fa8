"""What crosses the wire, as pure functions: wire dtypes, exact payload bytes, and the link model
that turns bytes into seconds (the simulator's modelled time; the deployment's transfer threads hold
an upload for that long)."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

WIRE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# The paper's Figure 2 bandwidths, in MB/s (1 MB = 1e6 bytes).
LINK_PRESETS = {"50MBps": 50.0, "100MBps": 100.0, "150MBps": 150.0}


@dataclasses.dataclass(frozen=True)
class Link:
    """A client's network link: bandwidth in MB/s (0 = unlimited) and per-transfer latency in ms."""

    bandwidth_mbps: float = 0.0
    latency_ms: float = 0.0

    def seconds(self, nbytes: int) -> float:
        transfer = nbytes / (self.bandwidth_mbps * 1e6) if self.bandwidth_mbps > 0 else 0.0
        return self.latency_ms / 1e3 + transfer

    def hold(self, nbytes: int, started: float) -> None:
        """Sleeps until the modelled transfer time since `started` has passed."""
        remaining = started + self.seconds(nbytes) - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)


def link_for(client: int, bandwidth_mbps, latency_ms) -> Link:
    """Client `client`'s link from config values: a number, a preset name, or one per client."""

    def pick(value, name):
        if value is None:
            return 0.0
        if isinstance(value, (list, tuple)):
            if client >= len(value):
                raise ValueError(f"comm.{name} lists {len(value)} values; client {client} has none")
            value = value[client]
        if isinstance(value, str):
            if value not in LINK_PRESETS:
                raise ValueError(f"comm.{name}={value!r}: presets are {', '.join(LINK_PRESETS)}")
            value = LINK_PRESETS[value]
        if float(value) < 0:
            raise ValueError(f"comm.{name}={value}: must be >= 0")
        return float(value)

    return Link(pick(bandwidth_mbps, "bandwidth_mbps"), pick(latency_ms, "latency_ms"))


def on_wire_dtype(x, wire_dtype: str) -> np.ndarray:
    """A leaf as it is sent: floating values in the wire dtype, signed integers (top-k indices) as
    int32, unsigned ones (secure aggregation's words mod 2^bits) as they are.

    A leaf already in its wire dtype is returned as it is, not copied (a copy of a 805 MB block
    costs ~0.3 s of CPU on fresh pages); callers only read it."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.unsignedinteger):
        return x
    dtype = np.int32 if np.issubdtype(x.dtype, np.integer) else WIRE_DTYPES[wire_dtype]
    return x.astype(dtype, copy=False)


def _as_float32(x: np.ndarray) -> np.ndarray:
    return x if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32, copy=False)


def payload_bytes(tree: dict, wire_dtype: str) -> int:
    """The exact bytes a tree costs on the wire (what `Store.publish` returns for it)."""
    itemsize = WIRE_DTYPES[wire_dtype].itemsize
    leaves = jax.tree.leaves(tree)

    def size(x):
        if jnp.issubdtype(x.dtype, jnp.unsignedinteger):
            return x.dtype.itemsize
        return 4 if jnp.issubdtype(x.dtype, jnp.integer) else itemsize

    return sum(x.size * size(x) for x in leaves)


def to_wire(tree: dict, wire_dtype: str) -> dict:
    """The tree as it arrives after a trip over the wire (rounded to the wire dtype, as float32)."""
    return jax.tree.map(lambda x: _as_float32(on_wire_dtype(x, wire_dtype)), tree)
