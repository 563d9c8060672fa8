"""Who trains which block in round t, with which learning rate, and when and how much each delta
counts when it is merged: pure functions of the settings (`FedConfig`) and the round."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxblock.fed import blocks as blocks_lib
from jaxblock.fed.config import FedConfig
from jaxblock.fed.local import LossFn


def choose_block(
    fed: FedConfig, round_: int, num_blocks: int, gradient_norms: Callable[[], np.ndarray] | None = None
) -> int:
    """b_t. random: seeded, uniform with replacement (the paper's default); random_norepeat: never
    b_{t-1} again, uniform over the other B-1 blocks (see `_no_repeat`); sequential: 0,1,..,B-1,0,..;
    reverse: B-1,..,0,B-1,..; cyclic: every B rounds a fresh seeded permutation (each block once
    per cycle); gradient: the block with the largest gradient norm (`gradient_norms()`)."""
    if num_blocks == 1:  # Fed full FT and the LoRA methods: nothing to choose
        return 0
    if fed.schedule == "random":
        return _random(fed.seed, round_, num_blocks)
    if fed.schedule == "random_norepeat":
        for chunk in range(round_ // _NO_REPEAT_CHUNK + 1):  # each chunk of the path extends the one before
            path = _no_repeat(fed.seed, num_blocks, chunk)
        return path[round_ % _NO_REPEAT_CHUNK]
    if fed.schedule == "sequential":
        return round_ % num_blocks
    if fed.schedule == "reverse":
        return num_blocks - 1 - round_ % num_blocks
    if fed.schedule == "cyclic":
        order = np.random.default_rng([fed.seed, round_ // num_blocks, 2]).permutation(num_blocks)
        return int(order[round_ % num_blocks])
    return int(np.argmax(gradient_norms()))


def _random(seed: int, round_: int, num_blocks: int) -> int:
    return int(np.random.default_rng([seed, round_, 1]).integers(num_blocks))


_NO_REPEAT_CHUNK = 1024  # rounds of the no-repeat path computed (and cached) at once


@functools.cache  # every chunk of a path is kept: a bounded cache would recompute from chunk 0 past its size
def _no_repeat(seed: int, num_blocks: int, chunk: int) -> tuple[int, ...]:
    """b_t of `random_norepeat` for the rounds t of `chunk` (1024 rounds each; a chunk starts from the
    last block of the one before): the random schedule's draw, except that a draw equal
    to b_{t-1} is redrawn uniformly among the other B-1 blocks (a stream of its own). Given
    b_{t-1} = j, each other block then has probability 1/B + 1/B * 1/(B-1) = 1/(B-1); and every round
    without a redraw (all but ~1/B of them) trains the block `random` trains, so the two schedules
    differ only by the repeats. A pure function of (seed, t), as every schedule: a resumed run and
    the server's plans see the same path."""
    start = chunk * _NO_REPEAT_CHUNK
    before = _no_repeat(seed, num_blocks, chunk - 1)[-1] if chunk else None  # cached: the caller asked in order
    path = []
    for t in range(start, start + _NO_REPEAT_CHUNK):
        b = _random(seed, t, num_blocks)
        if b == before:
            other = int(np.random.default_rng([seed, t, 4]).integers(num_blocks - 1))
            b = other if other < before else other + 1
        path.append(b)
        before = b
    return tuple(path)


def block_gradient_norms(loss_fn: LossFn, params: dict, partition: blocks_lib.Partition, batch) -> np.ndarray:
    """L2 norm of the gradient of each block, from one full backward pass."""
    grads = _full_grad(loss_fn, params, batch)
    sq = jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32))), grads)
    norms = np.zeros(partition.num_blocks)
    for label, value in zip(jax.tree.leaves(partition.labels), jax.tree.leaves(sq), strict=True):
        if label != blocks_lib.FROZEN:
            norms[label] += float(value)
    return np.sqrt(norms)


def _full_grad(loss_fn, params, batch):
    return _grad_fn(loss_fn)(params, batch)


@functools.lru_cache(maxsize=8)
def _grad_fn(loss_fn):  # one executable per loss function, reused every round
    return jax.jit(jax.grad(loss_fn))


def lr_factor(fed: FedConfig, round_: int) -> float:
    """The local learning rate's multiplier in round t: 1 at t = 0, decaying (linearly, or as a half
    cosine as in OpenFedLLM's round-wise schedule) towards `lr_decay_alpha` at t = T. The optimizer's
    own `schedule` runs within each round on top of it."""
    if fed.lr_decay == "linear":
        return float(optax.linear_schedule(1.0, fed.lr_decay_alpha, fed.rounds)(round_))
    if fed.lr_decay == "cosine":
        return float(optax.cosine_decay_schedule(1.0, fed.rounds, fed.lr_decay_alpha)(round_))
    return 1.0


def participants(fed: FedConfig, round_: int) -> list[int]:
    """The M clients that train in this round (seeded; everyone at participation 1)."""
    if fed.clients_per_round == fed.num_clients:
        return list(range(fed.num_clients))
    chosen = np.random.default_rng([fed.seed, round_, 3]).choice(fed.num_clients, fed.clients_per_round, replace=False)
    return sorted(int(c) for c in chosen)


def aggregation_weights(fed: FedConfig, clients: list[int], client_sizes: np.ndarray | None) -> np.ndarray:
    if fed.aggregation == "samples":
        if client_sizes is None:
            raise ValueError("aggregation='samples' needs client_sizes")
        sizes = np.asarray([client_sizes[c] for c in clients], np.float64)
        return sizes / sizes.sum()
    return np.full(len(clients), 1.0 / len(clients))


def merges_at(fed: FedConfig, t: int, participants_of: Callable[[int], list[int]]) -> list[tuple[int, list[int]]]:
    """[(round r, clients whose delta of round r arrives at the end of round t)], oldest round first:
    client c's delta of round r arrives at the end of round r + s_c. `participants_of(r)`: round r's
    clients with a delta in flight (the simulator's pending set, the runtime's plans)."""
    s = fed.stalenesses
    rounds = range(max(0, t - max(s)), min(t, fed.rounds - 1) + 1)
    due = [(r, [c for c in participants_of(r) if r + s[c] == t]) for r in rounds]
    return [(r, arrived) for r, arrived in due if arrived]


def lateness(fed: FedConfig, client: int) -> int:
    """tau of a client's deltas: rounds later than the fastest client's (0 for everyone when s is one value)."""
    return fed.stalenesses[client] - min(fed.stalenesses)


def merge_weights(
    fed: FedConfig, round_clients: list[int], merged: list[int], client_sizes=None, lost=()
) -> np.ndarray:
    """Each merged delta's weight: its weight among the round's participants (1/M, or by sample count),
    times (1 + tau)^-a when `staleness_weight` a is set. A late delta adds its share; it does not
    renormalise the others. `lost`: participants left out of the round (silent or rejected): the
    weights are renormalised over the others."""
    kept = [c for c in round_clients if c not in lost]
    everyone = aggregation_weights(fed, kept, client_sizes)
    weights = np.array([everyone[kept.index(c)] for c in merged])
    a = fed.options.staleness_weight or 0.0
    if a > 0:
        weights = weights * np.array([(1.0 + lateness(fed, c)) ** -a for c in merged])
    return weights


def split_late(fed: FedConfig, arrived: list[int]) -> tuple[list[int], list[int]]:
    """(the clients whose deltas are merged, those that `max_staleness` drops)."""
    late = [c for c in arrived if fed.options.max_staleness and lateness(fed, c) > fed.options.max_staleness]
    return [c for c in arrived if c not in late], late
