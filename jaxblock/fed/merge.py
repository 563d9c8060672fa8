"""The arithmetic of a merge, shared by the server, every client replica and every algorithm."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxblock.fed import blocks as blocks_lib


def apply_aggregate(params: dict, partition: blocks_lib.Partition, block_id: int, aggregate: dict, eta: float):
    """[params]_b += eta * aggregate. The server and every client replica call exactly this."""
    block, rest = partition.split(params, block_id)
    return blocks_lib.merge(axpy(block, eta, aggregate), rest)


@jax.jit
def weighted_sum(trees: list[dict], weights: jax.Array) -> dict:
    return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs, strict=True)), *trees)


@jax.jit
def axpy(block: dict, eta, delta: dict) -> dict:
    """block + eta * delta, in the block's dtype (the delta is float32)."""
    return jax.tree.map(lambda p, d: (p.astype(jnp.float32) + eta * d).astype(p.dtype), block, delta)
