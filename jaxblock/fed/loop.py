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

from jaxblock.fed import algorithms, validate, wire
from jaxblock.fed import blocks as blocks_lib
from jaxblock.fed.algorithms import apply_aggregate, axpy, topk, weighted_sum
from jaxblock.fed.local import LossFn, make_local_train
from jaxblock.net import transport

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
    # s, ParaBlock only: round r's deltas are aggregated at the end of round r + s. A tuple gives each
    # client its own s_i (a slow link): client i's delta of round r is merged at the end of r + s_i.
    staleness: int | tuple[int, ...] = 1
    # Weights of late deltas, (1 + tau)^-a with tau the delta's lateness beyond the fastest client's
    # (FedBuff: versions behind); None = the algorithm's own (FedBuff 0.5, its paper; else 0, no weights).
    staleness_weight: float | None = None
    max_staleness: int = 0  # a delta later than this (tau > max) is dropped, not merged; 0 = no limit
    compression: str = "none"  # 'topk': clients upload the top `topk_ratio` of each leaf, keep the rest
    topk_ratio: float = 0.2
    # FedBuff (asynchronous, modelled times): buffer Z (0 = N), block updates instead of full ones,
    # each client's compute slowdown (() = all 1), modelled seconds of one local step at slowdown 1.
    buffer_size: int = 0
    fedbuff_blocks: bool = False
    client_slowdown: tuple[float, ...] = ()
    step_seconds: float = 0.1
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
        if isinstance(self.staleness, tuple):
            if len(self.staleness) != self.num_clients:
                raise ValueError(f"staleness lists {len(self.staleness)} values for num_clients={self.num_clients}")
            if self.algorithm != "parablock":
                raise ValueError(f"staleness={list(self.staleness)}: a per-client staleness is ParaBlock's")
        if self.algorithm == "parablock" and min(self.stalenesses) < 1:
            raise ValueError(f"staleness={self.staleness}: ParaBlock needs staleness >= 1 (0 is FedBCD)")
        if self.staleness_weight is not None and not self.staleness_weight >= 0:
            raise ValueError(f"staleness_weight={self.staleness_weight}: must be >= 0")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness={self.max_staleness}: must be >= 0 (0 = no limit)")
        if self.compression not in ("none", "topk"):
            raise ValueError(f"compression={self.compression!r}: choose 'none' or 'topk'")
        if not 0 < self.topk_ratio <= 1:
            raise ValueError(f"topk_ratio={self.topk_ratio}: must be in (0, 1]")
        if self.compression != "none" and self.algorithm not in ("parablock", "fedbcd"):
            raise ValueError(f"compression={self.compression!r}: top-k is for ParaBlock and FedBCD")
        if self.client_slowdown and len(self.client_slowdown) != self.num_clients:
            raise ValueError(
                f"client_slowdown lists {len(self.client_slowdown)} values for num_clients={self.num_clients}"
            )
        if not 0 < self.participation <= 1:
            raise ValueError(f"participation={self.participation}: must be in (0, 1]")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay={self.lr_decay!r}: choose one of {', '.join(LR_DECAYS)}")
        if not 0 <= self.lr_decay_alpha <= 1:
            raise ValueError(f"lr_decay_alpha={self.lr_decay_alpha}: must be in [0, 1]")
        if self.wire_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"wire_dtype={self.wire_dtype!r}: choose 'float32' or 'bfloat16'")

    @property
    def stalenesses(self) -> tuple[int, ...]:
        """Each client's rounds between an upload and its merge: s_i for ParaBlock, 0 for the others."""
        s = algorithms.REGISTRY[self.algorithm].staleness(self)
        return tuple(s) if isinstance(s, tuple) else (s,) * self.num_clients

    @property
    def effective_staleness(self) -> int:
        """The most rounds an upload takes to be merged (the final flush drains that many)."""
        return max(self.stalenesses)

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
    return tree if wire_dtype == "float32" else wire.to_wire(tree, wire_dtype)


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
    links: tuple[wire.Link, ...] | None = None  # each client's link (FedBuff's modelled times)
    policy: validate.Policy = validate.Policy()  # which uploads the server accepts (validate.py)
    client_batch: int = 1  # clients trained at once in a round (`client_batch_size`), 1 = one by one

    def __post_init__(self):
        if self.algorithm is None:
            object.__setattr__(self, "algorithm", algorithms.make(self.fed))
        if self.links is None:
            object.__setattr__(self, "links", (wire.Link(),) * self.fed.num_clients)

    def init_state(self, params: dict) -> dict:
        """Round 0's state (an asynchronous algorithm's own, with its clients' clocks)."""
        if self.algorithm.asynchronous:
            return self.algorithm.init_state(params, self.links)
        return init_state(self.fed, params)


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
    links=None,
    policy: validate.Policy | None = None,
    client_batch: int = 1,
) -> Trainer:
    """Binds the problem to the algorithm; `partition` is the one it trains over (`algorithm_partition`)."""
    train = make_local_train(loss_fn, optimizer, layout=layout, param_shardings=param_shardings)
    sizes = None if client_sizes is None else np.asarray(client_sizes)
    if sizes is not None and len(sizes) != fed.num_clients:
        raise ValueError(f"client_sizes has {len(sizes)} entries for num_clients={fed.num_clients}")
    return Trainer(
        fed, loss_fn, batches_fn, partition, train, sizes, store, algorithm, links and tuple(links),
        policy or validate.Policy(), client_batch,
    )  # fmt: skip


def run_round(trainer: Trainer, state: dict) -> tuple[dict, dict]:
    """Runs round t = state['round']: local training on b_t, then the aggregation due this round.

    Returns the new state and the round's metrics.
    """
    fed, part, algo = trainer.fed, trainer.partition, trainer.algorithm
    if algo.asynchronous:
        return algo.run_round(trainer, state)
    t = state["round"]
    start = time.perf_counter()
    clients = algo.participants(fed, t)
    positions = np.array(state["positions"], copy=True)

    schedule_s = 0.0
    if fed.schedule == "gradient" and part.num_blocks > 1:

        def norms():
            # One full backward pass of the server model on a calibration batch: the first
            # participant's next batch (its data position does not advance).
            batch, _ = trainer.batches_fn(clients[0], int(positions[clients[0]]), 1)
            return block_gradient_norms(trainer.loss_fn, state["params"], part, jax.tree.map(lambda x: x[0], batch))

        s0 = time.perf_counter()
        b = algo.choose_block(fed, t, part.num_blocks, norms)
        schedule_s = time.perf_counter() - s0
    else:
        b = algo.choose_block(fed, t, part.num_blocks)

    deltas, uploads, losses, compute_s = {}, {}, [], {}
    residuals = state.get("extra", {}).get("residuals", {})
    lr_scale = lr_factor(fed, t)
    for group in _groups(clients, trainer.client_batch):
        c0 = time.perf_counter()
        splits = [part.split(algo.client_model(client_params(state, part, c, fed.eta), c, t), b) for c in group]
        batches = []
        for c in group:
            batch, positions[c] = trainer.batches_fn(c, int(positions[c]), fed.local_steps)
            batches.append(batch)
        trained = {}
        for same in _same_shapes(splits):  # clients whose blocks differ in shape (FLoRA's ranks) apart
            if len(same) == 1:
                trained[same[0]] = trainer.local_train(*splits[same[0]], batches[same[0]], lr_scale)
                continue
            # one vmapped program for these clients; the leaves no block holds are shared
            shared = jax.tree.map(lambda label: label == blocks_lib.FROZEN, part.split(part.labels, b)[1])
            blocks_, frozens = zip(*(splits[i] for i in same), strict=True)
            out = trainer.local_train.batched(blocks_, frozens, [batches[i] for i in same], lr_scale, shared)
            trained.update(zip(same, out, strict=True))
        trained = [trained[i] for i in range(len(group))]
        for c, (block, _), (delta, loss) in zip(group, splits, trained, strict=True):
            deltas[c] = uploads[c] = algo.upload(block, delta)
            if fed.compression == "topk":  # the client's model keeps its whole delta; the wire gets the top k
                uploads[c], residuals = topk.send(residuals, c, b, deltas[c], fed.topk_ratio)
            losses.append(np.asarray(loss))  # waits for the computation: compute_s is real
        for c in group:  # a batched client's compute: its share of the group's
            compute_s[c] = (time.perf_counter() - c0) / len(group)
        del splits

    pending = dict(state["pending"])
    pending[t] = {"block": b, "clients": clients, "deltas": deltas}
    if fed.compression != "none":
        pending[t]["uploads"] = uploads
    state = {**state, "round": t + 1, "positions": positions, "pending": pending}
    if fed.compression == "topk":
        state["extra"] = {**state.get("extra", {}), "residuals": residuals}
    state, merged, dropped, rejected = merge_arrivals(trainer, state, t)
    losses = np.stack(losses)  # [M, K]
    up, down = algo.wire_params(part, b, clients, t)
    itemsize = wire.WIRE_DTYPES[fed.wire_dtype].itemsize
    metrics = {
        "round": t,
        "block": b,
        "block_name": part.blocks[b].name,
        "clients": clients,
        "loss": float(losses.mean()),
        "loss_first_step": float(losses[:, 0].mean()),
        "loss_last_step": float(losses[:, -1].mean()),
        "aggregated_round": merged[0][0] if merged else None,
        "merged": merged,  # [[round, [clients]], ...]: the deltas merged at the end of this round
        "dropped": dropped,  # [[round, client], ...]: deltas later than max_staleness, discarded
        "rejected": rejected,  # [[round, client, reason], ...]: uploads that failed validation, left out
        "params_up": up,  # values each participant uploads
        "params_down": down,  # values a client downloads (an int: every client; a dict: those clients)
        "bytes_up": [wire.payload_bytes(uploads[c], fed.wire_dtype) for c in clients],  # exact, sparse too
        "bytes_down": {str(c): n * itemsize for c, n in down.items()} if isinstance(down, dict) else down * itemsize,
        "lr_factor": lr_scale,
        "seconds": time.perf_counter() - start,
        "client_compute_s": compute_s,
    }
    if fed.schedule == "gradient":
        metrics["schedule_seconds"] = schedule_s
    return state, metrics


def _groups(clients: list[int], size: int) -> list[list[int]]:
    """The round's clients in consecutive groups of `size` (the simulator trains a group at once)."""
    return [clients[i : i + size] for i in range(0, len(clients), max(size, 1))]


def _same_shapes(splits: list[tuple[dict, dict]]) -> list[list[int]]:
    """Indices of `splits` grouped by the shapes of their (block, frozen) leaves, in order of first
    appearance: only same-shaped client models can be stacked into one batched program."""
    groups: dict[tuple, list[int]] = {}
    for i, split in enumerate(splits):
        groups.setdefault(tuple((x.shape, x.dtype) for x in jax.tree.leaves(split)), []).append(i)
    return list(groups.values())


def client_batch_size(
    setting: int, params: dict, clients_per_round: int, devices: int = 1, platform: str = "cpu"
) -> int:
    """How many clients the simulator trains at once (`sim.client_batch`): the setting if > 0, else
    (auto) on an accelerator every participant of a round when their stacked models fit in
    `BATCH_BYTES` on one device, and one at a time otherwise: under a mesh of several devices, and
    on the CPU, where a small model's loop is compute-bound already and batching measured no gain
    (BENCHMARKS.md "issue 17")."""
    if setting > 0:
        return setting
    model_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    fits = devices == 1 and clients_per_round * model_bytes <= BATCH_BYTES
    return clients_per_round if fits and platform != "cpu" else 1


BATCH_BYTES = 1 << 30  # auto client batching: at most 1 GiB of stacked client models


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
    a = fed.staleness_weight or 0.0
    if a > 0:
        weights = weights * np.array([(1.0 + lateness(fed, c)) ** -a for c in merged])
    return weights


def split_late(fed: FedConfig, arrived: list[int]) -> tuple[list[int], list[int]]:
    """(the clients whose deltas are merged, those that `max_staleness` drops)."""
    late = [c for c in arrived if fed.max_staleness and lateness(fed, c) > fed.max_staleness]
    return [c for c in arrived if c not in late], late


def dense_uploads(fed: FedConfig, partition: blocks_lib.Partition, params: dict, block: int, uploads: list[dict]):
    """The deltas the server received, as dense block trees (top-k uploads are densified)."""
    if fed.compression != "topk":
        return uploads
    shapes = jax.eval_shape(lambda: partition.block(params, block))
    return [topk.densify(u, shapes) for u in uploads]


def merge_arrivals(trainer: Trainer, state: dict, t: int) -> tuple[dict, list, list, list]:
    """Merges every delta that arrives at the end of round t (see `merges_at`); deltas later than
    `max_staleness` are dropped instead, and uploads that fail validation are rejected. Returns
    (state, merged [[r, clients]], dropped [[r, c]], rejected [[r, c, reason]])."""
    fed = trainer.fed
    merged, dropped, rejected = [], [], []

    def waiting(r: int) -> list[int]:
        entry = state["pending"].get(r)
        return [] if entry is None else [c for c in entry["clients"] if c in entry["deltas"]]

    for r, arrived in merges_at(fed, t, waiting):
        on_time, late = split_late(fed, arrived)
        if on_time:
            state, bad = aggregate(trainer, state, r, on_time, at=t)
            rejected += [[r, c, reason] for c, reason in bad.items()]
            if len(bad) < len(on_time):
                merged.append([r, [c for c in on_time if c not in bad]])
        if late:
            state = _forget(state, r, late)
            dropped += [[r, c] for c in late]
    return state, merged, dropped, rejected


def aggregate(
    trainer: Trainer, state: dict, round_: int, clients: list[int] | None = None, *, at: int | None = None
) -> tuple[dict, dict[int, str]]:
    """Merges `clients`' pending uploads of round `round_` (default: all of them) into the server
    model and drops them; a round whose deltas have all been merged leaves `pending`. `at`: the
    round at whose end they are merged (default: round_ + its staleness), naming the exchange.

    Every upload is screened first (`validate.screen`: finite, within the norm bounds): a rejected
    one is left out and its client's weight renormalised away ('drop'), or UpdateRejected ends the
    run before the server model is touched ('stop'). Returns (state, {client: reason} rejected).
    """
    entry = state["pending"][round_]
    clients = [c for c in entry["clients"] if c in entry["deltas"]] if clients is None else list(clients)
    sent = entry.get("uploads", entry["deltas"])
    bad = validate.screen({c: sent[c] for c in clients}, trainer.policy)
    validate.stop_if_asked(trainer.policy, round_, bad)
    lost = [*entry.get("lost", []), *bad]
    clients = [c for c in clients if c not in bad]
    params = state["params"]
    if clients:
        params = _merge(trainer, state, entry, round_, clients, lost, at)
    state = _forget(state, round_, [*clients, *bad])
    if bad and round_ in state["pending"]:  # a later merge of this round renormalises without them too
        state["pending"][round_] = {**state["pending"][round_], "lost": lost}
    return {**state, "params": params}, bad


def _merge(trainer: Trainer, state: dict, entry: dict, round_: int, clients: list[int], lost: list[int], at) -> dict:
    """The server model with `clients`' uploads of round `round_` merged (through the store if any)."""
    sent = entry.get("uploads", entry["deltas"])
    uploads = [sent[c] for c in clients]
    fed, algo = trainer.fed, trainer.algorithm
    weights = merge_weights(fed, entry["clients"], clients, trainer.client_sizes, lost)

    def reduce(received):  # the server's side: what it sends down, rounded to the wire
        received = dense_uploads(fed, trainer.partition, state["params"], entry["block"], received)
        return _on_wire(algo.reduce(received, weights, clients), fed.wire_dtype)

    if trainer.store is not None:
        at = round_ + fed.stalenesses[clients[0]] if at is None else at
        down = _exchange_through(trainer.store, fed, round_, at, clients, uploads, reduce)
    else:  # the same rounding, in memory: what the server receives and what it sends back
        down = reduce([_on_wire(u, fed.wire_dtype) for u in uploads])
    return algo.apply(state["params"], trainer.partition, entry["block"], down, fed.eta)


def _forget(state: dict, round_: int, clients: list[int]) -> dict:
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


def _exchange_through(store: transport.Store, fed: FedConfig, round_: int, at: int, clients, uploads, reduce) -> dict:
    """Round `round_`'s exchange through a real Store: clients publish, the server fetches, reduces,
    publishes the result, clients fetch it. The round's keys are deleted afterwards."""
    for c, u in zip(clients, uploads, strict=True):
        store.publish(transport.delta_prefix(round_, c), jax.device_get(u), fed.wire_dtype)
    received = [
        store.wait_fetch(transport.delta_prefix(round_, c), 60.0, f"round {round_}: client {c}")[0] for c in clients
    ]
    prefix = transport.aggregate_prefix(round_, at)
    store.publish(prefix, jax.device_get(reduce(received)), fed.wire_dtype)
    aggregate_, _ = store.wait_fetch(prefix, 60.0, f"round {round_}: aggregate")
    store.delete_round(round_)
    return aggregate_


def flush(trainer: Trainer, state: dict) -> dict:
    """After the last round: merge every delta still in flight, in the order the rounds after the last
    would have merged them (for one staleness s: round T-s's deltas, then T-s+1's, ...). An
    asynchronous run ends with its last apply: what is still in flight is discarded."""
    if trainer.algorithm.asynchronous:
        return state
    s = trainer.fed.stalenesses
    while state["pending"]:
        t = min(r + s[c] for r, e in state["pending"].items() for c in e["deltas"])
        before = sum(len(e["deltas"]) for e in state["pending"].values())
        state = merge_arrivals(trainer, state, t)[0]  # rejections here are in no round's metrics
        if sum(len(e["deltas"]) for e in state["pending"].values()) == before:  # never loop forever
            raise RuntimeError(f"flush: nothing arrives at the end of round {t}; pending: {sorted(state['pending'])}")
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
    state = trainer.init_state(params) if state is None else state
    history = []
    while state["round"] < fed.rounds:
        state, metrics = run_round(trainer, state)
        history.append(metrics)
        if on_round is not None:
            on_round(state, metrics)
    return flush(trainer, state), history
