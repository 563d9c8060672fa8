"""The round loop every federated algorithm shares, as pure functions over any params pytree.

The simulator keeps the lean form of `SPEC.md`: a client's model is always

    server_params + eta * sum_r(lambda_r * the client's own pending delta of round r)

(lambda_r = `Algorithm.own_weight`: 1 in Algorithm 2, ParaBlock's `self_weight` otherwise; then
`Algorithm.client_model`, e.g. FLoRA's fresh adapter), where a pending delta is one the
client has uploaded but the server has not yet aggregated. N simulated clients therefore cost one
model plus their pending block uploads, never N copies.

One round function serves every algorithm; each `fed/algorithms/` module says only where
its method differs from FedBCD (what trains, where a client starts, what crosses the wire, how the
server merges). E.g. ParaBlock, staleness s >= 1: round r's deltas are aggregated at the end of
round r + s, and the client's correction for block b_r happens then (it drops its own pending
delta and the server model now holds the aggregate); after the last round a flush drains the s
rounds in flight. FedBCD is staleness 0; Fed full FT is FedBCD over one block of every parameter.

The loop is pure: no store, no files, no threads. Where an upload goes is the trainer's `exchange`
(`fed/exchange.py`: in memory by default, or through a store, `net/exchange.py`); what a client
sends and how the server reads it may be wrapped by update transforms (`fed/transforms.py`).

Example (a toy model; see README "Library use"):
    part = blocks.partition(params, [("w", "weights"), ("b", "bias")])
    fed = algorithms.configure(algorithm="parablock", rounds=20, num_clients=4, local_steps=5)
    state, history = run(fed, params, loss_fn, batches_fn, part, optax.sgd(0.1))
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxblock.fed import algorithms, validate, wire
from jaxblock.fed import blocks as blocks_lib
from jaxblock.fed import exchange as exchange_lib
from jaxblock.fed import transforms as transforms_lib
from jaxblock.fed.config import FedConfig
from jaxblock.fed.lean import client_params, forget, init_state, own_weights
from jaxblock.fed.local import LossFn, make_local_train
from jaxblock.fed.merge import apply_aggregate, weighted_sum
from jaxblock.fed.schedule import block_gradient_norms, lr_factor, merge_weights, merges_at, split_late

# batches_fn(client, position, k) -> (pytree of [k, ...] arrays, next position): the client's next
# k batches from a data position; pure, so that a resumed run sees exactly the same data.
BatchesFn = Callable[[int, int, int], tuple[Any, int]]


def server_merge(
    params: dict, partition: blocks_lib.Partition, block_id: int, deltas: list[dict], weights: np.ndarray, eta: float
) -> dict:
    """[params]_b += eta * sum_i w_i delta_i; every other leaf is returned untouched."""
    return apply_aggregate(params, partition, block_id, weighted_sum(deltas, np.asarray(weights, np.float32)), eta)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What a round needs besides the state: the problem (loss, data, blocks), the local trainer, and
    where uploads go (`exchange`: in memory unless told otherwise)."""

    fed: FedConfig
    loss_fn: LossFn
    batches_fn: BatchesFn
    partition: blocks_lib.Partition
    local_train: Callable  # from local.make_local_train
    client_sizes: np.ndarray | None = None
    exchange: Callable | None = None  # fed.exchange's interface; default InMemory(fed.wire_dtype)
    algorithm: algorithms.Algorithm | None = None  # default: algorithms.make(fed)
    links: tuple[wire.Link, ...] | None = None  # each client's link (FedBuff's modelled times)
    policy: validate.Policy = validate.Policy()  # which uploads the server accepts (validate.py)
    client_batch: int = 1  # clients trained at once in a round (`client_batch_size`), 1 = one by one

    def __post_init__(self):
        if self.algorithm is None:
            object.__setattr__(self, "algorithm", algorithms.make(self.fed))
        if self.links is None:
            object.__setattr__(self, "links", (wire.Link(),) * self.fed.num_clients)
        if self.exchange is None:
            object.__setattr__(self, "exchange", exchange_lib.InMemory(self.fed.wire_dtype))

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
    exchange: Callable | None = None,
    algorithm: algorithms.Algorithm | None = None,
    links=None,
    policy: validate.Policy | None = None,
    client_batch: int = 1,
) -> Trainer:
    """Binds the problem to the algorithm; `partition` is the one it trains over (`Algorithm.partition`)."""
    train = make_local_train(loss_fn, optimizer, layout=layout, param_shardings=param_shardings)
    sizes = None if client_sizes is None else np.asarray(client_sizes)
    if sizes is not None and len(sizes) != fed.num_clients:
        raise ValueError(f"client_sizes has {len(sizes)} entries for num_clients={fed.num_clients}")
    return Trainer(
        fed, loss_fn, batches_fn, partition, train, sizes, exchange, algorithm, links and tuple(links),
        policy or validate.Policy(), client_batch,
    )  # fmt: skip


# ----------------------------------------------------------------------------- a round


def run_round(trainer: Trainer, state: dict) -> tuple[dict, dict]:
    """Runs round t = state['round']: local training on b_t, then the merges due at its end.

    Returns the new state and the round's metrics.
    """
    fed, part, algo = trainer.fed, trainer.partition, trainer.algorithm
    if algo.asynchronous:
        return algo.run_round(trainer, state)
    t, start = state["round"], time.perf_counter()
    clients = algo.participants(fed, t)
    b, schedule_s = _choose_block(trainer, state, t, clients)
    # what the server announces with round t's plan (adaptive clipping's C_t), and the round's transforms
    announced, server = transforms_lib.announce(fed.transforms, transforms_lib.server_state(state), t)
    chain = transforms_lib.for_round(fed.transforms, announced)
    trained = train_clients(trainer, state, t, b, clients)
    deltas, uploads, extra = {}, {}, state.get("extra", {})
    for c, (block, delta, _) in trained["results"].items():
        deltas[c] = algo.upload(block, delta)  # the client's model keeps this; the wire gets the transforms'
        uploads[c], extra = transforms_lib.encode(chain, extra, c, b, deltas[c])
    entry = {"block": b, "clients": clients, "deltas": deltas}
    if fed.transforms:  # what crossed the wire, kept until merged (a restarted client resends it)
        entry["uploads"] = uploads
    state = {**state, "round": t + 1, "positions": trained["positions"], "pending": {**state["pending"], t: entry}}
    state = transforms_lib.with_server_state(state, server)
    if extra:
        state["extra"] = extra
    state, merged, dropped, rejected = merge_arrivals(trainer, state, t)
    losses = np.stack([loss for _, _, loss in trained["results"].values()])  # [M, K]
    metrics = {
        "round": t,
        "block": b,
        "block_name": part.blocks[b].name,
        "clients": clients,
        "loss": float(losses.mean()),
        "client_loss": [float(trained["results"][c][2].mean()) for c in clients],  # each one's mean over its steps
        "loss_first_step": float(losses[:, 0].mean()),
        "loss_last_step": float(losses[:, -1].mean()),
        "aggregated_round": merged[0][0] if merged else None,
        "merged": merged,  # [[round, [clients]], ...]: the deltas merged at the end of this round
        "dropped": dropped,  # [[round, client], ...]: deltas later than max_staleness, discarded
        "rejected": rejected,  # [[round, client, reason], ...]: uploads that failed validation, left out
        **wire_metrics(algo, part, b, clients, t, [uploads[c] for c in clients]),
        "lr_factor": trained["lr_factor"],
        "seconds": time.perf_counter() - start,
        "client_compute_s": trained["compute_s"],
        **announced,  # e.g. clip_norm: the C_t its clients clipped to
    }
    if fed.schedule == "gradient":
        metrics["schedule_seconds"] = schedule_s
    return state, metrics


def _choose_block(trainer: Trainer, state: dict, t: int, clients: list[int]) -> tuple[int, float]:
    """(b_t, seconds the schedule took: the gradient schedule's full backward pass)."""
    fed, part, algo = trainer.fed, trainer.partition, trainer.algorithm
    if fed.schedule != "gradient" or part.num_blocks == 1:
        return algo.choose_block(fed, t, part.num_blocks), 0.0

    def norms():
        # One full backward pass of the server model on a calibration batch: the first
        # participant's next batch (its data position does not advance).
        batch, _ = trainer.batches_fn(clients[0], int(state["positions"][clients[0]]), 1)
        return block_gradient_norms(trainer.loss_fn, state["params"], part, jax.tree.map(lambda x: x[0], batch))

    s0 = time.perf_counter()
    return algo.choose_block(fed, t, part.num_blocks, norms), time.perf_counter() - s0


def train_clients(trainer: Trainer, state: dict, t: int, b: int, clients: list[int]) -> dict:
    """Every participant's LocalBlockTraining of block b from its own model (the lean form), in
    groups of `trainer.client_batch` (a group's same-shaped clients run as one vmapped program).

    Returns {results: {client: (its block before, delta, losses [K])}, positions: the data positions
    after, compute_s: {client: seconds}, lr_factor}."""
    fed, part, algo = trainer.fed, trainer.partition, trainer.algorithm
    positions = np.array(state["positions"], copy=True)
    results, compute_s, lr_scale = {}, {}, lr_factor(fed, t)
    for group in _groups(clients, trainer.client_batch):
        c0 = time.perf_counter()
        own = {c: own_weights(algo, c, trainer.client_sizes) for c in group}  # ParaBlock's self_weight
        splits = [part.split(algo.client_model(client_params(state, part, c, fed.eta, own[c]), c, t), b) for c in group]
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
        for i, c in enumerate(group):
            delta, loss = trained[i]
            results[c] = (splits[i][0], delta, np.asarray(loss))  # waits for the computation: compute_s is real
        for c in group:  # a batched client's compute: its share of the group's
            compute_s[c] = (time.perf_counter() - c0) / len(group)
        del splits
    return {"results": results, "positions": positions, "compute_s": compute_s, "lr_factor": lr_scale}


def wire_metrics(algo, part, b: int, clients: list[int], t: int, uploads: list[dict]) -> dict:
    """What round t puts on the wire: values (params_up, params_down) and exact bytes (sparse too)."""
    up, down = algo.wire_params(part, b, clients, t)
    itemsize = wire.WIRE_DTYPES[algo.fed.wire_dtype].itemsize
    return {
        "params_up": up,  # values each participant uploads
        "params_down": down,  # values a client downloads (an int: every client; a dict: those clients)
        "bytes_up": [wire.payload_bytes(u, algo.fed.wire_dtype) for u in uploads],
        "bytes_down": {str(c): n * itemsize for c, n in down.items()} if isinstance(down, dict) else down * itemsize,
    }


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


# ----------------------------------------------------------------------------- merges


def merge_arrivals(trainer: Trainer, state: dict, t: int) -> tuple[dict, list, list, list]:
    """Merges every delta that arrives at the end of round t (see `schedule.merges_at`); deltas later
    than `max_staleness` are dropped instead, and uploads that fail validation are rejected. Returns
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
            state = forget(state, r, late)
            dropped += [[r, c] for c in late]
    return state, merged, dropped, rejected


def aggregate(
    trainer: Trainer, state: dict, round_: int, clients: list[int] | None = None, *, at: int | None = None
) -> tuple[dict, dict[int, str]]:
    """Merges `clients`' pending uploads of round `round_` (default: all of them) into the server
    model through the trainer's exchange, and drops them; a round whose deltas have all been merged
    leaves `pending`. `at`: the round at whose end they are merged (default: round_ + its staleness).

    The server's side (`exchange.server_side`) screens every upload first (finite, within the norm
    bounds): a rejected one is left out and its client's weight renormalised away ('drop'), or
    UpdateRejected ends the run before the server model is touched ('stop'). Returns (state,
    {client: reason} rejected).
    """
    fed, algo = trainer.fed, trainer.algorithm
    entry = state["pending"][round_]
    clients = [c for c in entry["clients"] if c in entry["deltas"]] if clients is None else list(clients)
    at = round_ + fed.stalenesses[clients[0]] if at is None else at
    sent = entry.get("uploads", entry["deltas"])
    lost = entry.get("lost", [])

    def weights_of(kept: list[int], bad: list[int]) -> np.ndarray:
        return merge_weights(fed, entry["clients"], kept, trainer.client_sizes, [*lost, *bad])

    like = jax.eval_shape(lambda: entry["deltas"][clients[0]])  # a dense upload's shapes
    transforms_state = transforms_lib.server_state(state)
    announced = transforms_lib.announced(transforms_state, round_)
    server = exchange_lib.server_side(algo, round_, like, weights_of, trainer.policy, announced=announced)
    result = trainer.exchange(round_, at, {c: sent[c] for c in clients}, server)
    params = state["params"]
    if result.down is not None:
        params = algo.apply(params, trainer.partition, entry["block"], result.down, fed.eta)
    state = forget(state, round_, clients)
    if result.report:  # e.g. adaptive clipping's noised fraction of unclipped uploads: the next C
        state = transforms_lib.with_server_state(
            state, transforms_lib.observe(fed.transforms, transforms_state, round_, result.report)
        )
    if result.rejected and round_ in state["pending"]:  # a later merge of this round renormalises without them
        state["pending"][round_] = {**state["pending"][round_], "lost": [*lost, *result.rejected]}
    return {**state, "params": params}, result.rejected


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


def run_rounds(trainer: Trainer, state: dict, hooks=()) -> dict:
    """Runs the rounds left (state['round'] .. T-1); after each, every `hook(state, metrics)` (what a
    run does each round, as Levanter's `Trainer.add_hook`: log, checkpoint, a progress bar)."""
    while state["round"] < trainer.fed.rounds:
        state, metrics = run_round(trainer, state)
        for hook in hooks:
            hook(state, metrics)
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
    history = []
    hooks = [lambda s, m: history.append(m), *([on_round] if on_round else [])]
    state = run_rounds(trainer, trainer.init_state(params) if state is None else state, hooks)
    return flush(trainer, state), history
