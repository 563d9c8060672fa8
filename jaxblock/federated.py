"""The round loop every federated algorithm shares, as pure functions over any params pytree.

The simulator keeps the lean form of `SPEC.md`: a client's model is always

    server_params + eta * sum(the client's own pending deltas)

(then `Algorithm.client_model`, e.g. FLoRA's fresh adapter), where a pending delta is one the
client has uploaded but the server has not yet aggregated. N simulated clients therefore cost one
model plus their pending block uploads, never N copies.

One round function serves every algorithm; each `jaxblock/algorithms/` module says only where
its method differs from FedBCD (what trains, where a client starts, what crosses the wire, how the
server merges). E.g. ParaBlock, staleness s >= 1: round r's deltas are aggregated at the end of
round r + s, and the client's correction for block b_r happens then (it drops its own pending
delta and the server model now holds the aggregate); after the last round a flush drains the s
rounds in flight. FedBCD is staleness 0; Fed full FT is FedBCD over one block of every parameter.

Example (a toy model; see README "Library use"):
    part = blocks.partition(params, [("w", "weights"), ("b", "bias")])
    fed = FedConfig(algorithm="parablock", rounds=20, num_clients=4, local_steps=5)
    state, history = run(fed, params, loss_fn, batches_fn, part, optax.sgd(0.1))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxblock import algorithms, transport
from jaxblock import blocks as blocks_lib
from jaxblock.algorithms import apply_aggregate, axpy, weighted_sum
from jaxblock.local import LossFn, make_local_train

ALGORITHMS = algorithms.NAMES
SCHEDULES = ("random", "sequential", "reverse", "cyclic", "gradient")
LR_DECAYS = ("none", "linear", "cosine")

# batches_fn(client, position, k) -> (pytree of [k, ...] arrays, next position): the client's next
# k batches from a data position; pure, so that a resumed run sees exactly the same data.
BatchesFn = Callable[[int, int, int], tuple[Any, int]]


@dataclasses.dataclass(frozen=True)
class FedConfig:
    algorithm: str = "parablock"  # one of ALGORITHMS (jaxblock/algorithms/)
    rounds: int = 10  # T
    num_clients: int = 10  # N
    local_steps: int = 10  # K
    eta: float = 1.0  # global (server) learning rate
    staleness: int = 1  # s, ParaBlock only: round r's deltas are aggregated at the end of round r + s
    participation: float = 1.0  # fraction of clients sampled each round (M = ceil(fraction * N))
    aggregation: str = "uniform"  # 'uniform' or 'samples' (weights proportional to client sizes)
    schedule: str = "random"  # which block each round trains, see `choose_block`
    wire_dtype: str = "float32"  # deltas and aggregates are rounded to this on the wire ('bfloat16')
    # The local learning rate across rounds: round t trains with eta_l * lr_factor(fed, t), see there.
    lr_decay: str = "none"  # 'none', 'linear' or 'cosine'
    lr_decay_alpha: float = 0.0  # the factor that the decay reaches at t = T
    seed: int = 0

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.aggregation not in ("uniform", "samples"):
            raise ValueError(f"aggregation={self.aggregation!r}: choose 'uniform' or 'samples'")
        for name in ("rounds", "num_clients", "local_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: need at least 1")
        if self.algorithm == "parablock" and self.staleness < 1:
            raise ValueError(f"staleness={self.staleness}: ParaBlock needs staleness >= 1 (0 is FedBCD)")
        if not 0 < self.participation <= 1:
            raise ValueError(f"participation={self.participation}: must be in (0, 1]")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay={self.lr_decay!r}: choose one of {', '.join(LR_DECAYS)}")
        if not 0 <= self.lr_decay_alpha <= 1:
            raise ValueError(f"lr_decay_alpha={self.lr_decay_alpha}: must be in [0, 1]")
        if self.wire_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"wire_dtype={self.wire_dtype!r}: choose 'float32' or 'bfloat16'")

    @property
    def effective_staleness(self) -> int:
        """Rounds between an upload and its aggregation: s for ParaBlock, 0 for the others."""
        return algorithms.REGISTRY[self.algorithm].staleness(self)

    @property
    def clients_per_round(self) -> int:
        return max(1, math.ceil(self.participation * self.num_clients - 1e-9))


# ----------------------------------------------------------------------------- state


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


def server_merge(
    params: dict, partition: blocks_lib.Partition, block_id: int, deltas: list[dict], weights: np.ndarray, eta: float
) -> dict:
    """[params]_b += eta * sum_i w_i delta_i; every other leaf is returned untouched."""
    return apply_aggregate(params, partition, block_id, aggregate_deltas(deltas, weights), eta)


def aggregate_deltas(deltas: list[dict], weights: np.ndarray, wire_dtype: str = "float32") -> dict:
    """sum_i w_i delta_i, rounded to the wire dtype (what the server publishes and applies itself)."""
    return _on_wire(weighted_sum(deltas, jnp.asarray(weights, jnp.float32)), wire_dtype)


def _on_wire(tree: dict, wire_dtype: str) -> dict:
    return tree if wire_dtype == "float32" else transport.to_wire(tree, wire_dtype)


def _pending_in_order(state: dict) -> list[dict]:
    return [state["pending"][r] for r in sorted(state["pending"])]


# ----------------------------------------------------------------------------- schedules


def choose_block(
    fed: FedConfig, round_: int, num_blocks: int, gradient_norms: Callable[[], np.ndarray] | None = None
) -> int:
    """b_t. random: seeded, uniform with replacement (the paper's default); sequential: 0,1,..,B-1,0,..;
    reverse: B-1,..,0,B-1,..; cyclic: every B rounds a fresh seeded permutation (each block once
    per cycle); gradient: the block with the largest gradient norm (`gradient_norms()`)."""
    if num_blocks == 1:  # Fed full FT and the LoRA methods: nothing to choose
        return 0
    if fed.schedule == "random":
        return int(np.random.default_rng([fed.seed, round_, 1]).integers(num_blocks))
    if fed.schedule == "sequential":
        return round_ % num_blocks
    if fed.schedule == "reverse":
        return num_blocks - 1 - round_ % num_blocks
    if fed.schedule == "cyclic":
        order = np.random.default_rng([fed.seed, round_ // num_blocks, 2]).permutation(num_blocks)
        return int(order[round_ % num_blocks])
    return int(np.argmax(gradient_norms()))


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


# ----------------------------------------------------------------------------- rounds


def algorithm_partition(fed: FedConfig, params, partition: blocks_lib.Partition) -> blocks_lib.Partition:
    """The partition a (non-LoRA) algorithm trains over: one block of every leaf for Fed full FT."""
    return algorithms.make(fed).partition(params, partition)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What a round needs besides the state: the problem (loss, data, blocks) and the local trainer."""

    fed: FedConfig
    loss_fn: LossFn
    batches_fn: BatchesFn
    partition: blocks_lib.Partition
    local_train: Callable  # from local.make_local_train
    client_sizes: np.ndarray | None = None
    store: transport.Store | None = None  # if set, every exchange goes through this TensorStore
    algorithm: algorithms.Algorithm | None = None  # default: algorithms.make(fed)

    def __post_init__(self):
        if self.algorithm is None:
            object.__setattr__(self, "algorithm", algorithms.make(self.fed))


def make_trainer(
    fed: FedConfig,
    loss_fn: LossFn,
    batches_fn: BatchesFn,
    partition: blocks_lib.Partition,
    optimizer,
    *,
    client_sizes=None,
    layout=None,
    param_shardings=None,
    store: transport.Store | None = None,
    algorithm: algorithms.Algorithm | None = None,
) -> Trainer:
    """Binds the problem to the algorithm; `partition` is the one it trains over (`algorithm_partition`)."""
    train = make_local_train(loss_fn, optimizer, layout=layout, param_shardings=param_shardings)
    sizes = None if client_sizes is None else np.asarray(client_sizes)
    if sizes is not None and len(sizes) != fed.num_clients:
        raise ValueError(f"client_sizes has {len(sizes)} entries for num_clients={fed.num_clients}")
    return Trainer(fed, loss_fn, batches_fn, partition, train, sizes, store, algorithm)


def run_round(trainer: Trainer, state: dict) -> tuple[dict, dict]:
    """Runs round t = state['round']: local training on b_t, then the aggregation due this round.

    Returns the new state and the round's metrics.
    """
    fed, part, algo = trainer.fed, trainer.partition, trainer.algorithm
    t = state["round"]
    start = time.perf_counter()
    clients = participants(fed, t)
    positions = np.array(state["positions"], copy=True)

    schedule_s = 0.0
    if fed.schedule == "gradient" and part.num_blocks > 1:

        def norms():
            # One full backward pass of the server model on a calibration batch: the first
            # participant's next batch (its data position does not advance).
            batch, _ = trainer.batches_fn(clients[0], int(positions[clients[0]]), 1)
            return block_gradient_norms(trainer.loss_fn, state["params"], part, jax.tree.map(lambda x: x[0], batch))

        s0 = time.perf_counter()
        b = choose_block(fed, t, part.num_blocks, norms)
        schedule_s = time.perf_counter() - s0
    else:
        b = choose_block(fed, t, part.num_blocks)

    deltas, losses, compute_s = {}, [], {}
    lr_scale = lr_factor(fed, t)
    for c in clients:
        c0 = time.perf_counter()
        params_c = algo.client_model(client_params(state, part, c, fed.eta), c, t)
        block, frozen = part.split(params_c, b)
        batches, positions[c] = trainer.batches_fn(c, int(positions[c]), fed.local_steps)
        delta, loss = trainer.local_train(block, frozen, batches, lr_scale)
        deltas[c] = algo.upload(block, delta)
        losses.append(np.asarray(loss))  # waits for the computation: compute_s is real
        compute_s[c] = time.perf_counter() - c0
        del params_c, block, frozen

    pending = dict(state["pending"])
    pending[t] = {"block": b, "clients": clients, "deltas": deltas}
    state = {**state, "round": t + 1, "positions": positions, "pending": pending}
    aggregated = None
    due = t - fed.effective_staleness
    if due in pending:
        state = aggregate(trainer, state, due)
        aggregated = due
    losses = np.stack(losses)  # [M, K]
    up, down = algo.wire_params(part, b, clients)
    metrics = {
        "round": t,
        "block": b,
        "block_name": part.blocks[b].name,
        "clients": clients,
        "loss": float(losses.mean()),
        "loss_first_step": float(losses[:, 0].mean()),
        "loss_last_step": float(losses[:, -1].mean()),
        "aggregated_round": aggregated,
        "params_up": up,  # values each participant uploads (the link model turns them into bytes)
        "params_down": down,  # values every client downloads
        "lr_factor": lr_scale,
        "seconds": time.perf_counter() - start,
        "client_compute_s": compute_s,
    }
    if fed.schedule == "gradient":
        metrics["schedule_seconds"] = schedule_s
    return state, metrics


def aggregate(trainer: Trainer, state: dict, round_: int) -> dict:
    """Aggregates round `round_`'s pending uploads into the server model and drops them.

    A NaN/Inf in any upload raises FloatingPointError before the server model is touched.
    """
    entry = state["pending"][round_]
    clients = list(entry["clients"])
    uploads = [entry["deltas"][c] for c in clients]
    check_finite(uploads, clients, round_, entry["block"])
    fed, algo = trainer.fed, trainer.algorithm
    weights = aggregation_weights(fed, clients, trainer.client_sizes)

    def reduce(received):  # the server's side: what it sends down, rounded to the wire
        return _on_wire(algo.reduce(received, weights, clients), fed.wire_dtype)

    if trainer.store is not None:
        down = _exchange_through(trainer.store, fed, round_, clients, uploads, reduce)
    else:  # the same rounding, in memory: what the server receives and what it sends back
        down = reduce([_on_wire(u, fed.wire_dtype) for u in uploads])
    params = algo.apply(state["params"], trainer.partition, entry["block"], down, fed.eta)
    pending = {r: e for r, e in state["pending"].items() if r != round_}
    return {**state, "params": params, "pending": pending}


def check_finite(deltas: list[dict], clients: list[int], round_: int, block: int) -> None:
    """FloatingPointError naming the first client whose delta has a NaN/Inf."""
    for c, d in zip(clients, deltas, strict=True):
        if not all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(d)):
            raise FloatingPointError(f"round {round_}: client {c}'s delta for block {block} has NaN/Inf")


def _exchange_through(store: transport.Store, fed: FedConfig, round_: int, clients, uploads, reduce) -> dict:
    """Round `round_`'s exchange through a real Store: clients publish, the server fetches, reduces,
    publishes the result, clients fetch it. The round's keys are deleted afterwards."""
    for c, u in zip(clients, uploads, strict=True):
        store.publish(transport.delta_prefix(round_, c), jax.device_get(u), fed.wire_dtype)
    received = [
        store.wait_fetch(transport.delta_prefix(round_, c), 60.0, f"round {round_}: client {c}")[0] for c in clients
    ]
    store.publish(transport.aggregate_prefix(round_), jax.device_get(reduce(received)), fed.wire_dtype)
    aggregate_, _ = store.wait_fetch(transport.aggregate_prefix(round_), 60.0, f"round {round_}: aggregate")
    store.delete_round(round_)
    return aggregate_


def flush(trainer: Trainer, state: dict) -> dict:
    """After the last round: aggregate every round still in flight, oldest first."""
    for r in sorted(state["pending"]):
        state = aggregate(trainer, state, r)
    return state


def run(
    fed: FedConfig,
    params: dict,
    loss_fn: LossFn,
    batches_fn: BatchesFn,
    partition: blocks_lib.Partition,
    optimizer,
    *,
    client_sizes=None,
    state: dict | None = None,
    on_round: Callable[[dict, dict], None] | None = None,
    **trainer_kw,
) -> tuple[dict, list[dict]]:
    """Runs T rounds (from `state` if resuming) and the final flush.

    Returns the final state (its 'params' are theta_T) and the per-round metrics. `on_round(state,
    metrics)` is called after each round, e.g. to log and checkpoint.
    """
    algorithm = trainer_kw.pop("algorithm", None) or algorithms.make(fed)
    partition = algorithm.partition(params, partition)
    trainer = make_trainer(
        fed, loss_fn, batches_fn, partition, optimizer, client_sizes=client_sizes, algorithm=algorithm, **trainer_kw
    )
    state = init_state(fed, params) if state is None else state
    history = []
    while state["round"] < fed.rounds:
        state, metrics = run_round(trainer, state)
        history.append(metrics)
        if on_round is not None:
            on_round(state, metrics)
    return flush(trainer, state), history
