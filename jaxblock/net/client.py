"""A client's loop: trains its blocks, uploads in a thread of its own, downloads and applies the
server's merges (ParaBlock: overlapped with the next round's compute); see `net/comm.py`."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxblock.fed import algorithms, lean, loop, schedule, secagg, transforms, validate, wire
from jaxblock.fed.blocks import Partition
from jaxblock.fed.config import FedConfig
from jaxblock.fed.wire import Link
from jaxblock.net import secure, signing, transport
from jaxblock.net.protocol import (
    CommConfig,
    check_supported,
    down_shapes,
    final_merge,
    merged_at,
    read_aggregate,
)
from jaxblock.net.transport import Store


def _upload(
    store: Store, link: Link, client: int, r: int, block: int, tree: dict, wire: str, keys, masker=None
) -> tuple[int, float]:
    """Publishes this client's delta of round r (device -> host here, in the upload thread) over its
    link, committed (signed, with keys) when the link would have delivered it; returns (bytes, seconds).
    With secure aggregation it masks the upload first (or sends nothing if it sits the round out)
    and answers the server's request for shares once it is sent."""
    start = time.perf_counter()
    host = jax.device_get(tree)
    if masker is not None and (host := masker.masked(r, host)) is None:
        return 0, time.perf_counter() - start
    t0 = time.perf_counter()  # the server sees it once the link would have delivered it
    signed = {"kind": "delta", "round": r, "block": block, "client": client}
    nbytes = store.publish(
        transport.delta_prefix(r, client), host, wire, before_commit=lambda n: link.hold(n, t0),
        seal=keys and (lambda m: keys.seal({**m, **signed})),
    )  # fmt: skip
    if masker is not None:
        masker.answer_later(r)
    return nbytes, time.perf_counter() - start


def _download(
    store: Store,
    comm: CommConfig,
    link: Link,
    algo: algorithms.Algorithm,
    t: int,
    plans: dict,
    partition: Partition,
    params: dict,
    keys=None,
) -> tuple[list[tuple[int, dict]], int, float]:
    """Waits for and fetches the aggregates merged at the end of round t: ([(r, aggregate or None if
    nothing of round r was merged)], bytes, seconds). They are one download over the link (one
    latency), however many rounds they come from. An aggregate that is not the block's shape (or not
    finite) was not written by the server: RuntimeError naming the store."""
    start = time.perf_counter()
    pieces, total, fetching = [], 0, 0.0
    for r, _ in merged_at(algo.fed, t, plans):
        prefix = transport.aggregate_prefix(r, t)
        manifest = store.wait_json(f"{prefix}/COMMIT", comm.server_wait_s, f"round {r}: no aggregate from the server")
        t0 = time.perf_counter()
        agg = None
        signed = {"kind": "aggregate", "round": r, "at": t, "block": plans[r]["block"]}
        if keys is not None:
            try:
                keys.check(manifest, "server", signed)
            except signing.BadSignature as e:
                raise RuntimeError(f"round {r}: the aggregate in the store is not the server's ({e})") from None
        if manifest.get("merged"):
            try:
                verify = keys and (lambda m, s=signed: keys.check(m, "server", s))
                merged = manifest["merged"]
                if not (isinstance(merged, list) and set(merged) <= set(plans[r]["clients"])):
                    raise validate.BadUpdate("garbage", f"merged {str(merged)[:60]} is not among round {r}'s clients")
                shapes = down_shapes(algo, partition, params, r, plans[r]["block"], merged)
                agg = read_aggregate(store, prefix, manifest, shapes, algo.fed.wire_dtype, verify)
            except validate.BadUpdate as e:
                raise RuntimeError(f"round {r}: the aggregate in the store is not the server's ({e})") from None
            total += int(manifest["bytes"])
        fetching += time.perf_counter() - t0
        pieces.append((r, agg))
    if pieces:
        link.hold(total, time.perf_counter() - fetching)
    return pieces, total, time.perf_counter() - start


def _checked_plan(plan, t: int, fed: FedConfig, partition: Partition, keys) -> dict:
    """Round t's plan, if the server signed it (with keys) and could have written it; RuntimeError
    naming the store otherwise."""
    if keys is not None:
        try:
            keys.check(plan, "server", {"kind": "plan", "round": t})
        except signing.BadSignature as e:
            raise RuntimeError(f"round {t}: the plan in the store is not the server's ({e})") from None
    ok = (
        isinstance(plan, dict)
        and isinstance(plan.get("block"), int)
        and 0 <= plan["block"] < partition.num_blocks
        and isinstance(plan.get("clients"), list)
        and all(isinstance(c, int) and 0 <= c < fed.num_clients for c in plan["clients"])
        and all(isinstance(c, int) and 0 <= c < fed.num_clients for c in plan.get("joined", []))
        and _announces(fed, plan)
    )
    if not ok:
        raise RuntimeError(f"round {t}: the plan in the store is not the server's ({json.dumps(plan)[:120]})")
    return plan


def _announces(fed: FedConfig, plan: dict) -> bool:
    """The plan holds what the transforms need from it (adaptive clipping: a positive `clip_norm`)."""
    try:
        transforms.for_round(fed.transforms, plan)
    except ValueError:
        return False
    return True


def _release(store: Store, client: int, t: int, fed: FedConfig, joined: set[int]) -> None:
    """Acks the merges of round t; the client that sees the ack of every client that joined the run
    deletes round t - max s (and, after the last merge, every round left): see the module docstring."""
    store.put_json(transport.ack_key(t, client), {})
    if store.acked(t) >= joined:
        s, last = fed.effective_staleness, final_merge(fed)
        if t == last:  # the last merge: every round left
            done = range(max(0, t - s), last + 1)
        else:
            done = [t - s] if t >= s else []
        for r in done:
            store.delete_round(r)


def run_client(
    client: int,
    fed: FedConfig,
    params: dict,
    partition: Partition,
    local_train: Callable,
    batches_fn: loop.BatchesFn,
    store: Store,
    comm: CommConfig,
    link: Link,
    *,
    on_round: Callable[[dict], None] | None = None,
    on_absorb: Callable[[int, dict], None] | None = None,
    on_state: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    algorithm: algorithms.Algorithm | None = None,
    client_sizes=None,
) -> dict:
    """Runs client `client` through every round and the final flush; returns its model replica.

    `on_state(state)` gets its state at the end of each round, before it acks the round (so the store
    never drops what a restart needs): the server-state layout of `checkpoint.save`, with `round` the
    next round, its replica as `params`, its pending deltas (and top-k uploads), its data position and
    top-k residuals. `resume`: such a state; the client rejoins the run there, uploads what it had
    not committed, and skips the rounds the server has already merged without it.

    `on_absorb(t, state)` sees its lean state {params: server model, pending: own deltas} once the
    merges of the end of round t are applied (tests check the lean-form invariant there).

    `on_round(timeline_row)` receives, per round: round, client, block, compute_s, comm_s,
    exposed_wait_s (time the compute thread sat idle waiting for communication), bytes_up,
    bytes_down, loss. Returns once its uploads and acks are written (and its cleanup done), so that
    a finished run leaves a clean store.

    `client_sizes`: every client's example count, for ParaBlock's `self_weight='w'` under
    `aggregation='samples'` (the weight its own pending delta has in its model).
    """
    algo = algorithm or algorithms.make(fed)
    check_supported(algo)
    keys = comm.load_keys()
    store.party_keys = keys
    hooks = {"on_round": on_round, "on_absorb": on_absorb, "on_state": on_state}
    me = _Client(client, algo, partition, params, local_train, batches_fn, store, comm, link, keys, hooks, client_sizes)
    first = 0 if resume is None else me.resume(resume)
    ready = {"kind": "ready", "client": client}
    store.put_json(transport.ready_key(client), keys.seal(ready) if keys else ready)
    try:
        if resume is not None:  # what it had not sent of rounds before the last, now (the loop sends the last)
            for r in sorted(me.sent):
                if not (me.overlap and r == first - 1):
                    me.submit_upload(r)
        me.catching_up = resume is not None
        for t in range(first, fed.rounds):
            me.run_round(t)
        if me.overlap and fed.rounds:  # the final flush: Algorithm 2 lines 12-13, for every staleness
            me.flush()
        for future in [*me.uploads, *me.releases]:  # raises a failed upload, ack or delete
            future.result()
        if me.secure is not None:  # the last rounds' answers: the server unmasks with them
            me.secure.close()
        store.delete(transport.ready_key(client))  # a finished run leaves no trace of it
    finally:
        for executor in (me.uploader, me.downloader, me.cleaner):
            executor.shutdown(wait=False, cancel_futures=True)
        if me.secure is not None:  # (after a failure: its key agreement and answers stop too)
            me.secure.close(wait=False)
    return me.replica["params"]


class _Client:
    """One client's state across rounds and the three threads that work for it: uploads (queued, so
    a slow link's upload can span s_i rounds without holding up compute), downloads (ParaBlock: beside
    the round's compute) and cleanup (acks and deletes, beside both). The main thread dispatches compute
    and applies merges; the replica and the queues are only touched there."""

    def __init__(
        self, client, algo, partition, params, local_train, batches_fn, store, comm, link, keys, hooks, client_sizes
    ):
        self.client, self.algo, self.fed, self.partition, self.params = client, algo, algo.fed, partition, params
        self.local_train, self.batches_fn, self.store, self.comm, self.link, self.keys = (
            local_train, batches_fn, store, comm, link, keys
        )  # fmt: skip
        self.hooks = hooks
        self.own_weight = lean.own_weights(algo, client, client_sizes)  # of its pending deltas in its model
        self.overlap = self.fed.effective_staleness >= 1  # ParaBlock; FedBCD, FedCyBGD exchange after computing
        self.replica = {"params": params, "pending": {}}  # the lean client state (lean.client_params)
        self.extra: dict = {}  # the update transforms' client state (top-k's residuals)
        self.position, self.catching_up = 0, False
        self.plans: dict[int, dict] = {}
        self.sent: dict[int, dict] = {}  # round -> what it uploads for it (after the transforms)
        pool = concurrent.futures.ThreadPoolExecutor
        self.uploader = pool(1, thread_name_prefix=f"upload-{client}")
        self.downloader = pool(1, thread_name_prefix=f"download-{client}")
        self.cleaner = pool(1, thread_name_prefix=f"cleanup-{client}")
        self.uploads: list[concurrent.futures.Future] = []
        self.releases: list[concurrent.futures.Future] = []
        self.reported = 0  # uploads whose seconds are already in a timeline row
        sa = secagg.of(self.fed.transforms)
        self.secure = None if sa is None else secure.ClientSide(store, keys, sa, comm, client)

    def resume(self, state: dict) -> int:
        """Rejoins from a saved state: its replica, data position, transform state, the plans of the
        rounds still in flight and the uploads it had not committed. Returns the next round."""
        fed, first = self.fed, int(state["round"])
        self.position = int(state["positions"][0])
        self.replica = {"params": state["params"], "pending": dict(state["pending"])}
        self.extra = dict(state.get("extra", {}))
        for r in range(max(0, first - fed.effective_staleness), first):
            plan = self.store.get_json(transport.plan_key(r))
            self.plans[r] = _checked_plan(plan, r, fed, self.partition, self.keys)
        for r, entry in self.replica["pending"].items():
            if self.secure is not None:  # its round secrets died with it: those rounds go on without it
                break
            if self.store.get_json(f"{transport.delta_prefix(r, self.client)}/COMMIT") is None:
                self.sent[r] = entry.get("uploads", entry["deltas"])[self.client]
        return first

    def submit_upload(self, r: int) -> int:
        if r not in self.sent:
            return 0
        tree, block = self.sent.pop(r), self.plans[r]["block"]
        args = (self.store, self.link, self.client, r, block, tree, self.fed.wire_dtype, self.keys, self.secure)
        self.uploads.append(self.uploader.submit(_upload, *args))
        return wire.payload_bytes(tree, self.fed.wire_dtype)

    def upload_seconds(self, wait: bool = False) -> float:
        """Seconds of the uploads finished since the last row (all of them, waiting, if `wait`)."""
        pending = self.uploads[self.reported :]
        done = pending if wait else [u for u in pending if u.done()]
        self.reported += len(done)
        return sum(u.result()[1] for u in done)

    def download(self, t: int) -> concurrent.futures.Future:
        args = (self.store, self.comm, self.link, self.algo, t, self.plans, self.partition, self.params, self.keys)
        return self.downloader.submit(_download, *args)

    def train(self, t: int, b: int):
        """Dispatches LocalBlockTraining of block b from its own model: (block, delta, losses), or
        Nones if it does not train in round t (not sampled, or the server merged it without it)."""
        fed, client = self.fed, self.client
        if self.catching_up:  # a round the server merged without it while it was down: nothing to train for
            at = transport.aggregate_prefix(t, t + fed.stalenesses[client])
            self.catching_up = self.store.get_json(f"{at}/COMMIT") is not None
        if client not in self.plans[t]["clients"] or self.catching_up:
            return None, None, None
        own = lean.client_params(self.replica, self.partition, client, fed.eta, self.own_weight)
        model = self.algo.client_model(own, client, t)
        block, frozen = self.partition.split(model, b)
        batches, self.position = self.batches_fn(client, self.position, fed.local_steps)
        delta, losses = self.local_train(block, frozen, batches, schedule.lr_factor(fed, t))  # dispatched
        return block, delta, losses

    def run_round(self, t: int) -> None:
        """Round t: last round's upload and this round's merges beside this round's compute (ParaBlock;
        started first: a compute call can block, e.g. while a block's step compiles), or after it."""
        plan = self.store.wait_json(
            transport.plan_key(t), self.comm.server_wait_s, f"round {t}: no plan from the server"
        )
        self.plans[t] = _checked_plan(plan, t, self.fed, self.partition, self.keys)
        if self.secure is not None:  # the round's key agreement, beside its compute
            self.secure.start(t, secure.parties_of(plan))
        b, start = plan["block"], time.perf_counter()
        up, merges = (self.submit_upload(t - 1), self.download(t)) if self.overlap else (0, None)
        block, delta, losses = self.train(t, b)
        if delta is not None:
            jax.block_until_ready(delta)
        compute_end = time.perf_counter()
        if delta is not None:
            upload = self.algo.upload(block, delta)  # its model keeps this; the wire gets the transforms'
            self.replica["pending"][t] = {"block": b, "clients": [self.client], "deltas": {self.client: upload}}
            chain = transforms.for_round(self.fed.transforms, plan)  # as the plan sets them (its clip_norm)
            self.sent[t], self.extra = transforms.encode(chain, self.extra, self.client, b, upload)
            if self.fed.transforms:
                self.replica["pending"][t]["uploads"] = {self.client: self.sent[t]}  # a restart resends it
        if not self.overlap:  # FedBCD: communicate after computing, nothing overlaps
            up, merges = self.submit_upload(t), self.download(t)
        pieces, down, down_s = merges.result()
        self.absorb(t, pieces)
        # The upload and the download start together and the download waits for the server's merge
        # of the upload: the round's communication takes the longer of the two, not their sum.
        comm_s, exposed = max(down_s, self.upload_seconds()), time.perf_counter() - compute_end
        self.row(t, b, compute_end - start, comm_s, exposed, up, down, losses)

    def flush(self) -> None:
        """After the last round: its last upload, and the merges of the rounds T .. F."""
        fed, start = self.fed, time.perf_counter()
        up, down, down_s = self.submit_upload(fed.rounds - 1), 0, 0.0
        for t in range(fed.rounds, final_merge(fed) + 1):
            pieces, nbytes, seconds = self.download(t).result()
            self.absorb(t, pieces)
            down, down_s = down + nbytes, down_s + seconds
        comm_s = max(down_s, self.upload_seconds(wait=True))  # concurrent, as in a round
        self.row("flush", self.plans[fed.rounds - 1]["block"], 0.0, comm_s, time.perf_counter() - start, up, down, None)

    def absorb(self, t: int, pieces: list[tuple[int, dict]]) -> None:
        """The merges of round t: replica += each aggregate; own deltas merged (or dropped) leave pending."""
        fed, replica = self.fed, self.replica
        for r, agg in pieces:
            if agg is not None:
                replica["params"] = self.algo.apply(
                    replica["params"], self.partition, self.plans[r]["block"], agg, fed.eta
                )
        for r, arrived in schedule.merges_at(fed, t, lambda r: self.plans[r]["clients"]):
            if self.client in arrived:  # merged or left out (the aggregate's record says which): pending no more
                replica["pending"].pop(r, None)
        if self.hooks["on_absorb"] is not None:
            self.hooks["on_absorb"](t, replica)
        if self.hooks["on_state"] is not None and t < fed.rounds:
            self.hooks["on_state"](
                {"params": replica["params"], "round": t + 1, "seed": fed.seed, "positions": [self.position],
                 "pending": replica["pending"], "extra": self.extra}
            )  # fmt: skip
        if not self.comm.keep_rounds:  # its own thread: neither the compute nor the next upload waits for a delete
            plan = self.plans[min(t, fed.rounds - 1)]  # who joined: a server's plan says (older ones: everyone)
            joined = set(plan.get("joined", range(fed.num_clients)))
            self.releases.append(self.cleaner.submit(_release, self.store, self.client, t, fed, joined))

    def row(self, t, block, compute_s, comm_s, exposed_s, up, down, losses) -> None:
        if self.hooks["on_round"] is not None:
            self.hooks["on_round"](
                {"round": t, "client": self.client, "block": block, "compute_s": compute_s, "comm_s": comm_s,
                 "exposed_wait_s": exposed_s, "bytes_up": up, "bytes_down": down,
                 "loss": None if losses is None else float(np.mean(np.asarray(losses)))}
            )  # fmt: skip
