"""Every upload is checked before it can touch the server model.

The server (and the simulator, with the same policy) accepts a client's update for round r only if

    its manifest lists exactly the leaves of round r's block, with their shapes and the wire dtype
    (top-k: int32 indices in range and values, k per leaf), before any array is read;
    its payload is no larger than that (`max_upload_mb` can lower the limit further);
    the arrays read back have the shapes the manifest promised;
    every value is finite;
    its L2 norm is within `max_delta_norm` (0: no bound) and within `max_norm_ratio` times the median
    norm of the round's other accepted updates (0: off; the robust bound needs no scale known ahead).

A bad update is rejected for that round with a reason; `on_bad_update='drop'` (the default) goes on
without it, 'stop' ends the run naming client, round and reason. Rejections are counted in the
run's metrics (`rejected`: [[round, client, reason]]).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxblock.fed.wire import WIRE_DTYPES

ON_BAD_UPDATE = ("drop", "stop")


@dataclasses.dataclass(frozen=True)
class Policy:
    min_clients: int = 1  # a round needs updates from this many of its clients (fewer: the server stops)
    max_delta_norm: float = 0.0  # reject an update whose L2 norm exceeds this (0: no bound)
    max_norm_ratio: float = 0.0  # reject one above this x the median norm of the round's others (0: off)
    max_upload_mb: float = 0.0  # reject a payload above this (0: the block's exact size is the limit)
    on_bad_update: str = "drop"  # 'drop': the round goes on without it; 'stop': the run ends

    def __post_init__(self):
        if self.on_bad_update not in ON_BAD_UPDATE:
            raise ValueError(f"comm.on_bad_update={self.on_bad_update!r}: choose 'drop' or 'stop'")
        for name in ("max_delta_norm", "max_norm_ratio", "max_upload_mb"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"comm.{name}={getattr(self, name)}: must be >= 0 (0: off)")
        if self.min_clients < 1:
            raise ValueError(f"comm.min_clients={self.min_clients}: need at least 1")


class BadUpdate(ValueError):
    """An upload that fails a check: `reason` is a short category (counted), str(e) the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def upload_bytes(expected: dict) -> int:
    """The payload of an upload with these leaves."""
    words = (np.int32, np.uint16, np.uint32, np.uint64)  # top-k's indices, secure aggregation's masked words
    itemsize = {d.name: d.itemsize for d in (*WIRE_DTYPES.values(), *map(np.dtype, words))}
    return sum(math.prod(shape) * itemsize[dtype] for shape, dtype, _ in expected.values())


def check_values(flat: dict[str, np.ndarray], expected: dict) -> None:
    """BadUpdate unless the arrays read have the expected shapes, finite values and in-range indices."""
    for path, x in flat.items():
        shape, _, bound = expected[path]
        if tuple(x.shape) != shape:
            raise BadUpdate("shape", f"{path} holds {list(x.shape)}, its manifest says {list(shape)}")
        if bound is not None:
            if x.size and not (x.min() >= 0 and x.max() < bound):
                raise BadUpdate("index", f"{path} has indices outside [0, {bound})")
        elif not np.isfinite(x).all():
            raise BadUpdate("non-finite", f"{path} has NaN/Inf")


class UpdateRejected(RuntimeError):
    """A rejected upload under `on_bad_update='stop'`: the run ends, naming round, client and reason."""


def screen(uploads: dict[int, dict], policy: Policy) -> dict[int, str]:
    """{client: reason} for the uploads (already of the right structure) that are not finite or
    break the norm bounds."""
    stats = {c: _finite_and_norm(_values(tree)) for c, tree in uploads.items()}
    bad = {c: "non-finite: NaN/Inf in the update" for c, (finite, _) in stats.items() if not finite}
    norms = {c: float(n) for c, (finite, n) in stats.items() if finite}
    return {**bad, **screen_norms(norms, policy)}


def stop_if_asked(policy: Policy, round_: int, rejected: dict[int, str]) -> None:
    """UpdateRejected for the first rejected upload when the policy says 'stop'."""
    if rejected and policy.on_bad_update == "stop":
        c = min(rejected)
        raise UpdateRejected(f"round {round_}: client {c}'s update rejected ({rejected[c]}); comm.on_bad_update='stop'")


def norm(tree) -> float:
    """The L2 norm of an update's values (top-k: of the values it sends)."""
    return float(_norm(_values(tree)))


def _values(tree) -> list:
    """An update's value leaves (integer leaves, such as sparse indices, say where, not how much)."""
    # jnp.result_type, not jnp.asarray(x).dtype: that copies a NumPy leaf to the device first.
    return [x for x in jax.tree.leaves(tree) if not jnp.issubdtype(jnp.result_type(x), jnp.integer)]


def _finite_and_norm(leaves: list) -> tuple[bool, jax.Array]:
    """(every value finite, the L2 norm in float32), where the values are (no copy to the host).

    A finite sum of squares proves every value finite (one NaN or Inf makes it NaN or Inf), so the
    value-by-value check, 4x the norm's cost on a CPU, runs only when the norm is not finite: a
    NaN/Inf, or finite values whose squares overflow."""
    n = _norm(leaves)
    return bool(jnp.isfinite(n)) or bool(_all_finite(leaves)), n


@jax.jit
def _norm(leaves: list) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def screen_norms(norms: dict[int, float], policy: Policy) -> dict[int, str]:
    """{client: reason} for the updates whose norm breaks the policy's bounds."""
    bad = {}
    for c, n in norms.items():
        if policy.max_delta_norm and n > policy.max_delta_norm:
            bad[c] = f"norm: {n:.3g} > comm.max_delta_norm={policy.max_delta_norm:g}"
    if policy.max_norm_ratio:
        ok = {c: n for c, n in norms.items() if c not in bad}
        for c, n in ok.items():
            others = [m for d, m in ok.items() if d != c]
            median = float(np.median(others)) if others else 0.0
            if others and n > policy.max_norm_ratio * median:
                bad[c] = f"norm: {n:.3g} > {policy.max_norm_ratio:g} x the round's median {median:.3g}"
    return bad
