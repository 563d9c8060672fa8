"""FedBuff in the deployment: real asynchronous aggregation between a server process and client
processes that meet in a Store (`scripts/server.py` and `scripts/client.py` come here, through
`experiment.serve` / `experiment.client`, when the run's algorithm is asynchronous).

The math is the simulation's (`fed/algorithms/fedbuff.py`, whose docstring is the spec), through
the same functions: each client loops pull the newest model version v -> train K local steps on
one block (`fedbuff.choose_block` of its n-th training; every parameter without `fedbuff_blocks`)
-> upload its delta. The server takes arrivals as they come and, every Z = `fedbuff.buffer_size`
accepted ones, applies params += eta * sum_k w(tau_k) / Z * delta_k into each delta's own block
(`fedbuff.server_apply`), tau_k = version - v_k, w = `fedbuff.staleness_weight`; a delta more than
`max_staleness` (> 0) versions old is dropped on arrival. One apply is one round (version + 1); the
run ends after `fed.rounds` of them, and what is still in flight then is discarded. Only the clock
differs: arrivals come in real time, so two runs differ, but the arrivals log (`on_arrival`'s rows:
client, n, base version, block, tau, weight, what became of it and the apply it went into) says
exactly what was applied: replaying it gives the final model bit for bit (tests/test_fedbuff_deploy.py).

Store layout (beside `server/config`, which `experiment.serve` writes):

    version/<v>/<leaf>/, COMMIT   every trainable leaf of the server model after v applies (v = 0:
                                  the initial model), float32; COMMIT {kind: version, version}
    version/latest                JSON {kind: latest, version}
    arrival/<i>/<n>/<leaf>/       client i's n-th delta (its block's leaves), then its COMMIT
                                  {kind: delta, client, n, base: the version it trained on, block, loss}
    taken/<i>                     JSON {kind: taken, client, n, outcome}: the server has taken client
                                  i's arrival n (and applied the buffer, if it filled it)
    server/done, server/error     as in comm.py

An arrival's way: client i commits arrival/<i>/<n>. The server polls arrival/<c>/<next[c]> of every
client (each client's arrivals in order, none skipped; the scan starts after the client served
last, so that a fast client cannot crowd out the others), reads it through `receive.read_checked`
(signature with keys, manifest, shapes, digests, finite values), checks its block (the server knows
`choose_block(seed, i, n)`: a client cannot pick) and its base version, drops it if too stale,
screens its norm against the buffer (`validate.screen`) and buffers it with weight w(tau) / Z, or
rejects it with the reason. With Z buffered it applies them, hands the state to `on_apply` (which
must make it durable: a checkpoint), publishes the new version and `latest`, then deletes the
arrivals that apply consumed and the version before last (`comm.keep_rounds` keeps every one: what
a replay reads). Last it writes `taken/<i>`: the client, which has waited for it since its upload,
pulls `latest` and trains again. So, as in the simulation, a client pulls once the server has its
delta (with the apply that delta completed), at most one delta per client is in flight, and a
client never runs ahead of a slow or stopped server.

Resume: the server's checkpoint holds version v and `next` (its `extra_meta`). Rerun, the server
publishes version v if the store lacks it and reads every arrival from `next` on: none was deleted
before the apply that consumed it was durable, so none is lost; those it had read after its last
checkpoint are judged again (the caller rewrites the log from version v on). A client keeps {n,
position} in a JSON file: rerun, it goes on from there past every arrival the store or the server
already holds, pulls the newest version and trains again.

`client_slowdown` paces real time here: client i's training takes at least `step_seconds` x
`local_steps` x `client_slowdown[i]` seconds (it waits out the rest before it uploads), so that
slow and fast clients can be tried on one machine; unset, nobody waits.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
import tensorstore as ts

from jaxblock.fed import blocks as blocks_lib
from jaxblock.fed import lean, schedule, transforms, validate
from jaxblock.fed.algorithms import fedbuff
from jaxblock.fed.blocks import Partition, path_str
from jaxblock.fed.config import FedConfig
from jaxblock.fed.wire import Link
from jaxblock.net import receive, signing
from jaxblock.net.protocol import CommConfig
from jaxblock.net.transport import Store, TransportTimeout

LATEST = "version/latest"
WIRE = "float32"  # FedBuff runs with wire_dtype='float32' (FedBuffOptions.check)


def version_prefix(v: int) -> str:
    return f"version/{v}"


def arrival_prefix(client: int, n: int) -> str:
    return f"arrival/{client}/{n}"


def taken_key(client: int) -> str:
    return f"taken/{client}"


def trainable(partition: Partition, params: dict) -> dict:
    """Every block's leaves (the frozen ones never change: a client has them from the start)."""
    return functools.reduce(blocks_lib.merge, (partition.block(params, b) for b in range(partition.num_blocks)))


def with_leaves(params: dict, tree: dict) -> dict:
    """`params` with the leaves of `tree` (float32 off the wire) in their place, in each one's dtype
    and sharding."""
    new = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def put(path, old):
        x = new.get(path_str(path))
        return old if x is None else jax.device_put(np.asarray(x).astype(old.dtype), getattr(old, "sharding", None))

    return jax.tree_util.tree_map_with_path(put, params)


def wire_leaves(tree_shapes: dict) -> transforms.Leaves:
    return transforms.wire_leaves((), tree_shapes, WIRE)


# ----------------------------------------------------------------------------- server


def serve(
    fed: FedConfig,
    params: dict,
    partition: Partition,
    store: Store,
    comm: CommConfig,
    *,
    policy: validate.Policy | None = None,
    state: dict | None = None,
    on_arrival: Callable[[dict], None] | None = None,
    on_apply: Callable[[dict, dict], None] | None = None,
) -> dict:
    """Takes arrivals and applies every Z accepted ones until `fed.rounds` applies; returns the params.

    `state`: a checkpointed state to resume (see the module docstring). `on_arrival(row)` gets each
    arrival's log row; `on_apply(state, row)` the state after each apply, which must be durable when
    it returns (the arrivals it consumed are deleted next), and the apply's metrics row. No arrival
    for 2 x `comm.timeout_s` stops the run. Any failure is published in `server/error` before it is
    raised, so that clients stop at once with its reason.
    """
    policy = policy or validate.Policy()
    keys = comm.load_keys()
    seal = keys.seal if keys else (lambda doc: doc)
    state = lean.init_state(fed, params) if state is None else dict(state)
    next_n = list(state.get("extra_meta", {}).get("next", [0] * fed.num_clients))
    like = jax.eval_shape(lambda: state["params"])
    expected = {b: wire_leaves(partition.block(like, b)) for b in range(partition.num_blocks)}
    try:
        _forget_consumed(store, comm, next_n)  # a restart after a checkpoint, before its deletes
        if store.get_json(f"{version_prefix(state['round'])}/COMMIT") is None:
            _publish_version(store, partition, state["params"], state["round"], keys)
        store.put_json(LATEST, seal({"kind": "latest", "version": state["round"]}))
        rows, buffer, last, since = [], [], -1, time.perf_counter()
        while state["round"] < fed.rounds:
            c, n, manifest = _next_arrival(store, next_n, last, 2 * comm.timeout_s)
            row, delta = _judge(fed, store, state["round"], c, n, manifest, expected, buffer, policy, keys)
            next_n[c], last = n + 1, c
            rows.append(row)
            if delta is not None:
                buffer.append(delta)
            if on_arrival is not None:
                on_arrival(row)
            if len(buffer) == fedbuff.buffer_size(fed):
                state = _apply(fed, partition, state, rows, buffer, next_n)
                if on_apply is not None:
                    on_apply(state, _metrics(rows, time.perf_counter() - since))
                _publish(store, comm, partition, state["params"], state["round"], rows, keys)
                rows, buffer, since = [], [], time.perf_counter()
            store.put_json(taken_key(c), seal({"kind": "taken", "client": c, "n": n, "outcome": row["outcome"]}))
    except BaseException as e:  # every failure is published: no client waits for a dead server
        store.put_json("server/error", seal({"kind": "error", "message": str(e) or type(e).__name__}))
        raise
    store.put_json("server/done", seal({"kind": "done", "rounds": fed.rounds}))
    if not comm.keep_rounds:  # clients delete what they upload after this themselves
        for prefix in ("version/", "arrival/", "taken/"):
            _delete_under(store, prefix)
    return state["params"]


def _next_arrival(store: Store, next_n: list[int], last: int, patience_s: float) -> tuple[int, int, dict]:
    """(client, n, COMMIT) of the next committed arrival: client c's number next_n[c], the first
    found scanning from the client after `last`. TransportTimeout after `patience_s` without one."""
    clients = len(next_n)
    order = [(last + 1 + k) % clients for k in range(clients)]
    start, poll = time.perf_counter(), 0.001
    while True:
        for c in order:
            try:
                manifest = store.get_json(f"{arrival_prefix(c, next_n[c])}/COMMIT")
            except json.JSONDecodeError:
                manifest = {}  # not JSON: rejected as garbage by read_checked
            if manifest is not None:
                return c, next_n[c], manifest
        if time.perf_counter() - start > patience_s:
            raise TransportTimeout(f"no client uploaded a delta for {patience_s:g}s (2 x comm.timeout_s)")
        time.sleep(poll)
        poll = min(poll * 1.5, 0.02)


def _judge(fed, store, version, c, n, manifest, expected, buffer, policy, keys) -> tuple[dict, dict | None]:
    """Client c's n-th arrival at `version`: its log row, and its delta if accepted (else None).
    An accepted one goes into apply `version` (the buffer's next apply) at index `slot`, with its
    `weight`. `on_bad_update='stop'` raises for a rejected one."""
    block = fedbuff.choose_block(fed, c, n, len(expected))
    row = {"round": version, "client": c, "n": n, "block": block, "base": None, "tau": None, "loss": None,
           "outcome": "rejected", "reason": None, "apply": None, "slot": None, "weight": None}  # fmt: skip
    try:
        delta = _read_delta(store, c, n, block, manifest, expected[block], policy, keys)
        base = manifest.get("base")
        if not (isinstance(base, int) and 0 <= base <= version):
            raise validate.BadUpdate("garbage", f"base version {base!r} was never published (0..{version})")
        loss = manifest.get("loss")
        row.update(base=base, tau=version - base, loss=float(loss) if isinstance(loss, (int, float)) else None)
        if fed.options.max_staleness > 0 and row["tau"] > fed.options.max_staleness:
            return {**row, "outcome": "dropped", "reason": f"stale: {row['tau']} > max_staleness"}, None
        bad = validate.screen({**dict(enumerate(buffer)), -1: delta}, policy).get(-1)
        if bad is not None:
            raise validate.BadUpdate(*bad.split(": ", 1))
    except validate.BadUpdate as e:
        validate.stop_if_asked(policy, version, {c: str(e)})
        return {**row, "reason": str(e)}, None
    weight = fedbuff.staleness_weight(fed, row["tau"]) / fedbuff.buffer_size(fed)
    return {**row, "outcome": "accepted", "apply": version, "slot": len(buffer), "weight": weight}, delta


def _read_delta(store, c, n, block, manifest, leaves, policy, keys) -> dict:
    """Client c's n-th delta through every check (`receive.read_checked`) and its COMMIT's fields."""
    signed = {"kind": "delta", "client": c, "n": n, "block": block}
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in signed.items()):  # keys check it too
        raise validate.BadUpdate("garbage", f"its COMMIT is not {signed} ({json.dumps(manifest)[:120]})")
    limit = validate.upload_bytes(leaves)
    limit = min(limit, int(policy.max_upload_mb * 1e6)) if policy.max_upload_mb else limit
    verify = keys and (lambda m: keys.check(m, signing.client_name(c), signed))
    return receive.read_checked(store, arrival_prefix(c, n), manifest, leaves, limit, verify)


def _apply(fed, partition, state: dict, rows: list[dict], buffer: list[dict], next_n: list[int]) -> dict:
    """The state after the apply of the buffered deltas (the accepted rows, in slot order)."""
    accepted = [r for r in rows if r["outcome"] == "accepted"]
    blocks, weights = [r["block"] for r in accepted], [r["weight"] for r in accepted]
    params = fedbuff.server_apply(state["params"], partition, buffer, blocks, weights, fed.eta)
    return {**state, "params": params, "round": state["round"] + 1, "extra_meta": {"next": list(next_n)}}


def _metrics(rows: list[dict], seconds: float) -> dict:
    """metrics.jsonl's row of one apply, from the rows of the arrivals it took (the simulation's keys)."""
    accepted = [r for r in rows if r["outcome"] == "accepted"]
    losses = [r["loss"] for r in accepted if r["loss"] is not None]
    return {
        "round": rows[0]["round"],
        "block": accepted[0]["block"],
        "blocks": [r["block"] for r in accepted],
        "clients": [r["client"] for r in accepted],
        "arrivals": [[r["client"], r["n"]] for r in accepted],
        "staleness": [r["tau"] for r in accepted],
        "weights": [r["weight"] for r in accepted],
        "dropped": [[r["client"], r["n"]] for r in rows if r["outcome"] == "dropped"],
        "rejected": [[r["client"], r["n"], r["reason"]] for r in rows if r["outcome"] == "rejected"],
        "loss": float(np.mean(losses)) if losses else None,
        "seconds": seconds,
    }


def _publish(store: Store, comm: CommConfig, partition: Partition, params: dict, v: int, rows: list[dict], keys):
    """Version v and `latest` after an apply; then, unless `keep_rounds`, the arrivals it consumed
    (`rows`) and version v - 2 are deleted (a client may still read v - 1)."""
    _publish_version(store, partition, params, v, keys)
    latest = {"kind": "latest", "version": v}
    store.put_json(LATEST, keys.seal(latest) if keys else latest)
    if not comm.keep_rounds:
        for r in rows:
            _delete_under(store, arrival_prefix(r["client"], r["n"]) + "/")
        _delete_under(store, version_prefix(v - 2) + "/")


def _publish_version(store: Store, partition: Partition, params: dict, v: int, keys) -> int:
    signed = {"kind": "version", "version": v}
    seal = keys and (lambda m: keys.seal({**m, **signed}))
    return store.publish(version_prefix(v), jax.device_get(trainable(partition, params)), WIRE, extra=signed, seal=seal)


def _forget_consumed(store: Store, comm: CommConfig, next_n: list[int]) -> None:
    """Deletes the arrivals numbered below `next_n` (a server killed between a checkpoint and its
    deletes left them behind)."""
    if comm.keep_rounds:
        return
    for c, first in enumerate(next_n):
        for n in {int(k.split("/")[0]) for k in store.keys(f"arrival/{c}/") if k.split("/")[0].isdigit()}:
            if n < first:
                _delete_under(store, arrival_prefix(c, n) + "/")


def _delete_under(store: Store, prefix: str) -> None:
    """Deletes every key under `prefix` (ending with '/'): up to prefix with '/' -> '0', which sorts next."""
    store.kv.delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")).result()


def log_arrival(path: str, row: dict) -> None:
    """An arrival's line in `path` (the server's arrivals.jsonl), and one on stderr if it was rejected."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if row["outcome"] == "rejected":
        print(f"version {row['round']}: client {row['client']}'s delta {row['n']} rejected: {row['reason']}",
              file=sys.stderr, flush=True)  # fmt: skip


# ----------------------------------------------------------------------------- client


def run_client(
    client: int,
    fed: FedConfig,
    params: dict,
    partition: Partition,
    local_train: Callable,
    batches_fn,
    store: Store,
    comm: CommConfig,
    link: Link,
    *,
    on_round: Callable[[dict], None] | None = None,
    state_path: str | None = None,
) -> dict:
    """Pulls, trains and uploads until the server is done; returns the last model version it pulled.

    `on_round(row)` gets a timeline row per training (round = the version it trained on, n, block,
    outcome, compute_s, comm_s = exposed_wait_s, bytes_up, bytes_down, loss). `state_path`: a JSON
    file of {n, position}, written after each upload and read at the start (a rerun goes on there).
    """
    keys = comm.load_keys()
    store.party_keys = keys
    store.wait_json(LATEST, comm.server_wait_s, "the server's first model version")
    saved = _read_state(state_path)
    n, position, version = _first_free(store, client, saved["n"], keys), saved["position"], 0
    while (latest := _poll_server(store, fed, keys)) is not None:
        start, down = time.perf_counter(), 0
        if latest["version"] != version:
            pulled = _pull(store, partition, params, latest["version"], keys)
            if pulled is None:  # replaced while it was read: pull the newer one
                continue
            (params, down), version = pulled, latest["version"]
        pulled_at = time.perf_counter()
        block = fedbuff.choose_block(fed, client, n, partition.num_blocks)
        trained, frozen = partition.split(params, block)
        batches, position = batches_fn(client, position, fed.local_steps)
        delta, losses = local_train(trained, frozen, batches, schedule.lr_factor(fed, version))
        loss = float(np.mean(np.asarray(losses)))  # waits for the compute
        _pace(fed, client, pulled_at)
        computed = time.perf_counter()
        up = _upload(store, link, client, n, version, block, delta, loss, keys)
        _write_state(state_path, {"n": n + 1, "position": int(position)})
        outcome = _wait_taken(store, fed, client, n, comm.server_wait_s, keys)
        comm_s = pulled_at - start + time.perf_counter() - computed
        if on_round is not None:
            on_round({"round": version, "client": client, "n": n, "block": block, "outcome": outcome,
                      "compute_s": computed - pulled_at, "comm_s": comm_s, "exposed_wait_s": comm_s,
                      "bytes_up": up, "bytes_down": down, "loss": loss})  # fmt: skip
        n += 1
    if not comm.keep_rounds:  # what it uploaded after the server's last read
        _delete_under(store, f"arrival/{client}/")
    return params


def _poll_server(store: Store, fed, keys) -> dict | None:
    """The server's `latest`, or None once it is done; RuntimeError if it failed."""
    done = store.get_json("server/done")
    if done is not None and _signed(done, "done", keys):
        return None
    error = store.get_json("server/error")
    if error is not None and store._servers(error):  # the check Store.wait_json makes: the server's error
        raise RuntimeError(f"the server stopped: {error['message']}")
    latest = store.get_json(LATEST)
    if latest is None and store.get_json("server/done") is not None:  # done (and cleaned up) meanwhile
        return None
    ok = isinstance(latest, dict) and isinstance(latest.get("version"), int) and 0 <= latest["version"] <= fed.rounds
    if not ok or not _signed(latest, "latest", keys):
        raise RuntimeError(f"the version/latest in the store is not the server's ({json.dumps(latest)[:120]})")
    return latest


def _signed(doc, kind: str, keys) -> bool:
    """Whether the server wrote `doc` (always, without keys): anyone with store access can write one."""
    if keys is None:
        return True
    try:
        keys.check(doc, "server", {"kind": kind})
        return True
    except signing.BadSignature:
        return False


def _taken(store: Store, client: int, keys) -> tuple[int, str | None]:
    """(the last arrival of this client the server has taken, -1 if none; what became of it)."""
    taken = store.get_json(taken_key(client))
    if not (isinstance(taken, dict) and isinstance(taken.get("n"), int) and _signed(taken, "taken", keys)):
        return -1, None
    return taken["n"], taken.get("outcome")


def _wait_taken(store: Store, fed, client: int, n: int, patience_s: float, keys) -> str | None:
    """Waits until the server has taken this client's arrival n: its outcome (None if the server
    finished first). TransportTimeout after `patience_s`: the server is gone."""
    start, poll, check = time.perf_counter(), 0.001, time.perf_counter() + 0.5
    while True:
        last, outcome = _taken(store, client, keys)
        if last >= n:
            return outcome if last == n else None
        if time.perf_counter() > check:  # now and then: three reads
            if _poll_server(store, fed, keys) is None:
                return None
            check = time.perf_counter() + 0.5
        if time.perf_counter() - start > patience_s:
            raise TransportTimeout(f"the server has not taken delta {n} of client {client} after {patience_s:g}s")
        time.sleep(poll)
        poll = min(poll * 1.5, 0.02)


def _pull(store: Store, partition: Partition, params: dict, v: int, keys) -> tuple[dict, int] | None:
    """(params with version v's trainable leaves, bytes), None if v was replaced (or the run ended)
    while it was read; RuntimeError if it is not the server's."""
    prefix = version_prefix(v)
    leaves = wire_leaves(jax.eval_shape(lambda: trainable(partition, params)))
    verify = keys and (lambda m: keys.check(m, "server", {"kind": "version", "version": v}))
    try:
        manifest = store.get_json(f"{prefix}/COMMIT")
        if manifest is None:
            raise validate.BadUpdate("missing", f"version {v} has no COMMIT")
        tree = receive.read_checked(store, prefix, manifest, leaves, validate.upload_bytes(leaves), verify)
    except validate.BadUpdate as e:
        now = store.get_json(LATEST)
        if now is None or now.get("version") != v:
            return None
        raise RuntimeError(f"version {v} in the store is not the server's ({e})") from None
    return with_leaves(params, tree), int(manifest["bytes"])


def _pace(fed, client: int, started: float) -> None:
    """Waits until this training has taken step_seconds x K x client_slowdown[client] (set only)."""
    if fed.options.client_slowdown:
        seconds = fed.options.step_seconds * fed.local_steps * fedbuff.slowdown(fed, client)
        time.sleep(max(0.0, started + seconds - time.perf_counter()))


def _upload(store: Store, link: Link, client: int, n: int, base: int, block: int, delta, loss: float, keys) -> int:
    """Commits this client's n-th delta over its link (signed, with keys); returns its bytes."""
    t0 = time.perf_counter()
    signed = {"kind": "delta", "client": client, "n": n, "base": base, "block": block, "loss": loss}
    return store.publish(
        arrival_prefix(client, n), jax.device_get(delta), WIRE, before_commit=lambda nbytes: link.hold(nbytes, t0),
        extra=signed, seal=keys and keys.seal,
    )  # fmt: skip


def _first_free(store: Store, client: int, n: int, keys) -> int:
    """The number of this client's next arrival: past what the server has taken and what the store
    holds (a restart after an upload it had not recorded). Checked again after the scan: the server
    may have taken, and deleted, more meanwhile."""
    while True:
        n = max(n, _taken(store, client, keys)[0] + 1)
        while store.get_json(f"{arrival_prefix(client, n)}/COMMIT") is not None:
            n += 1
        if _taken(store, client, keys)[0] < n:
            return n


def _read_state(path: str | None) -> dict:
    if path is None or not os.path.exists(path):
        return {"n": 0, "position": 0}
    with open(path) as f:
        return json.load(f)


def _write_state(path: str | None, state: dict) -> None:
    """Written whole or not at all (a kill mid-write leaves the previous one)."""
    if path is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)
