"""The server's loop: plans rounds, collects and checks uploads, merges them with the one server side
(`fed.exchange.server_side`), publishes what it sends down; see `net/comm.py` for the protocol."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable

import jax

from jaxblock.fed import algorithms, lean, schedule, secagg, transforms, validate
from jaxblock.fed import exchange as exchange_lib
from jaxblock.fed.blocks import Partition
from jaxblock.fed.config import FedConfig
from jaxblock.net import receive, secure, signing, transport
from jaxblock.net.protocol import (
    CommConfig,
    check_supported,
    down_shapes,
    final_merge,
    merged_at,
    read_aggregate,
    upload_shapes,
)
from jaxblock.net.transport import Store


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
    algorithm: algorithms.Algorithm | None = None,
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
    algo = algorithm or algorithms.make(fed)
    check_supported(algo)
    keys = comm.load_keys()
    seal = keys.seal if keys else (lambda doc: doc)
    first = 0 if state is None else state["round"] + fed.effective_staleness  # the first merge to run
    # Plans are a function of the settings: a resumed server knows those it published.
    plans = {t: {"block": algo.choose_block(fed, t, partition.num_blocks), "clients": algo.participants(fed, t)}
             for t in range(fed.rounds)}  # fmt: skip
    run = _Run(algo, partition, store, comm, policy or validate.Policy(), keys, client_sizes, plans,
               lean.init_state(fed, params) if state is None else dict(state), resumed=state is not None)  # fmt: skip
    try:
        if not run.resumed:
            _wait_for_clients(store, fed, comm, run.policy, keys)
        # A client that never joined is not waited for, and the plans say who joined: clients count
        # acks against that list (a run whose client never came still leaves a clean store).
        run.joined = run.joined or transport.ready_clients(store, keys)
        if run.protocol is not None:  # rounds in flight at a restart: their key agreements, read back
            for r in range(max(0, first - fed.effective_staleness), min(first, fed.rounds)):
                run.protocol.agree(r, secure.parties_of({**plans[r], "joined": sorted(run.joined)}))
        for t in range(first, final_merge(fed) + 1):  # the rounds, then the final flush
            announced = {}
            if t < fed.rounds:  # with what the transforms announce (adaptive clipping's C_t: `clip_norm`)
                announced, run.transforms_state = transforms.announce(fed.transforms, run.transforms_state, t)
                plan = {**plans[t], "joined": sorted(run.joined), "kind": "plan", "round": t, **announced}
                store.put_json(transport.plan_key(t), seal(plan))
                if run.protocol is not None:  # its key agreement, before the merges the clients overlap it with
                    run.protocol.agree(t, secure.parties_of(plan))
            row = {"round": t, "merged": [], "left_out": [], **announced}
            for r, due in merged_at(fed, t, plans):
                merged, left_out = _merge(run, r, t, due)
                row["merged"].append([r, merged])
                row["left_out"] += [[r, c, why] for c, why in left_out.items()]
            if on_merge is not None:
                on_merge(row)
            done = t - fed.effective_staleness + 1  # rounds whose every delta is merged
            if done >= 1:
                run.state["round"] = done
                lost = {str(r): v for r, v in run.lost.items() if v and r >= done - 1}
                run.state["extra_meta"] = {"lost": lost, "joined": sorted(run.joined)}
                run.state = transforms.with_server_state(run.state, run.transforms_state)
                if on_aggregate is not None:
                    on_aggregate(run.state)
    except BaseException as e:  # every failure is published: no client waits for a dead server
        message = str(e) or type(e).__name__
        store.put_json("server/error", seal({"kind": "error", "message": message}))
        raise
    store.put_json("server/done", seal({"kind": "done", "rounds": fed.rounds}))
    return run.state["params"]


@dataclasses.dataclass
class _Run:
    """What the server's merges share: the run, the store, and the state they advance."""

    algo: algorithms.Algorithm
    partition: Partition
    store: Store
    comm: CommConfig
    policy: validate.Policy
    keys: signing.Keys | None
    client_sizes: object
    plans: dict
    state: dict
    resumed: bool = False
    joined: set | None = None  # the clients ready when round 0 started (a resumed server: all of them)
    # round -> its clients left out so far (weights renormalise without them); kept in checkpoints
    lost: dict = dataclasses.field(default_factory=dict)
    protocol: secure.ServerSide | None = None  # secure aggregation's protocol through the store
    transforms: tuple = ()  # the run's transforms as the server runs them (secure aggregation's unmasker)
    transforms_state: dict = dataclasses.field(default_factory=dict)  # their server state (JSON; checkpointed)

    def __post_init__(self):
        self.transforms = self.algo.fed.transforms
        sa = secagg.of(self.transforms)
        if sa is not None:
            self.protocol = secure.ServerSide(self.store, self.keys, sa, self.comm)
            unmasker = dataclasses.replace(sa, unmasker=self.protocol.unmask)
            self.transforms = tuple(unmasker if t is sa else t for t in self.transforms)
        meta = self.state.get("extra_meta", {})
        self.lost = {int(r): v for r, v in meta.get("lost", {}).items()}
        self.joined = set(meta["joined"]) if "joined" in meta else None  # a resumed server: as it was
        self.transforms_state = transforms.server_state(self.state)


def _merge(run: _Run, r: int, t: int, due: list[int]) -> tuple[list[int], dict[int, str]]:
    """Round r's uploads due at the end of round t, merged into the server model: (merged, left out
    {client: reason}). After a restart, a merge this server had published is read back and applied
    as the clients applied it, not recomputed (its deltas may be gone)."""
    fed, plan = run.algo.fed, run.plans[r]
    signed = {"kind": "aggregate", "round": r, "at": t, "block": plan["block"]}
    published = run.resumed and _published(
        run.store, run.keys, r, t, signed, run.partition, run.state["params"], run.algo, plan
    )
    merged, left_out, down, report = published or _reduce_uploads(run, r, t, due, signed)
    if report:  # adaptive clipping's noised count, as published: a restarted server moves C as it did
        run.transforms_state = transforms.observe(fed.transforms, run.transforms_state, r, report)
    run.lost[r] = [*run.lost.get(r, []), *left_out]
    if merged:
        run.state["params"] = run.algo.apply(run.state["params"], run.partition, plan["block"], down, fed.eta)
    return merged, left_out


def _reduce_uploads(run: _Run, r: int, t: int, due: list[int], signed: dict):
    """Collects round r's uploads, runs the one server side (`fed.exchange.server_side`: transforms,
    validation, the algorithm's reduce) and publishes what it sends down, with who was merged and
    who left out, and what the transforms report (adaptive clipping's noised count): (merged, left_out,
    down, report)."""
    fed, plan = run.algo.fed, run.plans[r]
    params = run.state["params"]
    never = [c for c in due if run.joined is not None and c not in run.joined]
    outside = [] if run.protocol is None else run.protocol.outside(r, [c for c in due if c not in never])
    accepted, left_out = _collect(
        run.algo, run.partition, params, r, plan["block"], [c for c in due if c not in never + outside], run.store,
        run.comm, run.policy, run.keys, planned=len(due),
    )  # fmt: skip
    left_out.update({c: "missing: never joined the run (no ready marker)" for c in never})
    left_out.update({c: "missing: sat out the round's secure-aggregation key agreement" for c in outside})
    before = [*run.lost.get(r, []), *left_out]

    def weights_of(kept, bad):
        return schedule.merge_weights(fed, plan["clients"], kept, run.client_sizes, [*before, *bad])

    like = upload_shapes(run.algo, run.partition, params, r, plan["block"], due[0])
    announced = transforms.announced(run.transforms_state, r)  # round r's plan's (the round's C)
    server = exchange_lib.server_side(run.algo, r, like, weights_of, run.policy, run.transforms, announced)
    result = server({c: accepted[c] for c in due if c in accepted})  # in plan order: the sum's order
    left_out = dict(sorted({**left_out, **result.rejected}.items()))
    down = None if result.down is None else jax.device_get(result.down)
    record = {"merged": result.merged, "left_out": {str(c): why for c, why in left_out.items()}}
    if result.report:
        record["report"] = result.report
    keys = run.keys
    run.store.publish(
        transport.aggregate_prefix(r, t), {} if down is None else down, fed.wire_dtype, extra=record,
        seal=keys and (lambda m: keys.seal({**m, **signed})),
    )  # fmt: skip
    return result.merged, left_out, down, result.report


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


def _published(store: Store, keys, r: int, t: int, signed: dict, partition, params, algo, plan):
    """(merged, left_out, aggregate, report) of the merge of round r at the end of round t if this
    server published it before a restart (and it is its own), else None."""
    prefix = transport.aggregate_prefix(r, t)
    manifest = store.get_json(f"{prefix}/COMMIT")
    if manifest is None:
        return None
    verify = keys and (lambda m: keys.check(m, "server", signed))
    agg = None
    try:
        if manifest.get("merged"):
            shapes = down_shapes(algo, partition, params, r, plan["block"], manifest["merged"])
            agg = read_aggregate(store, prefix, manifest, shapes, algo.fed.wire_dtype, verify)
        elif verify:
            verify(manifest)
    except (validate.BadUpdate, signing.BadSignature):
        return None  # not this server's: it merges the round anew (and overwrites it)
    left_out = {int(c): why for c, why in manifest.get("left_out", {}).items()}
    return list(manifest["merged"]), left_out, agg, manifest.get("report", {})


def _collect(algo, partition, params, r, block, clients, store: Store, comm: CommConfig, policy, keys, planned=None):
    """Round r's uploads from `clients`, each checked as it arrives: ({client: update}, {client: reason}).

    Silence is measured against the peers: a client that has sent nothing `comm.timeout_s` after the
    round's first update arrived is left out (clients train the same block at once, so a slow
    compile, e.g. a block's first, delays everyone alike). If fewer than `policy.min_clients` have
    arrived `2 x timeout_s` after the server began waiting, the run stops."""

    def expected(c: int):  # the leaves client c's upload holds on the wire, and its byte limit
        like = upload_shapes(algo, partition, params, r, block, c)
        leaves = transforms.wire_leaves(algo.fed.transforms, like, algo.fed.wire_dtype)
        limit = validate.upload_bytes(leaves)
        return leaves, min(limit, int(policy.max_upload_mb * 1e6)) if policy.max_upload_mb else limit

    accepted, left_out, waiting = {}, {}, list(clients)
    need = min(policy.min_clients, planned or len(clients))  # of the round's clients, joined or not
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
                accepted[c] = receive.read_checked(store, prefix, manifest, *expected(c), verify)
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
            f"{planned or len(clients)} updates are fewer than comm.min_clients={policy.min_clients}"
        )
    left_out.update({c: f"missing: no update within {comm.timeout_s:g}s" for c in waiting})
    for c in left_out:
        accepted.pop(c, None)
    validate.stop_if_asked(policy, r, {c: why for c, why in left_out.items() if not why.startswith("missing")})
    return accepted, dict(sorted(left_out.items()))
