"""The server state as a plain pytree (orbax checkpoints it as it is), and the lean form of a
client's model: the server model plus eta times the client's own pending deltas."""

from __future__ import annotations

import jax
import numpy as np

from jaxblock.fed import blocks as blocks_lib
from jaxblock.fed.config import FedConfig
from jaxblock.fed.merge import axpy


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


def client_params(state: dict, partition: blocks_lib.Partition, client: int, eta: float) -> dict:
    """Client `client`'s model: the server model plus eta times its own pending deltas.

    Only the blocks with a pending delta are new arrays; all other leaves are the server's.
    """
    params = state["params"]
    for entry in _pending_in_order(state):
        delta = entry["deltas"].get(client)
        if delta is not None:
            block, rest = partition.split(params, entry["block"])
            params = blocks_lib.merge(axpy(block, eta, delta), rest)
    return params


def _pending_in_order(state: dict) -> list[dict]:
    return [state["pending"][r] for r in sorted(state["pending"])]


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
