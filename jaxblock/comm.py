"""The communication runtime: a server loop and a client loop that exchange deltas through a Store.

Each runs in its own OS process (`scripts/server.py`, `scripts/client.py`) or, for benchmarks,
in threads of one process. A client keeps the lean state of `federated.py`: a replica of the
server model, advanced by applying every aggregate with the very function the server uses
(`federated.apply_aggregate`), plus its own pending delta. Its model is the replica plus eta x the
pending delta, so server and clients agree bitwise and the runtime reproduces the one-process
simulator exactly.

ParaBlock round t on a client: the main thread dispatches LocalBlockTraining for b_t (JAX's
async dispatch returns at once) while a host thread copies Delta_{t-1}^i off the device, uploads
it, waits for the aggregate Delta_{t-1} and downloads it; when both are done the client applies
the aggregate to its replica and drops its own Delta_{t-1}^i (Algorithm 2's correction). FedBCD
runs the same exchange after the compute, serially. Only block leaves cross the wire.

Cleanup (unless `keep_rounds`): each client, once it has applied the aggregate of round t,
writes `round/<t>/ack/<client>`; a client that then sees acks from all `num_clients` clients
deletes `round/<t>/`. Nobody reads or writes round t after that:
  - the server wrote the plan before the aggregate, read every delta before publishing the
    aggregate, and touches round t no more once it is published (which precedes every ack);
  - every client, participant or not, reads the plan at the start of round t and uploads its delta
    before it waits for the aggregate, and acks only once it has applied the aggregate: in
    ParaBlock during round t+1 (or after the final flush), having read round t+1's plan already;
    in FedBCD before round t+1. Its ack is its last access to round t.
The client whose ack lands last sees all of them, so someone always deletes; two clients may
both delete, which is harmless. Deletion needs every client's ack, so a client that never acks
(it died, or runs with keep_rounds) keeps every round from then on: cleanup fails safe. Nobody
waits for it: the server never reads an ack, and a client acks and deletes in a thread of its
own, beside its next computation and its next upload (a file:// delete takes ~0.15 s); it returns
once its acks are done.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxblock import algorithms, federated, transport
from jaxblock.blocks import Partition
from jaxblock.transport import Link, Store


@dataclasses.dataclass(frozen=True)
class CommConfig:
    store: str = "memory://"
    timeout_s: float = 600.0  # how long the server waits for a client's update (and clients for the server)
    keep_rounds: bool = False  # keep every round's keys (default: clients delete round t once all hold its aggregate)


def check_supported(fed: federated.FedConfig) -> None:
    if not algorithms.REGISTRY[fed.algorithm].runtime:
        raise ValueError(f"algorithm={fed.algorithm!r}: the multi-process runtime does not run it; use the simulator")
    if fed.effective_staleness > 1:
        raise ValueError(
            f"staleness={fed.staleness}: the runtime runs s = 1 (ParaBlock) and 0 (FedBCD); use the simulator"
        )
    if fed.schedule == "gradient":
        raise ValueError("schedule='gradient' needs the server to see data: use the simulator")


# ----------------------------------------------------------------------------- server


def serve(
    fed: federated.FedConfig,
    params: dict,
    partition: Partition,
    store: Store,
    comm: CommConfig,
    *,
    client_sizes=None,
    on_aggregate: Callable[[dict], None] | None = None,
) -> dict:
    """Publishes each round's plan, aggregates uploads, publishes aggregates; returns theta_T.

    A client that sends nothing within `comm.timeout_s` stops the server with TransportTimeout
    (after it has written `server/error` so that clients stop too); `on_aggregate(state)` runs
    after each aggregation (e.g. to checkpoint), so the last good model is saved. The clients
    delete the rounds (module docstring); the server leaves `server/done` when it has finished.
    """
    check_supported(fed)
    s = fed.effective_staleness
    state = federated.init_state(fed, params)
    plans: dict[int, dict] = {}

    def aggregate(r: int) -> None:
        plan = plans[r]
        deltas = []
        try:
            for c in plan["clients"]:
                what = f"round {r}: client {c} sent no update"
                delta, _ = store.wait_fetch(transport.delta_prefix(r, c), comm.timeout_s, what)
                deltas.append(delta)
            federated.check_finite(deltas, plan["clients"], r, plan["block"])
        except (transport.TransportTimeout, FloatingPointError) as e:
            store.put_json("server/error", {"message": str(e)})
            raise
        weights = federated.aggregation_weights(fed, plan["clients"], client_sizes)
        agg = federated.aggregate_deltas(deltas, weights, fed.wire_dtype)
        store.publish(transport.aggregate_prefix(r), jax.device_get(agg), fed.wire_dtype)
        state["params"] = federated.apply_aggregate(state["params"], partition, plan["block"], agg, fed.eta)
        state["round"] = r + 1
        if on_aggregate is not None:
            on_aggregate(state)

    for t in range(fed.rounds):
        plans[t] = {
            "block": federated.choose_block(fed, t, partition.num_blocks),
            "clients": federated.participants(fed, t),
        }
        store.put_json(transport.plan_key(t), plans[t])
        if t - s >= 0:
            aggregate(t - s)
    for r in range(max(fed.rounds - s, 0), fed.rounds):  # the final flush
        aggregate(r)
    store.put_json("server/done", {"rounds": fed.rounds})
    return state["params"]


# ----------------------------------------------------------------------------- client


@dataclasses.dataclass
class Exchange:
    """One round's communication thread result."""

    aggregate: dict
    bytes_up: int
    bytes_down: int
    comm_s: float


def _exchange(store: Store, comm: CommConfig, link: Link, client: int, r: int, own: dict | None, wire: str):
    """Upload own Delta_r (if any), wait for the aggregate of round r, download it; with link delays."""
    start = time.perf_counter()
    up = 0
    if own is not None:
        host = jax.device_get(own)  # device -> host, here in the communication thread
        t0 = time.perf_counter()
        up = store.publish(transport.delta_prefix(r, client), host, wire)
        link.hold(up, t0)
    manifest = store.wait_json(
        f"{transport.aggregate_prefix(r)}/COMMIT", comm.timeout_s, f"round {r}: no aggregate from the server"
    )
    t0 = time.perf_counter()
    agg, down = store.fetch(transport.aggregate_prefix(r), manifest)
    link.hold(down, t0)
    return Exchange(agg, up, down, time.perf_counter() - start)


def _release(store: Store, client: int, r: int, num_clients: int) -> None:
    """Acks round r's aggregate; the client that sees every ack deletes round r (module docstring)."""
    store.put_json(transport.ack_key(r, client), {})
    if store.acked(r) >= set(range(num_clients)):
        store.delete_round(r)


def run_client(
    client: int,
    fed: federated.FedConfig,
    params: dict,
    partition: Partition,
    local_train: Callable,
    batches_fn: federated.BatchesFn,
    store: Store,
    comm: CommConfig,
    link: Link,
    *,
    on_round: Callable[[dict], None] | None = None,
) -> dict:
    """Runs client `client` through every round and the final flush; returns its model replica.

    `on_round(timeline_row)` receives, per round: round, client, block, compute_s, comm_s,
    exposed_wait_s (time the compute thread sat idle waiting for communication), bytes_up,
    bytes_down, loss. Returns once its acks are written (and its cleanup done), so that a
    finished run leaves a clean store.
    """
    check_supported(fed)
    parablock = fed.effective_staleness == 1
    replica = {"params": params, "pending": {}}  # the lean client state (federated.client_params)
    position = 0
    blocks: dict[int, int] = {}
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"comm-{client}")
    cleaner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"cleanup-{client}")
    releases: list[concurrent.futures.Future] = []

    def own(r):
        entry = replica["pending"].get(r)
        return None if entry is None else entry["deltas"][client]

    def absorb(r: int, ex: Exchange) -> None:  # the correction: replica += aggregate, drop own delta
        replica["params"] = federated.apply_aggregate(replica["params"], partition, blocks[r], ex.aggregate, fed.eta)
        replica["pending"].pop(r, None)
        if not comm.keep_rounds:  # its own thread: neither the compute nor the next upload waits for a delete
            releases.append(cleaner.submit(_release, store, client, r, fed.num_clients))

    try:
        for t in range(fed.rounds):
            plan = store.wait_json(transport.plan_key(t), comm.timeout_s, f"round {t}: no plan from the server")
            blocks[t] = b = plan["block"]
            start = time.perf_counter()
            delta = losses = None
            if client in plan["clients"]:
                model = federated.client_params(replica, partition, client, fed.eta)
                block, frozen = partition.split(model, b)
                batches, position = batches_fn(client, position, fed.local_steps)
                lr_scale = federated.lr_factor(fed, t)
                delta, losses = local_train(block, frozen, batches, lr_scale)  # dispatched; runs asynchronously
            pending_comm = None
            if parablock and t > 0:
                pending_comm = executor.submit(_exchange, store, comm, link, client, t - 1, own(t - 1), fed.wire_dtype)
            if delta is not None:
                jax.block_until_ready(delta)
            compute_end = time.perf_counter()
            if delta is not None:
                replica["pending"][t] = {"block": b, "clients": [client], "deltas": {client: delta}}
            if parablock:
                ex = pending_comm.result() if pending_comm is not None else None
                if ex is not None:
                    absorb(t - 1, ex)
            else:  # FedBCD: communicate after computing, nothing overlaps
                ex = _exchange(store, comm, link, client, t, own(t), fed.wire_dtype)
                absorb(t, ex)
            end = time.perf_counter()
            row = {
                "round": t,
                "client": client,
                "block": b,
                "compute_s": compute_end - start,
                "comm_s": 0.0 if ex is None else ex.comm_s,
                "exposed_wait_s": end - compute_end,
                "bytes_up": 0 if ex is None else ex.bytes_up,
                "bytes_down": 0 if ex is None else ex.bytes_down,
                "loss": None if losses is None else float(np.mean(np.asarray(losses))),
            }
            if on_round is not None:
                on_round(row)
        if parablock and fed.rounds:  # final flush: Algorithm 2 lines 12-13
            start = time.perf_counter()
            r = fed.rounds - 1
            ex = _exchange(store, comm, link, client, r, own(r), fed.wire_dtype)
            absorb(r, ex)
            if on_round is not None:
                on_round(
                    {"round": "flush", "client": client, "block": blocks[r], "compute_s": 0.0, "comm_s": ex.comm_s,
                     "exposed_wait_s": time.perf_counter() - start, "bytes_up": ex.bytes_up,
                     "bytes_down": ex.bytes_down, "loss": None}
                )  # fmt: skip
        for release in releases:  # raises a failed ack or delete
            release.result()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        cleaner.shutdown(wait=False, cancel_futures=True)
    return replica["params"]


def run_in_threads(
    fed: federated.FedConfig,
    params: dict,
    partition: Partition,
    local_train: Callable,
    batches_fn: federated.BatchesFn,
    store: Store,
    comm: CommConfig,
    links: list[Link] | None = None,
    *,
    clients: list[int] | None = None,
    client_sizes=None,
    on_round: Callable[[dict], None] | None = None,
) -> tuple[dict, dict[int, dict]]:
    """The server and each client in threads of this process (benchmarks, tests, one-box runs).

    Returns (the server's theta_T, {client: its final model replica}). The first client error,
    or the server's, is re-raised.
    """
    clients = list(range(fed.num_clients)) if clients is None else clients
    links = links or [Link()] * fed.num_clients
    replicas: dict[int, dict] = {}
    errors: list[BaseException] = []

    def client_main(i: int) -> None:
        try:
            replicas[i] = run_client(
                i, fed, params, partition, local_train, batches_fn, store, comm, links[i], on_round=on_round
            )
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=client_main, args=(i,), name=f"client-{i}") for i in clients]
    for th in threads:
        th.start()
    try:
        server_params = serve(fed, params, partition, store, comm, client_sizes=client_sizes)
    finally:
        for th in threads:
            th.join()
    if errors:
        raise errors[0]
    return server_params, replicas


# ----------------------------------------------------------------------------- timelines


def modeled_timeline(
    fed: federated.FedConfig, partition: Partition, links: list[Link], history: list[dict]
) -> list[dict]:
    """Timeline rows of round `history[-1]` for the one-process simulator, one per client.

    Compute is measured (clients run one after another); communication is modelled from the
    exact bytes each client would send and receive over its link (the round's `params_up` and
    `params_down`, which each algorithm counts): ParaBlock exchanges round t-1's block during round
    t (exposed wait = what the compute does not cover); the others exchange round t's after
    computing it (all of it exposed).
    """
    m = history[-1]
    wire = transport.WIRE_DTYPES[fed.wire_dtype].itemsize
    if fed.effective_staleness == 0:
        exchanged = m  # FedBCD sends this round's block after computing it
    else:
        exchanged = history[-2] if len(history) >= 2 else None  # ParaBlock sends last round's
    rows = []
    for c in range(fed.num_clients):
        compute = m["client_compute_s"].get(c, 0.0)
        up = down = 0
        if exchanged is not None:
            n = partition.blocks[exchanged["block"]].params  # metrics written before params_up existed
            ups = exchanged.get("params_up", [n] * len(exchanged["clients"]))
            up = dict(zip(exchanged["clients"], ups, strict=True)).get(c, 0) * wire
            down = exchanged.get("params_down", n) * wire
        comm_s = (links[c].seconds(up) if up else 0.0) + (links[c].seconds(down) if down else 0.0)
        exposed = comm_s if fed.effective_staleness == 0 else max(0.0, comm_s - compute)
        rows.append(
            {"round": m["round"], "client": c, "block": m["block"], "compute_s": compute, "comm_s": comm_s,
             "exposed_wait_s": exposed, "bytes_up": up, "bytes_down": down, "modeled": True}
        )  # fmt: skip
    return rows


class TimelineWriter:
    """Appends timeline rows as JSON lines (safe across threads; one line per write across processes)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def __call__(self, row: dict) -> None:
        line = json.dumps(row) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
