"""The TensorStore transport and the server/client runtime, in threads and in separate processes."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
import time

import jax
import ml_dtypes
import numpy as np
import optax
import pytest
import tensorstore
from test_federated import BS, RULES, toy_clients, toy_loss, toy_params
from test_train import ROOT, SMALL, final_params

from jaxblock.fed import algorithms, blocks, data, local, loop, validate, wire
from jaxblock.net import client as net_client
from jaxblock.net import comm, transport
from jaxblock.net import exchange as net_exchange
from jaxblock.run import compare, experiment
from jaxblock.run.config import load_config


def test_publish_fetch_round_trip_and_exact_bytes():
    store = transport.Store("memory://")
    tree = {"layers_0": {"q": np.random.RandomState(0).randn(3, 4).astype(np.float32)}, "norm": np.ones(5, np.float32)}
    n = store.publish("round/0/client/1", tree)
    assert n == (12 + 5) * 4
    back, nbytes = store.wait_fetch("round/0/client/1", 1.0, "test")
    assert nbytes == n
    jax.tree.map(np.testing.assert_array_equal, back, tree)
    n16 = store.publish("round/0/client/2", tree, "bfloat16")
    assert n16 == (12 + 5) * 2
    back16, _ = store.wait_fetch("round/0/client/2", 1.0, "test")
    expected = tree["layers_0"]["q"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(back16["layers_0"]["q"], expected)
    assert np.abs(back16["layers_0"]["q"] - tree["layers_0"]["q"]).max() > 0  # really rounded


def test_a_reader_never_sees_an_uncommitted_update(tmp_path):
    store = transport.Store(f"file://{tmp_path}/store")
    tree = {"w": np.ones((2, 2), np.float32)}
    store.publish("round/0/client/0", tree)
    key = "round/0/client/0/COMMIT"  # arrays written, marker not yet: a publish in flight
    store.kv.delete_range(tensorstore.KvStore.KeyRange(key, key + "\x00")).result()
    with pytest.raises(transport.TransportTimeout, match="round 0: client 0: nothing after 0.05s"):
        store.wait_fetch("round/0/client/0", 0.05, "round 0: client 0")
    # The second process sees the update once committed, through a store of its own.
    store.publish("round/0/client/0", tree)
    other = transport.Store(f"file://{tmp_path}/store")
    np.testing.assert_array_equal(other.wait_fetch("round/0/client/0", 1.0, "x")[0]["w"], tree["w"])


def test_link_model():
    assert wire.Link(100.0, 20.0).seconds(50_000_000) == pytest.approx(0.52)
    assert wire.Link().seconds(10**9) == 0.0
    assert wire.link_for(1, ["50MBps", 150.0], 5).bandwidth_mbps == 150.0
    assert wire.link_for(0, "100MBps", None) == wire.Link(100.0, 0.0)
    with pytest.raises(ValueError, match="comm.bandwidth_mbps='10MBps': presets are"):
        wire.link_for(0, "10MBps", 0)
    with pytest.raises(ValueError, match="lists 1 values; client 1 has none"):
        wire.link_for(1, [50.0], 0)


def _max_diff(a, b) -> float:
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def run_threads(fed, params, clients, part, optimizer, timeout_s=20.0, skip=(), store=None, keep_rounds=False):
    """Server + one thread per client through `store` (default memory://); returns (server, replicas, timeline)."""
    rows = []
    server, replicas = comm.run_in_threads(
        fed, params, part, local.make_local_train(toy_loss, optimizer), data.make_batches_fn(clients, BS),
        store or transport.Store("memory://"), comm.CommConfig(timeout_s=timeout_s, keep_rounds=keep_rounds),
        clients=[i for i in range(fed.num_clients) if i not in skip], on_round=rows.append,
    )  # fmt: skip
    return server, replicas, rows


def files_under(directory) -> dict[str, int]:
    """{path relative to `directory`: size in bytes} of every file on disk below it."""
    return {
        os.path.relpath(os.path.join(root, f), directory): os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(directory)
        for f in files
    }


@pytest.mark.parametrize(
    "algorithm, participation, wire, lr_decay, extra", [("parablock", 1.0, "float32", "none", {}),
                                                         ("fedbcd", 1.0, "float32", "linear", {}),
                                                         ("parablock", 0.5, "float32", "cosine", {}),
                                                         ("parablock", 1.0, "bfloat16", "none", {}),
                                                         ("parablock", 1.0, "float32", "none", {"staleness": 2}),
                                                         ("parablock", 0.5, "float32", "none",
                                                          {"staleness": (1, 3, 1, 2), "staleness_weight": 0.5}),
                                                         ("parablock", 1.0, "float32", "none",
                                                          {"staleness": (1, 1, 3, 1), "max_staleness": 1}),
                                                         ("parablock", 1.0, "float32", "none", {"compression": "topk"}),
                                                         ("fedbcd", 1.0, "float32", "none", {"compression": "topk"}),
                                                         ("fedcybgd", 1.0, "float32", "none", {})]
)  # fmt: skip
def test_threaded_runtime_equals_the_simulator(algorithm, participation, wire, lr_decay, extra, report, tmp_path):
    params, clients = toy_params(), toy_clients(4)
    part = blocks.partition(params, RULES)
    fed = algorithms.configure(
        algorithm=algorithm,
        rounds=6,
        num_clients=4,
        local_steps=3,
        participation=participation,
        wire_dtype=wire,
        lr_decay=lr_decay,
        seed=4,
        **extra,
    )
    optimizer = optax.adamw(0.05, eps=1e-6)
    store = transport.Store(f"file://{tmp_path}/store")
    server, replicas, rows = run_threads(fed, params, clients, part, optimizer, store=store)
    # Every client acked every round and the last to ack deleted it: only the server's marker is left.
    assert store.kv.list().result() == [b"server/done"]
    assert list(files_under(tmp_path / "store")) == ["server/done"]
    sim, _ = loop.run(fed, params, toy_loss, data.make_batches_fn(clients, BS), part, optimizer)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(server), jax.device_get(sim["params"]))
    for replica in replicas.values():  # every client ends with exactly the server's model
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(replica), jax.device_get(server))
    trained = [r for r in rows if r["round"] != "flush" and r["loss"] is not None]
    assert len(trained) == fed.rounds * len(fed_participants(fed, 0))
    up = sum(r["bytes_up"] for r in rows)
    block_bytes = {b.id: b.params * (4 if wire == "float32" else 2) for b in part.blocks}
    if fed.transforms:  # per leaf k = ceil(0.2 size) int32 indices and float32 values
        block_bytes = {b.id: sum(8 * math.ceil(0.2 * x.size - 1e-9) for x in jax.tree.leaves(part.block(params, b.id)))
                       for b in part.blocks}  # fmt: skip
    expected_up = sum(block_bytes[r["block"]] for r in trained)  # exactly one block per trained round
    assert up == expected_up
    if wire == "bfloat16":
        fp32 = loop.run(
            dataclasses.replace(fed, wire_dtype="float32"), params, toy_loss,
            data.make_batches_fn(clients, BS), part, optimizer,
        )[0]["params"]  # fmt: skip
        diff = max(
            float(np.abs(np.asarray(a) - b).max())
            for a, b in zip(jax.tree.leaves(sim["params"]), jax.tree.leaves(fp32), strict=True)
        )
        report(f"wire bfloat16 vs float32 (toy model, 6 rounds): max |final param diff| = {diff:.2e}, half the bytes")
        assert 0 < diff < 0.05


def fed_participants(fed, t):
    return algorithms.REGISTRY[fed.algorithm].participants(fed, t)


def test_a_slow_client_with_its_own_staleness_holds_up_nobody(report):
    """Client 2's link takes 120 ms per transfer, a round's compute 150 ms. With staleness 1 for all,
    each round's merge waits for its upload and then its download (240 ms), so the fast clients sit
    idle; with s_2 = 3 its upload overlaps 3 rounds of compute, its download fits in one, and the
    fast clients never wait (measured in the threaded runtime)."""
    params, clients = toy_params(), toy_clients(3)
    part = blocks.partition(params, RULES)
    train = local.make_local_train(toy_loss, optax.sgd(0.05))

    def slow_train(*args):  # each round's compute takes ~0.15 s, so that link times can be compared to it
        time.sleep(0.15)
        return train(*args)

    links = [wire.Link(), wire.Link(), wire.Link(latency_ms=120.0)]
    waits = {}
    for staleness in [1, (1, 1, 3)]:
        fed = algorithms.configure(rounds=6, num_clients=3, local_steps=2, staleness=staleness)
        rows = []
        comm.run_in_threads(
            fed, params, part, slow_train, data.make_batches_fn(clients, BS), transport.Store("memory://"),
            comm.CommConfig(timeout_s=20.0), links, on_round=rows.append,
        )  # fmt: skip
        fast = [r for r in rows if r["client"] < 2 and r["round"] not in ("flush", 0, 1)]  # 0, 1: compiles
        waits[staleness] = sum(r["exposed_wait_s"] for r in fast) / len(fast)
    report(
        f"slow client (120 ms per transfer, ~150 ms compute per round): fast clients' mean exposed wait per round "
        f"{waits[1] * 1e3:.0f} ms with staleness 1 for all, {waits[(1, 1, 3)] * 1e3:.0f} ms with its own staleness 3"
    )
    # They wait for the slow upload (measured 70-90 ms), and with its own staleness they do not (~0 ms):
    # judged against each other, not a clock, so that a loaded machine slows both alike.
    assert waits[1] > 0.03 and waits[(1, 1, 3)] < waits[1] / 4


def test_keep_rounds_keeps_every_round_in_the_store(tmp_path, report):
    params, clients = toy_params(), toy_clients(2)
    part = blocks.partition(params, RULES)
    fed = algorithms.configure(rounds=3, num_clients=2, local_steps=1)
    store = transport.Store(f"file://{tmp_path}/store")
    run_threads(fed, params, clients, part, optax.sgd(0.1), store=store, keep_rounds=True)
    for t in range(fed.rounds):
        plan = store.get_json(transport.plan_key(t))
        assert plan["clients"] == [0, 1]
        block_shape = jax.tree.map(np.shape, part.split(params, plan["block"])[0])
        for prefix in [
            transport.delta_prefix(t, 0),
            transport.delta_prefix(t, 1),
            transport.aggregate_prefix(t, t + 1),
        ]:
            tree, _ = store.wait_fetch(prefix, 0.1, prefix)
            assert jax.tree.map(np.shape, tree) == block_shape, prefix
        assert store.acked(t + 1) == set()  # nobody acks when rounds are kept
    assert store.get_json("server/done") == {"kind": "done", "rounds": 3}
    report(
        f"store after a toy 3-round, 2-client run with keep_rounds: {sum(files_under(tmp_path / 'store').values())} bytes"
    )


def test_the_last_client_to_ack_deletes_the_round():
    fed = algorithms.configure(num_clients=2, rounds=3, staleness=1)  # merges at the end of rounds 1, 2, 3
    store = transport.Store("memory://")
    for t in range(2):
        store.put_json(transport.plan_key(t), {"block": t, "clients": [0, 1]})
        store.publish(transport.aggregate_prefix(t, t + 1), {"w": np.ones(3, np.float32)})
    net_client._release(store, 1, 1, fed, {0, 1})
    assert store.acked(1) == {1} and store.get_json(transport.plan_key(0)) is not None  # client 0 still needs it
    net_client._release(store, 0, 1, fed, {0, 1})
    assert {k.split("/")[0] for k in store.keys("round/")} == {"1"}  # round 0 gone, round 1 untouched
    store.delete_round(0)  # both clients saw every ack and both delete: harmless
    for t in (2, 3):  # round 2's acks delete round 1; the last merge's, every round left
        net_client._release(store, 0, t, fed, {0, 1})
        net_client._release(store, 1, t, fed, {0, 1})
    assert store.keys("round/") == []


def test_holds_a_run_after_cleanup():
    assert not transport.holds_a_run(transport.Store("memory://"))
    for key in ["round/0/plan", "server/done", "server/error", "round/7/client/0/COMMIT"]:
        store = transport.Store("memory://")
        store.put_json(key, {})
        assert transport.holds_a_run(store), key


@pytest.mark.parametrize("staleness", [1, 2])
def test_a_silent_client_is_left_out_and_every_client_keeps_the_lean_form(staleness):
    """Client 2 of 3 never runs: it never joined, so no round waits for it; the record names
    it, and after every round each live client holds exactly the server model and its own deltas
    not yet merged (the lean form). The clients that joined clean the store without its acks."""
    params, clients = toy_params(), toy_clients(3)
    part = blocks.partition(params, RULES)
    fed = algorithms.configure(rounds=4, num_clients=3, local_steps=2, staleness=staleness)
    store = transport.Store("memory://")
    server_at = {t: jax.device_get(params) for t in range(staleness)}  # nothing merges before round s's end
    seen, merges = [], []

    def absorbed(client, t, replica):
        seen.append((client, t, jax.device_get(replica["params"]), sorted(replica["pending"])))

    server, replicas = comm.run_in_threads(
        fed, params, part, local.make_local_train(toy_loss, optax.sgd(0.1)), data.make_batches_fn(clients, BS),
        store, comm.CommConfig(timeout_s=1.0), clients=[0, 1], on_merge=merges.append,
        on_aggregate=lambda state: server_at.__setitem__(state["round"] + staleness - 1, jax.device_get(state["params"])),
        on_absorb=absorbed,
    )  # fmt: skip
    final = comm.final_merge(fed)
    assert [m["round"] for m in merges] == list(range(final + 1))
    for m in merges[staleness:]:  # round t - s's deltas merge at the end of round t, client 2's left out
        r = m["round"] - staleness
        assert m["merged"] == [[r, [0, 1]]] and m["left_out"] == [
            [r, 2, "missing: never joined the run (no ready marker)"]
        ]
    assert len(seen) == 2 * (final + 1)
    for client, t, model, pending in seen:
        jax.tree.map(np.testing.assert_array_equal, model, server_at[t])
        assert pending == [r for r in range(max(0, t - staleness + 1), min(t, fed.rounds - 1) + 1)], (client, t)
    for replica in replicas.values():
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(replica), jax.device_get(server))
    assert store.keys("round/") == [] and store.keys("ready/") == []  # clean, though client 2 never acked


class Killed(Exception):
    """A client killed mid-run (raised by `killed_after`'s callback)."""


def killed_after(rounds: int, saved: dict):
    """A client's `on_state` that keeps each checkpointed state in `saved["state"]` and kills the client
    once it has checkpointed `rounds` rounds (before it acks or sends the last one's delta)."""

    def on_state(state):
        saved["state"] = {**state, "pending": dict(state["pending"])}
        if state["round"] == rounds:
            raise Killed

    return on_state


@pytest.mark.parametrize("staleness", [1, 2])
def test_a_client_restarted_in_time_loses_nothing_and_the_model_is_bit_identical(staleness):
    """Client 1 dies right after its round-2 checkpoint (before it acks or sends the round's delta)
    and restarts from it within the timeout: no update is lost, the final model is the simulator's."""
    params, clients = toy_params(), toy_clients(2)
    part = blocks.partition(params, RULES)
    fed = algorithms.configure(rounds=5, num_clients=2, local_steps=2, staleness=staleness, seed=2)
    train, batches = local.make_local_train(toy_loss, optax.sgd(0.1)), data.make_batches_fn(clients, BS)
    store, cc = transport.Store("memory://"), comm.CommConfig(timeout_s=20.0)
    saved, result = {}, {}
    dies_after_round_2 = killed_after(3, saved)

    def client_1():
        other = transport.Store(store.url, store.context)
        with pytest.raises(Killed):
            comm.run_client(1, fed, params, part, train, batches, other, cc, wire.Link(), on_state=dies_after_round_2)
        comm.run_client(1, fed, params, part, train, batches, other, cc, wire.Link(), resume=saved["state"])

    threads = [
        threading.Thread(target=lambda: comm.run_client(0, fed, params, part, train, batches,
                                                        transport.Store(store.url, store.context), cc, wire.Link())),
        threading.Thread(target=client_1),
    ]  # fmt: skip
    for th in threads:
        th.start()
    result["server"] = comm.serve(fed, params, part, store, cc)
    for th in threads:
        th.join()
    sim, _ = loop.run(fed, params, toy_loss, batches, part, optax.sgd(0.1))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result["server"]), jax.device_get(sim["params"]))


def test_fewer_clients_than_min_clients_stop_the_run_naming_the_silent_one():
    params, clients = toy_params(), toy_clients(2)
    part = blocks.partition(params, RULES)
    fed = algorithms.configure(rounds=3, num_clients=2, local_steps=2)
    store = transport.Store("memory://")
    with pytest.raises(transport.TransportTimeout) as e:
        comm.run_in_threads(
            fed, params, part, local.make_local_train(toy_loss, optax.sgd(0.1)), data.make_batches_fn(clients, BS),
            store, comm.CommConfig(timeout_s=0.2), clients=[0], policy=validate.Policy(min_clients=2),
        )  # fmt: skip
    message = "only 1 of 2 clients ready after 4s (comm.min_clients=2); not ready: client 1"
    assert str(e.value) == message
    assert store.get_json("server/error") == {"kind": "error", "message": message}  # the clients stopped on it


def _cmd(script, *extra):
    config = ["--config", os.path.join(ROOT, "configs/tiny.py"), *[f"--config.{o}" for o in SMALL]]
    return [sys.executable, os.path.join(ROOT, "scripts", script), *config, *extra]


def _start(script, *extra, quiet=False):
    """Starts a script as its own OS process with one CPU device, as a user would run it."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(_cmd(script, *extra), env=env, cwd=ROOT, stdout=out, stderr=out, text=True)


def test_server_and_two_client_processes_equal_the_simulator(tmp_path, report):
    common = ["--config.num_clients=2", "--config.rounds=3", "--config.comm.timeout_s=120"]
    store = f"file://{tmp_path}/store"
    procs = [_start("server.py", *common, "--store", store, "--workdir", str(tmp_path / "server"))]
    for i in range(2):
        workdir = str(tmp_path / "clients")
        procs.append(_start("client.py", *common, "--store", store, "--client-id", str(i), "--workdir", workdir))
    sim = _start("train.py", *common, "--workdir", str(tmp_path / "sim"), "--no-progress")
    for p in [*procs, sim]:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    step_a, a = final_params(str(tmp_path / "server"))
    step_b, b = final_params(str(tmp_path / "sim"))
    assert step_a == step_b == 3
    diff = max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    report(f"multi-process: server + 2 client processes vs one-process simulator, max |final param diff| = {diff:.1e}")
    assert diff <= 1e-6
    with open(tmp_path / "clients" / "timeline.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert {r["client"] for r in rows} == {0, 1} and len(rows) == 2 * (3 + 1)  # 3 rounds + the flush
    assert all({"compute_s", "comm_s", "exposed_wait_s", "bytes_up", "bytes_down"} <= r.keys() for r in rows)
    assert all(r["bytes_up"] > 0 for r in rows if r["round"] not in (0,))
    left = files_under(tmp_path / "store")  # the clients deleted every round once both had its aggregate
    report(f"multi-process: store after 3 rounds x 2 clients: {sum(left.values())} bytes ({', '.join(left)})")
    assert sorted(left) == ["server/done"]
    # The server's workdir is a run directory like the simulator's: eval and export read it.
    config, _, restored, step = experiment.restore_model(str(tmp_path / "server"))
    assert step == 3 and config.num_clients == 2
    jax.tree.map(np.testing.assert_array_equal, restored, a)


def test_a_client_with_other_settings_refuses_to_start_listing_them(tmp_path):
    store = transport.Store(f"file://{tmp_path}/store")
    config = load_config(os.path.join(ROOT, "configs/tiny.py"), SMALL)
    settings = experiment.agreed_settings(config)
    store.put_json("server/config", {"hash": experiment.settings_hash(settings), "settings": settings})
    other = ["--config.optimizer.learning_rate=0.5", "--config.local_steps=7", "--config.seed=3"]
    (tmp_path / "train.jsonl").write_text("")  # a client's own data file (it must exist: checked before joining)
    mine = [f"--config.data.path={tmp_path / 'train.jsonl'}", "--config.comm.timeout_s=9"]  # a client's own: allowed
    bad = _start("client.py", *other, *mine, "--store", store.url, "--client-id", "0", "--workdir", str(tmp_path))
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2
    assert err.strip().splitlines()[-1] == (
        "error: client 0: this config differs from the server's in local_steps=7 (server: 2), "
        "optimizer.learning_rate=0.5 (server: 0.003), seed=3 (server: 0): rerun with the server's settings"
    )


def test_a_killed_client_rejoins_when_its_command_is_rerun(tmp_path):
    """kill -9 client 2 of 3 mid-run and rerun its command: the run goes on, the rounds it missed are
    left out (and logged), it restores its own checkpoint, skips what was merged without it and is
    merged again."""
    common = ["--config.num_clients=3", "--config.rounds=7", "--config.comm.timeout_s=5"]
    store, cdir = f"file://{tmp_path}/store", str(tmp_path / "c")
    server = _start("server.py", *common, "--store", store, "--workdir", str(tmp_path / "server"))
    client = lambda i: _start("client.py", *common, "--store", store, "--client-id", str(i), "--workdir", cdir)  # noqa: E731
    clients = [client(i) for i in range(3)]
    ckpt = tmp_path / "c" / "client_2" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpt.is_dir() and any(d.isdigit() and int(d) >= 2 for d in os.listdir(ckpt))):
        assert server.poll() is None
        time.sleep(0.05)
    clients[2].kill()
    clients[2].wait()
    time.sleep(6)  # long enough to be left out of a round
    clients[2] = client(2)
    _, err = server.communicate(timeout=300)
    assert server.returncode == 0, err[-2000:]
    outs = [p.communicate(timeout=120) for p in clients]
    assert [p.returncode for p in clients] == [0, 0, 0], [e[-1000:] for _, e in outs]
    assert "client 2: rejoining the run at round" in outs[2][1]
    rows = compare.read_jsonl(str(tmp_path / "server" / "metrics.jsonl"))
    missed = [r for row in rows for r, c, _ in row["left_out"] if c == 2]
    merged = [r for row in rows for r, cs in row["merged"] if 2 in cs]
    assert missed and merged and max(merged) > max(missed), (missed, merged)
    assert all(c == 2 for row in rows for _, c, _ in row["left_out"])
    assert sum(row["left_out_by_reason"].get("missing", 0) for row in rows) == len(missed)
    assert f"round {missed[0]}: client 2's update left out: missing: no update within 5s" in err


def test_a_killed_server_resumes_and_the_final_model_is_bit_identical(tmp_path):
    """kill -9 the server mid-run and rerun its command: it resumes from its checkpoint on the same
    store while the clients wait, and ends with exactly the simulator's model (no update was lost)."""
    common = ["--config.num_clients=2", "--config.rounds=4", "--config.comm.timeout_s=30"]
    store, workdir = f"file://{tmp_path}/store", str(tmp_path / "server")
    server = _start("server.py", *common, "--store", store, "--workdir", workdir)
    clients = [
        _start("client.py", *common, "--store", store, "--client-id", str(i), "--workdir", str(tmp_path / "c"))
        for i in range(2)
    ]
    sim = _start("train.py", *common, "--workdir", str(tmp_path / "sim"), "--no-progress", quiet=True)
    ckpt = tmp_path / "server" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpt.is_dir() and any(d.isdigit() and int(d) >= 2 for d in os.listdir(ckpt))):
        assert server.poll() is None
        time.sleep(0.05)
    server.kill()  # kill -9, mid-run
    server.wait()
    again = _start("server.py", *common, "--store", store, "--workdir", workdir)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert "server: resuming the run in" in err
    for p in [*clients, sim]:
        _, cerr = p.communicate(timeout=300)
        assert p.returncode == 0, (cerr or "")[-2000:]
    step_a, a = final_params(workdir)
    step_b, b = final_params(str(tmp_path / "sim"))
    assert step_a == step_b == 4
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_simulator_through_a_store_equals_the_in_memory_exchange(wire):
    params, clients = toy_params(), toy_clients(3)
    part = blocks.partition(params, RULES)
    fed = algorithms.configure(rounds=5, num_clients=3, local_steps=2, wire_dtype=wire, seed=1)
    optimizer = optax.adamw(0.05, eps=1e-6)
    batches_fn = data.make_batches_fn(clients, BS)
    in_memory, _ = loop.run(fed, params, toy_loss, batches_fn, part, optimizer)
    store = transport.Store("memory://")
    through, _ = loop.run(
        fed, params, toy_loss, batches_fn, part, optimizer, exchange=net_exchange.ThroughStore(store, wire)
    )
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(through["params"]), jax.device_get(in_memory["params"]))
    assert store.kv.list().result() == []  # every round's keys are removed once aggregated
