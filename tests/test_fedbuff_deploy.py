"""FedBuff in the deployment (net/asynchronous.py): arrivals in real time, so no run equals another,
but the server's final model equals, bit for bit, a replay of its arrivals log: from the initial
params, exactly the logged accepted deltas of each apply, through `fedbuff.server_apply` with the
logged weights, which are `staleness_weight(tau) / Z` of the logged taus."""

import json
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import optax
from test_federated import BS, LR, RULES, toy_clients, toy_loss, toy_params
from test_train import ROOT, SMALL, final_params, read_jsonl, small_config

from jaxblock.fed import algorithms, blocks, data, local
from jaxblock.fed.algorithms import fedbuff
from jaxblock.fed.wire import Link
from jaxblock.net import asynchronous, transport
from jaxblock.net.comm import CommConfig
from jaxblock.run import experiment


def replay(fed, partition, params, rows, store):
    """The model after every apply in `rows` (the arrivals log), its deltas read back from `store`."""
    applies: dict[int, list] = {}
    for r in rows:
        if r["outcome"] == "accepted":
            applies.setdefault(r["round"], []).append(r)
    assert sorted(applies) == list(range(fed.rounds))
    for v in sorted(applies):
        taken = sorted(applies[v], key=lambda r: r["slot"])
        assert [r["slot"] for r in taken] == list(range(fedbuff.buffer_size(fed)))
        deltas = []
        for r in taken:
            prefix = asynchronous.arrival_prefix(r["client"], r["n"])
            deltas.append(store.fetch(prefix, store.get_json(f"{prefix}/COMMIT"))[0])
        blocks_, weights = [r["block"] for r in taken], [r["weight"] for r in taken]
        params = fedbuff.server_apply(params, partition, deltas, blocks_, weights, fed.eta)
    return params


def check_log(fed, num_blocks, rows, metrics):
    """Every logged tau is version - base, every weight staleness_weight(tau) / Z, every drop too
    stale; each apply's metrics row lists its accepted arrivals in order."""
    z = fedbuff.buffer_size(fed)
    for r in rows:
        if r["outcome"] in ("accepted", "dropped"):
            assert r["tau"] == r["round"] - r["base"] >= 0, r
        if r["outcome"] == "accepted":
            assert r["apply"] == r["round"], r
            assert r["weight"] == fedbuff.staleness_weight(fed, r["tau"]) / z, r
            assert not fed.options.max_staleness or r["tau"] <= fed.options.max_staleness, r
        if r["outcome"] == "dropped":
            assert r["tau"] > fed.options.max_staleness > 0, r
        assert r["block"] == fedbuff.choose_block(fed, r["client"], r["n"], num_blocks)
    assert [m["round"] for m in metrics] == list(range(fed.rounds))
    for m in metrics:
        taken = sorted((r for r in rows if r["round"] == m["round"] and r["outcome"] == "accepted"),
                       key=lambda r: r["slot"])  # fmt: skip
        assert m["arrivals"] == [[r["client"], r["n"]] for r in taken]
        assert m["weights"] == [r["weight"] for r in taken] and m["staleness"] == [r["tau"] for r in taken]
    for c in {r["client"] for r in rows}:  # each client's arrivals taken in order, none skipped
        assert [r["n"] for r in rows if r["client"] == c] == list(range(sum(r["client"] == c for r in rows)))


def run_in_threads(fed, store, keep_rounds, local_trains):
    """The server in this thread, one thread per client, on the toy model: (final params, log rows,
    metrics rows, the initial params and partition)."""
    params = toy_params()
    part = fedbuff.FedBuff(fed).partition(params, blocks.partition(params, RULES))
    batches_fn = data.make_batches_fn(toy_clients(fed.num_clients), BS)
    comm = CommConfig(store=store.url, timeout_s=30, keep_rounds=keep_rounds)
    errors, rows, metrics = [], [], []

    def client(i):
        try:
            own = transport.Store(store.url, store.context)
            asynchronous.run_client(i, fed, params, part, local_trains[i], batches_fn, own, comm, Link())
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(fed.num_clients)]
    for t in threads:
        t.start()
    try:
        final = asynchronous.serve(
            fed, params, part, store, comm, on_arrival=rows.append, on_apply=lambda state, row: metrics.append(row)
        )
    finally:
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    return final, rows, metrics, params, part


def nan_first(local_train):
    """A local_train whose first delta is NaN (a broken client), then honest."""
    calls = []

    def train(*args):
        delta, loss = local_train(*args)
        calls.append(1)
        return (jax.tree.map(lambda x: x * np.nan, delta) if len(calls) == 1 else delta), loss

    return train


def late_first(local_train, store, version):
    """A local_train whose first training ends only once the server has reached `version`: the
    client's first delta arrives `version` or more versions behind."""
    calls, deadline = [], time.time() + 60  # bounded: a server that failed never gets there

    def train(*args):
        calls.append(1)
        while len(calls) == 1 and time.time() < deadline and store.get_json(asynchronous.LATEST)["version"] < version:
            time.sleep(0.005)
        return local_train(*args)

    return train


def slow(local_train, seconds):
    def train(*args):
        time.sleep(seconds)
        return local_train(*args)

    return train


def test_threads_apply_every_z_arrivals_and_equal_a_replay_of_the_log(report):
    """Three clients: one whose first delta is NaN (rejected), one whose first arrives two versions
    late with max_staleness=1 (dropped). The server's model equals the replay of what it logged."""
    fed = algorithms.configure(
        algorithm="fedbuff", num_clients=3, local_steps=2, rounds=6, buffer_size=2, fedbuff_blocks=True,
        max_staleness=1, seed=3,
    )  # fmt: skip
    train = slow(local.make_local_train(toy_loss, optax.sgd(LR)), 0.05)
    store = transport.Store("memory://")
    start = time.perf_counter()
    trains = [train, nan_first(train), late_first(train, store, 2)]
    final, rows, metrics, params, part = run_in_threads(fed, store, True, trains)
    seconds = time.perf_counter() - start
    check_log(fed, part.num_blocks, rows, metrics)
    rejected = [r for r in rows if r["outcome"] == "rejected"]
    assert [(r["client"], r["n"]) for r in rejected] == [(1, 0)] and rejected[0]["reason"].startswith("non-finite")
    dropped = [r for r in rows if r["outcome"] == "dropped"]
    assert (2, 0, 0) in [(r["client"], r["n"], r["base"]) for r in dropped]  # others may be, as check_log allows
    replayed = replay(fed, part, params, rows, store)
    for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(replayed), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    taus = [r["tau"] for r in rows if r["outcome"] == "accepted"]
    report(f"FedBuff deployment in threads: {len(rows)} arrivals ({len(dropped)} dropped), accepted taus {taus}, "
           f"{seconds:.1f}s")  # fmt: skip


def test_a_finished_run_leaves_only_server_done_in_the_store():
    fed = algorithms.configure(algorithm="fedbuff", num_clients=2, local_steps=1, rounds=3, buffer_size=2)
    train = local.make_local_train(toy_loss, optax.sgd(LR))
    store = transport.Store("memory://")
    run_in_threads(fed, store, False, [train, slow(train, 0.05)])
    assert store.kv.list().result() == [b"server/done"]


# ----------------------------------------------------------------------------- processes

FEDBUFF = [
    "algorithm=fedbuff", "num_clients=2", "buffer_size=2", "rounds=3", "fedbuff_blocks=True",
    "client_slowdown=[1,4]", "step_seconds=0.1", "comm.keep_rounds=True", "comm.timeout_s=60",
]  # fmt: skip


def _start(script, *extra):
    """A script as its own OS process with one CPU device, as a user would run it (tests/test_comm.py's)."""
    config = ["--config", os.path.join(ROOT, "configs/tiny.py"), *[f"--config.{o}" for o in [*SMALL, *FEDBUFF]]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    cmd = [sys.executable, os.path.join(ROOT, "scripts", script), *config, *extra]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs, timeout_s=240):
    """Waits for every process (all killed if one overruns); asserts each exited with 0; their stderr."""
    deadline, errs = time.time() + timeout_s, []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[1])
            assert p.returncode == 0, errs[-1][-2000:]
        return errs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def test_server_and_two_client_processes_equal_a_replay_of_the_arrivals_log(tmp_path, report):
    url, server = f"file://{tmp_path}/store", str(tmp_path / "server")
    start = time.perf_counter()
    procs = [
        _start("client.py", "--store", url, "--client-id", str(i), "--workdir", str(tmp_path / "c")) for i in (0, 1)
    ]
    procs.insert(0, _start("server.py", "--store", url, "--workdir", server))
    _finish(procs)
    seconds = time.perf_counter() - start
    run = experiment.setup(small_config(*FEDBUFF))
    rows = read_jsonl(os.path.join(server, "arrivals.jsonl"))
    check_log(run.fed, run.partition.num_blocks, rows, read_jsonl(os.path.join(server, "metrics.jsonl")))
    step, final = final_params(server)
    assert step == 3
    replayed = replay(run.fed, run.partition, run.params, rows, transport.Store(url))
    assert jax.tree.structure(final) == jax.tree.structure(replayed)
    for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(replayed), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    _, _, restored, step = experiment.restore_model(server)  # eval.py and export_hf.py read it as any run
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, restored, final)
    timeline = read_jsonl(os.path.join(tmp_path, "c", "timeline.jsonl"))
    assert {r["client"] for r in timeline} == {0, 1} and all(r["bytes_up"] > 0 for r in timeline)
    accepted = [(r["client"], r["tau"]) for r in rows if r["outcome"] == "accepted"]
    report(f"FedBuff deployment, server + 2 client processes: {seconds:.1f}s, accepted (client, tau) {accepted}, "
           f"final model bitwise equal to the replay of arrivals.jsonl")  # fmt: skip


def _wait_until(what, condition, procs, timeout_s=180):
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError(f"never saw {what}")
        time.sleep(0.02)


def test_a_killed_server_and_a_killed_client_resume_and_the_model_equals_the_replay(tmp_path, report):
    """kill -9 the server after its second apply and client 1 after its second upload, and rerun
    both commands: the run ends, and its final model still equals the replay of its (rewritten) log."""
    more = ["--config.rounds=6", "--config.client_slowdown=[1,2]", "--config.step_seconds=0.15"]
    url, server, cdir = f"file://{tmp_path}/store", str(tmp_path / "server"), str(tmp_path / "c")
    start = time.perf_counter()
    client = lambda i: _start("client.py", *more, "--store", url, "--client-id", str(i), "--workdir", cdir)  # noqa: E731
    procs = [_start("server.py", *more, "--store", url, "--workdir", server), client(0), client(1)]
    ckpt, state = tmp_path / "server" / "checkpoints", tmp_path / "c" / "client_1" / "fedbuff.json"
    _wait_until("client 1's second upload", lambda: state.exists() and json.loads(state.read_text())["n"] >= 2, procs)
    procs[2].kill()
    procs[2].communicate()
    procs[2] = client(1)
    _wait_until("the server's second apply", lambda: ckpt.is_dir() and any(d.isdigit() and int(d) >= 2 for d in os.listdir(ckpt)), procs)  # fmt: skip
    procs[0].kill()
    procs[0].communicate()
    procs[0] = _start("server.py", *more, "--store", url, "--workdir", server)
    err = _finish(procs)[0]
    seconds = time.perf_counter() - start
    resumed = int(err.split("server: resuming the run in ")[1].split(" after round ")[1].split()[0])
    assert resumed >= 2
    run = experiment.setup(small_config(*FEDBUFF, *[m[len("--config.") :] for m in more]))
    rows = read_jsonl(os.path.join(server, "arrivals.jsonl"))
    check_log(run.fed, run.partition.num_blocks, rows, read_jsonl(os.path.join(server, "metrics.jsonl")))
    step, final = final_params(server)
    assert step == 6
    replayed = replay(run.fed, run.partition, run.params, rows, transport.Store(url))
    for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(replayed), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    report(f"FedBuff deployment, server and client 1 killed and rerun: {seconds:.1f}s, {len(rows)} arrivals, "
           f"final model bitwise equal to the replay of arrivals.jsonl")  # fmt: skip
