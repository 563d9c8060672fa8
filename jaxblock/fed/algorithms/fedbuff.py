"""FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation") as a
deterministic, resumable, event-driven simulation.

Every client loops: pull the server's current model (version v), train K local steps, upload its
delta. The server appends each arriving delta to a buffer and, as soon as the buffer holds Z of
them, applies

    params += eta * (1/Z) * sum_k w(tau_k) * delta_k,   tau_k = version - v_k,   w(tau) = (1 + tau)^-a

(into each delta's own block when block updates are on), then version += 1. Deltas older than
`fed.options.max_staleness` (> 0) are dropped on arrival and not counted in the buffer.

Time is modelled, never measured, so a run is deterministic: a client that pulls at time t arrives
at t + down + compute + up, with down/up = its `wire.Link`'s seconds for the float32 bytes
pulled/uploaded and compute = step_seconds * K * slowdown[client]. A client's delta is computed
when it pulls (the state holds in-flight deltas, never old model versions), so memory is one
model plus N in-flight and up to Z buffered deltas. Events at the same modelled time are processed
together in client-id order: every arrival first (an apply as soon as the buffer is full, the rest
going to the next buffer), then every client that arrived pulls the (possibly new) version. With
Z = N, equal speeds and a = 0 this is synchronous FedAvg, bit for bit.

One round is one server apply: `run_round` processes events until an apply has happened. The run
ends with the last round's apply; the deltas still in flight or buffered then are discarded (no
flush). Clients that arrive together with that apply pull at the start of the next round.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from jaxblock.fed import blocks as blocks_lib
from jaxblock.fed import lean, schedule, wire
from jaxblock.fed.algorithms.base import Algorithm
from jaxblock.fed.algorithms.parablock import check_lateness
from jaxblock.fed.config import Options
from jaxblock.fed.merge import apply_aggregate, weighted_sum

WIRE_BYTES = 4  # float32 on the wire
PAPER_EXPONENT = 0.5  # FedBuff's w(tau) = 1 / sqrt(1 + tau)


@dataclasses.dataclass(frozen=True)
class FedBuffOptions(Options):
    buffer_size: int = 0  # Z: the server applies every Z arrivals (0 = num_clients)
    fedbuff_blocks: bool = False  # each pull trains one layer block instead of every parameter
    client_slowdown: tuple[float, ...] = ()  # each client's compute slowdown (() = all 1)
    step_seconds: float = 0.1  # modelled seconds of one local step at slowdown 1
    staleness_weight: float | None = None  # w(tau) = (1 + tau)^-a; None = the paper's a = 0.5
    max_staleness: int = 0  # a delta more than this many versions behind is dropped (0 = no limit)

    def check(self, fed) -> None:
        if self.buffer_size < 0:
            raise ValueError(f"buffer_size={self.buffer_size}: must be >= 0 (0 = num_clients)")
        if self.client_slowdown and len(self.client_slowdown) != fed.num_clients:
            raise ValueError(
                f"client_slowdown lists {len(self.client_slowdown)} values for num_clients={fed.num_clients}"
            )
        if any(s <= 0 for s in self.client_slowdown):
            raise ValueError(f"client_slowdown={self.client_slowdown}: every value must be > 0")
        if self.step_seconds < 0:
            raise ValueError(f"step_seconds={self.step_seconds}: must be >= 0")
        check_lateness(self)
        ignored = {"participation": 1.0, "aggregation": "uniform", "schedule": "random", "wire_dtype": "float32"}
        for key, default in ignored.items():  # every client always works; blocks are drawn per pull
            if getattr(fed, key) != default:
                raise ValueError(f"{key}={getattr(fed, key)!r}: FedBuff runs with {key}={default!r}")


class FedBuff(Algorithm):
    """Full-parameter updates (one block of every leaf) unless `fedbuff_blocks`: then each pull
    trains one layer block, chosen by a seeded RNG of (seed, client, pull count)."""

    name = "fedbuff"
    Options = FedBuffOptions
    asynchronous = True

    def partition(self, params: dict, layer_partition: blocks_lib.Partition) -> blocks_lib.Partition:
        return layer_partition if self.fed.options.fedbuff_blocks else blocks_lib.full_partition(params)

    def init_state(self, params: dict, links: list[wire.Link]) -> dict:
        return init_state(self.fed, params, links)

    def run_round(self, trainer, state: dict) -> tuple[dict, dict]:
        return run_round(trainer, state, trainer.links)


# ----------------------------------------------------------------------------- settings


def buffer_size(fed) -> int:
    """Z: the updates the server waits for before applying (0 means N)."""
    return fed.options.buffer_size or fed.num_clients


def slowdown(fed, client: int) -> float:
    return float(fed.options.client_slowdown[client]) if fed.options.client_slowdown else 1.0


def staleness_weight(fed, tau: int) -> float:
    """w(tau) = (1 + tau)^-a, a = `fed.options.staleness_weight` (None: the paper's 0.5). Exactly 1.0 for
    a = 0 (no pow), so that equal-speed runs are bitwise FedAvg."""
    a = PAPER_EXPONENT if fed.options.staleness_weight is None else fed.options.staleness_weight
    return 1.0 if a == 0 else float((1.0 + tau) ** -a)


def choose_block(fed, client: int, pulls: int, num_blocks: int) -> int:
    """The block a client's `pulls`-th training updates: seeded by (seed, client, pulls); 0 if B = 1."""
    if num_blocks == 1:
        return 0
    return int(np.random.default_rng([fed.seed, client, pulls, 4]).integers(num_blocks))


def trainable_values(partition: blocks_lib.Partition) -> int:
    """Values a pull downloads: every block (frozen leaves never change, the client has them)."""
    return sum(b.params for b in partition.blocks)


def modeled_seconds(fed, partition: blocks_lib.Partition, link: wire.Link, client: int, block: int):
    """(down, compute, up) modelled seconds of one pull-train-upload of `block` by `client`."""
    down = link.seconds(WIRE_BYTES * trainable_values(partition))
    compute = fed.options.step_seconds * fed.local_steps * slowdown(fed, client)
    up = link.seconds(WIRE_BYTES * partition.blocks[block].params)
    return down, compute, up


def server_apply(params: dict, partition, deltas: list[dict], blocks: list[int], weights, eta: float) -> dict:
    """params_b += eta * sum_{k: b_k = b} weights_k delta_k for every block b in `blocks` (ascending)."""
    weights = np.asarray(weights, np.float64)
    for b in sorted(set(blocks)):
        idx = [k for k, bk in enumerate(blocks) if bk == b]
        total = weighted_sum([deltas[k] for k in idx], jnp.asarray(weights[idx], jnp.float32))
        params = apply_aggregate(params, partition, b, total, eta)
    return params


# ----------------------------------------------------------------------------- state


def init_state(fed, params: dict, links: list[wire.Link]) -> dict:
    """The state of `lean.init_state` (round = server version, pending always {}) plus

    extra: arrays, {"inflight": {"c<i>": client i's in-flight delta}} ({} while nobody is in flight).
    extra_meta: JSON-able, {"clock": modelled time of the last event, "clients": per client
      {"state": "pull" | "flight", "at": its pull or arrival time, "base": the version it trains on,
      "pulls": trainings started, "block": its in-flight delta's block}}.
    The buffer is not in the state: a round ends with the apply that empties it. Every client
    starts by pulling version 0 at time 0.
    """

    _check_links(fed, links)
    client = {"state": "pull", "at": 0.0, "base": 0, "pulls": 0, "block": 0}
    clients = [dict(client) for _ in range(fed.num_clients)]
    return {**lean.init_state(fed, params), "extra": {}, "extra_meta": {"clock": 0.0, "clients": clients}}


def _check_links(fed, links) -> None:
    if len(links) != fed.num_clients:
        raise ValueError(f"FedBuff got {len(links)} links for num_clients={fed.num_clients}")


# ----------------------------------------------------------------------------- rounds


def run_round(trainer, state: dict, links: list[wire.Link]) -> tuple[dict, dict]:
    """Processes events until one server apply (round t = state['round']) has happened.

    Pure: returns a new state and the round's metrics (see `loop.run_round`'s, plus staleness,
    dropped, blocks, modeled_time_s and modeled_rows); the input state is not modified. `block` is
    the first applied delta's block (0, "all" for full updates), `blocks` every applied delta's.
    loss* are means over the trainings started in this call (None if none was), lr_factor is that
    of trainings started on version t.
    """

    fed, part = trainer.fed, trainer.partition
    _check_links(fed, links)
    start = time.perf_counter()
    t = int(state["round"])
    meta = copy.deepcopy(state["extra_meta"])
    clients = meta["clients"]
    inflight = dict(state.get("extra", {}).get("inflight", {}))  # a checkpoint omits an empty extra
    positions = np.array(state["positions"], np.int64)
    params = state["params"]
    losses, compute_s, rows, dropped = [], {}, {}, []
    buffer = []  # (client, base version, block, delta) in arrival order
    z = buffer_size(fed)

    while True:
        now = min(c["at"] for c in clients)
        meta["clock"] = now
        arriving = [i for i, c in enumerate(clients) if c["state"] == "flight" and c["at"] == now]
        if not arriving:  # every arrival at `now` is in: the clients that arrived pull
            for i, c in enumerate(clients):
                if c["state"] == "pull" and c["at"] == now:
                    block = choose_block(fed, i, c["pulls"], part.num_blocks)
                    c.update(state="flight", base=t, block=block, pulls=c["pulls"] + 1)
                    c0 = time.perf_counter()
                    inflight[f"c{i}"], loss, positions[i] = _train(trainer, params, i, block, int(positions[i]), t)
                    losses.append(loss)
                    compute_s[i] = compute_s.get(i, 0.0) + time.perf_counter() - c0
                    down, compute, up = modeled_seconds(fed, part, links[i], i, block)
                    c["at"] = now + down + compute + up
                    _add_row(rows, t, i, block, compute, down + up, part)
            continue
        i = arriving[0]
        c = clients[i]
        delta = inflight.pop(f"c{i}")
        c["state"] = "pull"
        if fed.options.max_staleness > 0 and t - c["base"] > fed.options.max_staleness:
            dropped.append(i)
            continue
        buffer.append((i, c["base"], c["block"], delta))
        if len(buffer) == z:
            break

    applied, bases, blocks, deltas = (list(column) for column in zip(*buffer, strict=True))
    taus = [t - base for base in bases]
    for b in sorted(set(blocks)):
        idx = [k for k, bk in enumerate(blocks) if bk == b]
        lean.check_finite([deltas[k] for k in idx], [applied[k] for k in idx], t, b)
    weights = [staleness_weight(fed, tau) / z for tau in taus]
    params = server_apply(params, part, deltas, blocks, weights, fed.eta)
    new_state = {
        **state,
        "params": params,
        "round": t + 1,
        "positions": positions,
        "extra": {"inflight": inflight} if inflight else {},
        "extra_meta": meta,
    }
    losses = np.stack(losses) if losses else None  # [trainings, K]; None: no training started this round
    metrics = {
        "round": t,
        "block": blocks[0],
        "block_name": part.blocks[blocks[0]].name,
        "blocks": blocks,
        "clients": applied,
        "staleness": taus,
        "dropped": dropped,
        "loss": None if losses is None else float(losses.mean()),
        "loss_first_step": None if losses is None else float(losses[:, 0].mean()),
        "loss_last_step": None if losses is None else float(losses[:, -1].mean()),
        "aggregated_round": t,
        "params_up": [part.blocks[b].params for b in blocks],
        "params_down": trainable_values(part),
        "lr_factor": schedule.lr_factor(fed, t),
        "seconds": time.perf_counter() - start,
        "client_compute_s": compute_s,
        "modeled_time_s": meta["clock"],
        "modeled_rows": list(rows.values()),
    }
    return new_state, metrics


def _train(trainer, params: dict, client: int, block: int, position: int, version: int):
    """Client `client` trains `block` of the server model at `version`: (delta, losses [K], next position)."""

    fed = trainer.fed
    trained, frozen = trainer.partition.split(params, block)
    batches, position = trainer.batches_fn(client, position, fed.local_steps)
    delta, loss = trainer.local_train(trained, frozen, batches, schedule.lr_factor(fed, version))
    return delta, np.asarray(loss), position  # np.asarray waits: the caller's compute time is real


def _add_row(rows: dict, round_: int, client: int, block: int, compute: float, comm: float, part) -> None:
    """Adds one training to its client's modelled timeline row of this round (the first training's
    block names the row). An async client overlaps nothing with its own compute: all comm is exposed."""
    row = rows.setdefault(
        client,
        {"round": round_, "client": client, "block": block, "compute_s": 0.0, "comm_s": 0.0, "exposed_wait_s": 0.0,
         "bytes_up": 0, "bytes_down": 0, "modeled": True},
    )  # fmt: skip
    row["compute_s"] += compute
    row["comm_s"] += comm
    row["exposed_wait_s"] += comm
    row["bytes_up"] += WIRE_BYTES * part.blocks[block].params
    row["bytes_down"] += WIRE_BYTES * trainable_values(part)
