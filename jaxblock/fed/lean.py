"""The server state as a plain pytree (orbax checkpoints it as it is), and the lean form of a
client's model: the server model plus eta times the client's own pending deltas (each weighted by
the algorithm's `own_weight`: 1 in Algorithm 2, ParaBlock's `self_weight` otherwise)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from jaxblock.fed import blocks as blocks_lib
from jaxblock.fed.config import FedConfig
from jaxblock.fed.merge import axpy

OwnWeight = Callable[[int], float]  # round r -> the weight of a client's own pending delta of round r


def init_state(fed: FedConfig, params: dict) -> dict:
    """The server state: a plain pytree, so orbax can checkpoint it as it is.

    keys: params (server model), round (next round to run), seed, positions (each client's data
    position, [N] int64), pending ({round: {'block', 'clients', 'deltas': {client: delta}}}).
    """
    return {
        "params": params,
        "round": 0,
        "seed": fed.seed,
        "positions": np.zeros(fed.num_clients, np.int64),
        "pending": {},
    }


def client_params(
    state: dict, partition: blocks_lib.Partition, client: int, eta: float, own_weight: OwnWeight | None = None
) -> dict:
    """Client `client`'s model: the server model plus eta times its own pending deltas, the delta of
    round r weighted by `own_weight(r)` (None: 1, Algorithm 2). When round r's aggregate is merged the
    server model takes it and the weighted delta leaves: the client holds the server model again
    (Algorithm 2's correction, generalised: - eta * own_weight * own delta + eta * aggregate).

    Only the blocks with a pending delta are new arrays; all other leaves are the server's.
    """
    params = state["params"]
    for r in sorted(state["pending"]):
        entry = state["pending"][r]
        delta = entry["deltas"].get(client)
        if delta is None:
            continue
        scale = eta if own_weight is None else eta * own_weight(r)  # eta * 1.0 is eta: Algorithm 2 bit for bit
        if scale != 0.0:
            block, rest = partition.split(params, entry["block"])
            params = blocks_lib.merge(axpy(block, scale, delta), rest)
    return params


def own_weights(algorithm, client: int, client_sizes=None) -> OwnWeight:
    """`client_params`'s `own_weight` for `client`: round r -> `algorithm.own_weight(client, r, client_sizes)`."""
    return lambda round_: algorithm.own_weight(client, round_, client_sizes)


def forget(state: dict, round_: int, clients: list[int]) -> dict:
    """The state without `clients`' pending deltas of `round_` (and without the round once it is empty)."""
    entry = state["pending"][round_]
    left = {k: {c: v for c, v in entry[k].items() if c not in clients} for k in ("deltas", "uploads") if k in entry}
    pending = {r: e for r, e in state["pending"].items() if r != round_}
    if left["deltas"]:
        pending[round_] = {**entry, **left}
    return {**state, "pending": pending}


def check_finite(deltas: list[dict], clients: list[int], round_: int, block: int) -> None:
    """FloatingPointError naming the first client whose delta has a NaN/Inf."""
    for c, d in zip(clients, deltas, strict=True):
        if not all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(d)):
            raise FloatingPointError(f"round {round_}: client {c}'s delta for block {block} has NaN/Inf")
