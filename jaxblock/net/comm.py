"""The communication runtime: a server loop and a client loop that exchange deltas through a Store.

Each runs in its own OS process (`scripts/server.py`, `scripts/client.py`) or, for benchmarks,
in threads of one process. A client keeps the lean state of `loop.py`: a replica of the
server model, advanced by applying every aggregate with the very function the server uses
(`loop.apply_aggregate`), plus its own pending deltas. Its model is the replica plus eta x its
pending deltas, so server and clients agree bitwise and the runtime reproduces the one-process
simulator exactly.

ParaBlock round t on a client with staleness s_i (the same for all, or one per client): the main
thread dispatches LocalBlockTraining for b_t (JAX's async dispatch returns at once) while an
upload thread copies Delta_{t-1}^i off the device and publishes it, and a download thread waits
for and fetches the aggregates the server merges at the end of round t (every client's delta of
round r with r + s_c = t). When both the compute and those downloads are done, the client applies
the aggregates to its replica and drops its own deltas among them (Algorithm 2's correction).
Uploads queue in their own thread, so a slow client's upload may take up to s_i rounds without
holding up its compute, and the fast clients never wait for it: the merges they need do not
include it. FedBCD (and FedCyBGD) run the same exchange after the compute, serially. Only block
leaves cross the wire (top-k: int32 indices and values).

Cleanup (unless `keep_rounds`): each client, once it has applied the merges of the end of round u,
writes `round/<u>/ack/<client>`; a client that then sees acks from all `num_clients` clients
deletes `round/<u - S>/` (S = the largest staleness), and after the last merge F = T - 1 + S every
round left. Nobody reads or writes round r = u - S after that:
  - every delta of round r was merged by the end of round r + s_c <= u, so the server read it
    before publishing round u's merges, which precede every ack of u;
  - every aggregate under round r was merged at some u' <= u, and a client acks u only once it
    has applied every merge up to u; its plan was read at the start of round r;
  - each client's acks are written in order, by one thread, so the client whose ack of r
    completed r's set had listed r's acks before anyone could ack u.
The client whose ack lands last sees all of them, so someone always deletes; two clients may
both delete, which is harmless. Deletion needs every client's ack, so a client that never acks
(it died, or runs with keep_rounds) keeps every round from then on: cleanup fails safe. Nobody
waits for it: the server never reads an ack, and a client acks and deletes in a thread of its
own, beside its next computation and its next upload (a file:// delete takes ~0.15 s); it returns
once its uploads and acks are done.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxblock.fed import algorithms, lean, loop, schedule, validate, wire
from jaxblock.fed.algorithms import topk
from jaxblock.fed.blocks import Partition
from jaxblock.fed.config import FedConfig
from jaxblock.fed.wire import Link
from jaxblock.net import receive, signing, transport
from jaxblock.net.transport import Store


@dataclasses.dataclass(frozen=True)
class CommConfig:
    store: str = "memory://"
    timeout_s: float = 600.0  # a client silent this long after a round's first update is left out (see _collect)
    keep_rounds: bool = False  # keep every round's keys (default: clients delete round t once all hold its aggregate)
    keys: str = ""  # this party's key directory (scripts/keys.py); "" = nothing is signed or checked
    server_timeout_s: float = 1800.0  # how long a client waits for a silent server (a restart included)

    def load_keys(self) -> signing.Keys | None:
        return signing.Keys(self.keys) if self.keys else None

    @property
    def server_wait_s(self) -> float:
        """How long a client waits for the server: `server_timeout_s` (time for a killed server to be
        restarted and resume), and at least three times `timeout_s`, as the server itself may first
        wait up to that for its clients (`_collect`) before it publishes the round. A server that
        fails says so in `server/error`, which stops clients at once."""
        return max(self.server_timeout_s, 3 * self.timeout_s)


def check_supported(fed: FedConfig) -> None:
    if not algorithms.REGISTRY[fed.algorithm].runtime:
        raise ValueError(f"algorithm={fed.algorithm!r}: the multi-process runtime does not run it; use the simulator")
    if fed.schedule == "gradient":
        raise ValueError("schedule='gradient' needs the server to see data: use the simulator")


def final_merge(fed: FedConfig) -> int:
    """F: the last round at whose end deltas are merged (the final flush runs the merges T .. F)."""
    return fed.rounds - 1 + fed.effective_staleness


def _merged(fed: FedConfig, t: int, plans: dict) -> list[tuple[int, list[int]]]:
    """[(round r, clients)] merged (not dropped) at the end of round t, from the plans."""
    pieces = schedule.merges_at(fed, t, lambda r: plans[r]["clients"])
    pieces = [(r, schedule.split_late(fed, arrived)[0]) for r, arrived in pieces]
    return [(r, merged) for r, merged in pieces if merged]


# ----------------------------------------------------------------------------- server


def serve(
    fed: FedConfig,
    params: dict,
    partition: Partition,
    store: Store,
    comm: CommConfig,
    *,
    client_sizes=None,
    policy: validate.Policy | None = None,
    on_aggregate: Callable[[dict], None] | None = None,
    on_merge: Callable[[dict], None] | None = None,
    state: dict | None = None,
) -> dict:
    """Publishes each round's plan, merges uploads, publishes aggregates; returns theta_T.

    Resuming (`state`: a checkpointed server state, round R fully merged): it goes on with the merge
    at the end of round R + max s. A merge it had published before it stopped (checkpoints lag the
    store) is read back and applied as the clients applied it, not recomputed: its deltas may be
    gone, and the model stays bit-identical to a run that never stopped.

    At the end of round t it merges the deltas due then (client c's of round r when r + s_c = t):
    it waits for them (`_collect` says how long), checks each (`validate`), and publishes the weighted
    sum of the accepted ones (weights renormalised over the round's clients not left out) to
    `round/<r>/aggregate/<t>`, whose COMMIT lists `merged` and `left_out` {client: reason}: a client
    left out learns it there. Fewer than `policy.min_clients` arrivals stop the run. Any failure is
    published in `server/error` before it is raised, so that clients stop at once with its reason.
    `on_aggregate(state)` runs whenever a round is fully merged (e.g. to checkpoint); `on_merge(row)`
    gets {round: t, merged: [[r, clients]], left_out: [[r, client, reason]]} at the end of each round.
    """
    check_supported(fed)
    policy = policy or validate.Policy()
    keys = comm.load_keys()
    seal = keys.seal if keys else (lambda doc: doc)
    algo = algorithms.REGISTRY[fed.algorithm]  # plans need the settings alone
    resumed = state is not None
    first = 0 if state is None else state["round"] + fed.effective_staleness  # the first merge to run
    state = lean.init_state(fed, params) if state is None else dict(state)
    # Plans are a function of the settings: a resumed server knows those it published.
    plans = {t: {"block": algo.choose_block(fed, t, partition.num_blocks), "clients": algo.participants(fed, t)}
             for t in range(fed.rounds)}  # fmt: skip
    # round -> its clients left out so far (weights renormalise without them); kept in checkpoints
    lost: dict[int, list[int]] = {int(r): v for r, v in state.get("extra_meta", {}).get("lost", {}).items()}

    def merge(t: int) -> None:
        row = {"round": t, "merged": [], "left_out": []}
        for r, due in _merged(fed, t, plans):
            plan = plans[r]
            signed = {"kind": "aggregate", "round": r, "at": t, "block": plan["block"]}
            published = resumed and _published(store, keys, r, t, signed, partition, state["params"], fed, plan)
            if published:  # before the restart
                merged, left_out, agg = published
                lost[r] = [*lost.get(r, []), *left_out]
                if merged:
                    state["params"] = loop.apply_aggregate(state["params"], partition, plan["block"], agg, fed.eta)
                row["merged"].append([r, merged])
                row["left_out"] += [[r, c, why] for c, why in left_out.items()]
                continue
            accepted, left_out = _collect(
                fed, partition, state["params"], plan["block"], r, due, store, comm, policy, keys
            )
            lost[r] = [*lost.get(r, []), *left_out]
            merged = [c for c in due if c in accepted]
            record = {"merged": merged, "left_out": {str(c): why for c, why in left_out.items()}}
            if merged:
                deltas = loop.dense_uploads(
                    fed, partition, state["params"], plan["block"], [accepted[c] for c in merged]
                )
                weights = schedule.merge_weights(fed, plan["clients"], merged, client_sizes, lost[r])
                agg = jax.device_get(loop.aggregate_deltas(deltas, weights, fed.wire_dtype))
                state["params"] = loop.apply_aggregate(state["params"], partition, plan["block"], agg, fed.eta)
            store.publish(
                transport.aggregate_prefix(r, t), agg if merged else {}, fed.wire_dtype, extra=record,
                seal=keys and (lambda m, signed=signed: keys.seal({**m, **signed})),
            )  # fmt: skip
            row["merged"].append([r, merged])
            row["left_out"] += [[r, c, why] for c, why in left_out.items()]
        if on_merge is not None:
            on_merge(row)
        done = t - fed.effective_staleness + 1  # rounds whose every delta is merged
        if done >= 1:
            state["round"] = done
            state["extra_meta"] = {"lost": {str(r): v for r, v in lost.items() if v and r >= done - 1}}
            if on_aggregate is not None:
                on_aggregate(state)

    try:
        if not resumed:
            _wait_for_clients(store, fed, comm, policy, keys)
        for t in range(first, final_merge(fed) + 1):  # the rounds, then the final flush
            if t < fed.rounds:
                store.put_json(transport.plan_key(t), seal({**plans[t], "kind": "plan", "round": t}))
            merge(t)
    except BaseException as e:  # every failure is published: no client waits for a dead server
        message = str(e) or type(e).__name__
        store.put_json("server/error", seal({"kind": "error", "message": message}))
        raise
    store.put_json("server/done", seal({"kind": "done", "rounds": fed.rounds}))
    return state["params"]


def _wait_for_clients(store: Store, fed, comm: CommConfig, policy, keys) -> None:
    """Round 0 starts once every client is ready, or once `policy.min_clients` are and nobody else
    has joined for `comm.timeout_s` (a client may take long to load a big model). Fewer than the
    quorum after 20 x `timeout_s` stop the run, naming the clients not ready."""
    need, start, poll = min(policy.min_clients, fed.num_clients), time.perf_counter(), 0.01
    ready, changed = set(), start
    while True:
        now_ready = transport.ready_clients(store, keys)
        now = time.perf_counter()
        if now_ready != ready:
            ready, changed = now_ready, now
        if len(ready) == fed.num_clients or (len(ready) >= need and now - changed > comm.timeout_s):
            return
        if len(ready) < need and now - start > 20 * comm.timeout_s:
            missing = ", ".join(str(c) for c in range(fed.num_clients) if c not in ready)
            raise transport.TransportTimeout(
                f"only {len(ready)} of {fed.num_clients} clients ready after {20 * comm.timeout_s:g}s "
                f"(comm.min_clients={policy.min_clients}); not ready: client {missing}"
            )
        time.sleep(poll)
        poll = min(poll * 1.5, 0.5)


def _published(store: Store, keys, r: int, t: int, signed: dict, partition, params, fed, plan):
    """(merged, left_out, aggregate) of the merge of round r at the end of round t if this server
    published it before a restart (and it is its own), else None."""
    prefix = transport.aggregate_prefix(r, t)
    manifest = store.get_json(f"{prefix}/COMMIT")
    if manifest is None:
        return None
    verify = keys and (lambda m: keys.check(m, "server", signed))
    agg = None
    try:
        if manifest.get("merged"):
            agg = _read_aggregate(store, prefix, manifest, partition, params, plan["block"], fed.wire_dtype, verify)
        elif verify:
            verify(manifest)
    except (validate.BadUpdate, signing.BadSignature):
        return None  # not this server's: it merges the round anew (and overwrites it)
    return list(manifest["merged"]), {int(c): why for c, why in manifest.get("left_out", {}).items()}, agg


def _read_aggregate(store: Store, prefix: str, manifest, partition, params, block: int, wire: str, verify) -> dict:
    """An aggregate of `block` read through every check an upload passes (dense, the wire dtype)."""
    expected = validate.expected_leaves(jax.eval_shape(lambda: partition.block(params, block)), "none", 1.0, wire)
    return receive.read_checked(store, prefix, manifest, expected, validate.upload_bytes(expected), verify)


def _collect(fed, partition, params, block, r, clients, store: Store, comm: CommConfig, policy, keys):
    """Round r's uploads from `clients`, each checked as it arrives: ({client: update}, {client: reason}).

    Silence is measured against the peers: a client that has sent nothing `comm.timeout_s` after the
    round's first update arrived is left out (clients train the same block at once, so a slow
    compile, e.g. a block's first, delays everyone alike). If fewer than `policy.min_clients` have
    arrived `2 x timeout_s` after the server began waiting, the run stops."""
    shapes = jax.eval_shape(lambda: partition.block(params, block))
    expected = validate.expected_leaves(shapes, fed.compression, fed.topk_ratio, fed.wire_dtype)
    limit = validate.upload_bytes(expected)
    if policy.max_upload_mb:
        limit = min(limit, int(policy.max_upload_mb * 1e6))
    accepted, left_out, waiting = {}, {}, list(clients)
    need = min(policy.min_clients, len(clients))
    start, first, poll = time.perf_counter(), None, 0.001
    while waiting:
        for c in list(waiting):
            prefix = transport.delta_prefix(r, c)
            try:
                manifest = store.get_json(f"{prefix}/COMMIT")
                if manifest is None:
                    continue
                waiting.remove(c)
                signed = {"kind": "delta", "round": r, "block": block, "client": c}
                verify = keys and (lambda m, c=c, s=signed: keys.check(m, signing.client_name(c), s))
                accepted[c] = receive.read_checked(store, prefix, manifest, expected, limit, verify)
            except validate.BadUpdate as e:
                left_out[c] = str(e)
            except json.JSONDecodeError:
                waiting.remove(c)
                left_out[c] = "garbage: the COMMIT marker is not JSON"
            first = first or time.perf_counter()
        now, arrived = time.perf_counter(), len(clients) - len(waiting)
        if not waiting or (arrived >= need and now > first + comm.timeout_s):
            break
        if arrived < need and now > start + 2 * comm.timeout_s:
            break
        time.sleep(poll)
        poll = min(poll * 1.5, 0.02)
    arrived = len(clients) - len(waiting)
    if arrived < need:
        silent = ", ".join(str(c) for c in waiting)
        raise transport.TransportTimeout(
            f"round {r}: client {silent} sent no update: nothing after {2 * comm.timeout_s:g}s, and {arrived} of "
            f"{len(clients)} updates are fewer than comm.min_clients={policy.min_clients}"
        )
    left_out.update({c: f"missing: no update within {comm.timeout_s:g}s" for c in waiting})
    left_out.update(validate.screen_norms({c: validate.norm(u) for c, u in accepted.items()}, policy))
    for c in left_out:
        accepted.pop(c, None)
    validate.stop_if_asked(policy, r, {c: why for c, why in left_out.items() if not why.startswith("missing")})
    return accepted, dict(sorted(left_out.items()))


# ----------------------------------------------------------------------------- client


def _upload(
    store: Store, link: Link, client: int, r: int, block: int, tree: dict, wire: str, keys
) -> tuple[int, float]:
    """Publishes this client's delta of round r (device -> host here, in the upload thread) over its
    link, committed (signed, with keys) when the link would have delivered it; returns (bytes, seconds)."""
    start = time.perf_counter()
    host = jax.device_get(tree)
    t0 = time.perf_counter()  # the server sees it once the link would have delivered it
    signed = {"kind": "delta", "round": r, "block": block, "client": client}
    nbytes = store.publish(
        transport.delta_prefix(r, client), host, wire, before_commit=lambda n: link.hold(n, t0),
        seal=keys and (lambda m: keys.seal({**m, **signed})),
    )  # fmt: skip
    return nbytes, time.perf_counter() - start


def _download(
    store: Store,
    comm: CommConfig,
    link: Link,
    fed: FedConfig,
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
    for r, _ in _merged(fed, t, plans):
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
                agg = _read_aggregate(
                    store, prefix, manifest, partition, params, plans[r]["block"], fed.wire_dtype, verify
                )
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
    )
    if not ok:
        raise RuntimeError(f"round {t}: the plan in the store is not the server's ({json.dumps(plan)[:120]})")
    return plan


def _release(store: Store, client: int, t: int, fed: FedConfig) -> None:
    """Acks the merges of round t; the client that sees every ack deletes round t - max s (and, after
    the last merge, every round left): see the module docstring."""
    store.put_json(transport.ack_key(t, client), {})
    if store.acked(t) >= set(range(fed.num_clients)):
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
    """
    check_supported(fed)
    keys = comm.load_keys()
    store.party_keys = keys
    overlap = fed.effective_staleness >= 1  # ParaBlock; FedBCD and FedCyBGD exchange after computing
    replica = {"params": params, "pending": {}}  # the lean client state (lean.client_params)
    residuals: dict = {}  # top-k error feedback, per block
    position, first = 0, 0
    plans: dict[int, dict] = {}
    sent: dict[int, dict] = {}  # round -> what this client uploads for it (its delta, or top-k of it)
    if resume is not None:
        first, position = int(resume["round"]), int(resume["positions"][0])
        replica = {"params": resume["params"], "pending": dict(resume["pending"])}
        residuals = resume.get("extra", {}).get("residuals", {})
        for r in range(max(0, first - fed.effective_staleness), first):
            plans[r] = _checked_plan(store.get_json(transport.plan_key(r)), r, fed, partition, keys)
        for r, entry in replica["pending"].items():  # uploads it had not committed when it stopped
            if store.get_json(f"{transport.delta_prefix(r, client)}/COMMIT") is None:
                sent[r] = entry.get("uploads", entry["deltas"])[client]
    uploader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"upload-{client}")
    downloader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"download-{client}")
    cleaner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"cleanup-{client}")
    uploads: list[concurrent.futures.Future] = []
    releases: list[concurrent.futures.Future] = []
    reported = [0]  # uploads whose seconds are already in a timeline row

    def submit_upload(r: int) -> int:
        if r not in sent:
            return 0
        tree = sent.pop(r)
        block = plans[r]["block"]
        uploads.append(uploader.submit(_upload, store, link, client, r, block, tree, fed.wire_dtype, keys))
        return wire.payload_bytes(tree, fed.wire_dtype)

    def upload_seconds(wait: bool = False) -> float:  # of the uploads finished since the last row
        done = uploads[reported[0] :] if wait else [u for u in uploads[reported[0] :] if u.done()]
        seconds = sum(u.result()[1] for u in done)
        reported[0] += len(done)
        return seconds

    def absorb(t: int, pieces: list[tuple[int, dict]]) -> None:
        """The merges of round t: replica += each aggregate; own deltas merged (or dropped) leave pending."""
        for r, agg in pieces:
            if agg is not None:
                replica["params"] = loop.apply_aggregate(replica["params"], partition, plans[r]["block"], agg, fed.eta)
        for r, arrived in schedule.merges_at(fed, t, lambda r: plans[r]["clients"]):
            if client in arrived:  # merged or left out (the aggregate's record says which): pending no more
                replica["pending"].pop(r, None)
        if on_absorb is not None:
            on_absorb(t, replica)
        if on_state is not None and t < fed.rounds:
            extra = {"residuals": residuals} if residuals else {}
            on_state({"params": replica["params"], "round": t + 1, "seed": fed.seed, "positions": [position],
                      "pending": replica["pending"], "extra": extra})  # fmt: skip
        if not comm.keep_rounds:  # its own thread: neither the compute nor the next upload waits for a delete
            releases.append(cleaner.submit(_release, store, client, t, fed))

    def row(t, block, compute_s, comm_s, exposed_s, up, down, losses):
        if on_round is not None:
            on_round(
                {"round": t, "client": client, "block": block, "compute_s": compute_s, "comm_s": comm_s,
                 "exposed_wait_s": exposed_s, "bytes_up": up, "bytes_down": down,
                 "loss": None if losses is None else float(np.mean(np.asarray(losses)))}
            )  # fmt: skip

    ready = {"kind": "ready", "client": client}
    store.put_json(transport.ready_key(client), keys.seal(ready) if keys else ready)
    try:
        if resume is not None:  # what it had not sent of rounds before the last, now (the loop sends the last)
            for r in sorted(sent):
                if not (overlap and r == first - 1):
                    submit_upload(r)
        catching_up = resume is not None
        for t in range(first, fed.rounds):
            plan = store.wait_json(transport.plan_key(t), comm.server_wait_s, f"round {t}: no plan from the server")
            plans[t] = _checked_plan(plan, t, fed, partition, keys)
            b = plan["block"]
            start = time.perf_counter()
            up, merges = 0, None
            if overlap:  # last round's upload and this round's merges, beside this round's compute (started
                # first: a compute call can block, e.g. while a block's step compiles)
                up = submit_upload(t - 1)
                merges = downloader.submit(_download, store, comm, link, fed, t, plans, partition, params, keys)
            delta = losses = None
            if catching_up:  # a round the server merged without it while it was down: nothing to train for
                at = transport.aggregate_prefix(t, t + fed.stalenesses[client])
                catching_up = store.get_json(f"{at}/COMMIT") is not None
            if client in plan["clients"] and not catching_up:
                model = lean.client_params(replica, partition, client, fed.eta)
                block, frozen = partition.split(model, b)
                batches, position = batches_fn(client, position, fed.local_steps)
                lr_scale = schedule.lr_factor(fed, t)
                delta, losses = local_train(block, frozen, batches, lr_scale)  # dispatched; runs asynchronously
            if delta is not None:
                jax.block_until_ready(delta)
            compute_end = time.perf_counter()
            if delta is not None:
                replica["pending"][t] = {"block": b, "clients": [client], "deltas": {client: delta}}
                sent[t] = delta
                if fed.compression == "topk":
                    sent[t], residuals = topk.send(residuals, client, b, delta, fed.topk_ratio)
                    replica["pending"][t]["uploads"] = {client: sent[t]}  # a restart resends it
            if not overlap:  # FedBCD: communicate after computing, nothing overlaps
                up = submit_upload(t)
                merges = downloader.submit(_download, store, comm, link, fed, t, plans, partition, params, keys)
            pieces, down, down_s = merges.result()
            absorb(t, pieces)
            end = time.perf_counter()
            row(t, b, compute_end - start, down_s + upload_seconds(), end - compute_end, up, down, losses)
        if overlap and fed.rounds:  # the final flush: Algorithm 2 lines 12-13, for every staleness
            start = time.perf_counter()
            up, down, down_s = submit_upload(fed.rounds - 1), 0, 0.0
            for t in range(fed.rounds, final_merge(fed) + 1):
                pieces, nbytes, seconds = _download(store, comm, link, fed, t, plans, partition, params, keys)
                absorb(t, pieces)
                down, down_s = down + nbytes, down_s + seconds
            comm_s = down_s + upload_seconds(wait=True)
            row("flush", plans[fed.rounds - 1]["block"], 0.0, comm_s, time.perf_counter() - start, up, down, None)
        for future in [*uploads, *releases]:  # raises a failed upload, ack or delete
            future.result()
        store.delete(transport.ready_key(client))  # a finished run leaves no trace of it
    finally:
        for executor in (uploader, downloader, cleaner):
            executor.shutdown(wait=False, cancel_futures=True)
    return replica["params"]


def run_in_threads(
    fed: FedConfig,
    params: dict,
    partition: Partition,
    local_train: Callable,
    batches_fn: loop.BatchesFn,
    store: Store,
    comm: CommConfig,
    links: list[Link] | None = None,
    *,
    clients: list[int] | None = None,
    client_sizes=None,
    policy: validate.Policy | None = None,
    on_round: Callable[[dict], None] | None = None,
    on_merge: Callable[[dict], None] | None = None,
    on_aggregate: Callable[[dict], None] | None = None,
    on_absorb: Callable[[int, int, dict], None] | None = None,
) -> tuple[dict, dict[int, dict]]:
    """The server and each client in threads of this process (benchmarks, tests, one-box runs).

    Returns (the server's theta_T, {client: its final model replica}). The first client error,
    or the server's, is re-raised. With `comm.keys` set, it is a directory of scripts/keys.py's: each
    party signs with its own subdirectory (server/, client_<i>/).
    """
    clients = list(range(fed.num_clients)) if clients is None else clients
    links = links or [Link()] * fed.num_clients
    replicas: dict[int, dict] = {}
    errors: list[BaseException] = []

    def client_main(i: int) -> None:
        try:
            absorbed = None if on_absorb is None else functools.partial(on_absorb, i)
            mine = party(comm, signing.client_name(i))
            replicas[i] = run_client(
                i, fed, params, partition, local_train, batches_fn, transport.Store(store.url, store.context), mine,
                links[i], on_round=on_round, on_absorb=absorbed,
            )  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=client_main, args=(i,), name=f"client-{i}") for i in clients]
    for th in threads:
        th.start()
    try:
        server_params = serve(
            fed, params, partition, store, party(comm, "server"), client_sizes=client_sizes, policy=policy,
            on_merge=on_merge, on_aggregate=on_aggregate,
        )  # fmt: skip
    finally:
        for th in threads:
            th.join()
    if errors:
        raise errors[0]
    return server_params, replicas


def party(comm: CommConfig, name: str) -> CommConfig:
    """One party's settings in a one-process run: its own key directory under `comm.keys`."""
    return dataclasses.replace(comm, keys=os.path.join(comm.keys, name)) if comm.keys else comm


# ----------------------------------------------------------------------------- timelines


def modeled_timeline(fed: FedConfig, partition: Partition, links: list[Link], history: list[dict]) -> list[dict]:
    """Timeline rows of round `history[-1]` for the one-process simulator, one per client.

    Compute is measured (clients run one after another; with `sim.client_batch` > 1 each client of a
    batch is given its share of the batch's time, so the modelled compute is the machine time per
    client, and differs from one by one by the batching speed-up); communication is modelled from the
    exact bytes each client sends and receives over its link (the rounds' `bytes_up` and
    `bytes_down`, from what each algorithm puts on the wire). Client i's exchange of round r's delta
    (its upload and the download of round r's aggregate) overlaps the compute of its next s_i rounds
    and ends in round r + s_i: the row of round t shows the exchange of round t - s_i, exposed as
    far as those s_i rounds' compute does not cover it. With s_i = 0 (FedBCD, FedCyBGD, ...) the
    exchange follows the compute and is all exposed. An asynchronous algorithm (FedBuff) models
    its own rows.
    """
    m = history[-1]
    if "modeled_rows" in m:
        return m["modeled_rows"]
    itemsize = wire.WIRE_DTYPES[fed.wire_dtype].itemsize
    rows = []
    for c in range(fed.num_clients):
        s = fed.stalenesses[c]
        compute = _of(m["client_compute_s"], c, 0.0)
        up = down = 0
        if len(history) > s:
            ex = history[-1 - s]  # the round whose exchange ends now
            n = partition.blocks[ex["block"]].params  # metrics written before params_up existed
            ups = ex.get("bytes_up") or [itemsize * v for v in ex.get("params_up", [n] * len(ex["clients"]))]
            up = dict(zip(ex["clients"], ups, strict=True)).get(c, 0)
            if "bytes_down" in ex:
                down = ex["bytes_down"]
            else:  # values: an int for every client, or per client
                down = ex.get("params_down", n)
                down = {k: itemsize * v for k, v in down.items()} if isinstance(down, dict) else itemsize * down
            down = _of(down, c, 0) if isinstance(down, dict) else down
        comm_s = (links[c].seconds(up) if up else 0.0) + (links[c].seconds(down) if down else 0.0)
        covered = sum(_of(h["client_compute_s"], c, 0.0) for h in history[len(history) - s :]) if s else 0.0
        rows.append(
            {"round": m["round"], "client": c, "block": m["block"], "compute_s": compute, "comm_s": comm_s,
             "exposed_wait_s": max(0.0, comm_s - covered), "bytes_up": up, "bytes_down": down, "modeled": True}
        )  # fmt: skip
    return rows


def _of(per_client: dict, client: int, default):
    """A per-client value of a metrics dict, whose keys are ints when fresh and strings once read back."""
    return per_client.get(client, per_client.get(str(client), default))


def replay(fed: FedConfig, partition: Partition, links: list[Link], history: list[dict]) -> list[dict]:
    """Every round's modelled timeline rows of a run's metrics, as training wrote them round by round."""
    return [row for i in range(len(history)) for row in modeled_timeline(fed, partition, links, history[: i + 1])]


def slowest_per_round(rows: list[dict]) -> tuple[float, float]:
    """(compute, exposed) seconds summed over rounds of each round's slowest client (compute +
    exposed communication): a run's modelled wall time, split. Clients run in parallel; a FedCyBGD
    turn has one client working, so its rounds add up to the sum of the turns."""
    slowest: dict = {}
    for r in rows:
        if r["compute_s"] + r["exposed_wait_s"] >= sum(slowest.get(r["round"], (0.0, 0.0))):
            slowest[r["round"]] = (r["compute_s"], r["exposed_wait_s"])
    return sum(c for c, _ in slowest.values()), sum(e for _, e in slowest.values())


def modeled_wall_s(timeline_path: str, history: list[dict]) -> float:
    """The run's modelled wall time: an asynchronous run's clock at its last apply; else
    `slowest_per_round` of its timeline."""
    if history and "modeled_time_s" in history[-1]:
        return float(history[-1]["modeled_time_s"])
    if not os.path.exists(timeline_path):
        return 0.0
    with open(timeline_path) as f:
        return float(sum(slowest_per_round([json.loads(line) for line in f])))


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
