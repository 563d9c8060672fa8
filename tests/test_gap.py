"""Issue 32's options that keep ParaBlock's overlap: the no-repeat schedule and `self_weight`, against
NumPy references, the threaded runtime and a checkpoint round trip."""

import os
import threading

import jax
import numpy as np
import optax
import pytest
from scipy import stats
from test_comm import Killed, killed_after
from test_fedbuff import through_checkpoint
from test_federated import BLOCK_KEY, BS, LR, RULES, K, numpy_sgd, toy_clients, toy_loss, toy_params
from test_train import ROOT

from jaxblock.fed import algorithms, blocks, data, lean, local, loop, schedule, wire
from jaxblock.fed.merge import axpy
from jaxblock.net import comm, transport

SIZES = np.array([24, 12, 36, 6])  # examples per client, for aggregation='samples'


def _equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _close(a, b, tol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float64), y, atol=tol, rtol=tol), a, b)


def _blocks(fed, rounds, num_blocks):
    return [schedule.choose_block(fed, t, num_blocks) for t in range(rounds)]


# ----------------------------------------------------------------------------- the no-repeat schedule


@pytest.mark.parametrize("num_blocks", [2, 5])
def test_no_repeat_schedule_never_repeats_and_is_uniform_over_the_other_blocks(num_blocks, report):
    """20,000 rounds: b_t != b_{t-1} always; given b_{t-1}, b_t is uniform over the other B-1 blocks
    (chi-square over the B(B-1) transitions, B(B-2) degrees of freedom); it trains the `random`
    schedule's block in every round where that is not b_{t-1}, and so differs from it in ~1/B of them."""
    rounds = 20_000
    fed = algorithms.configure(schedule="random_norepeat", seed=11)
    path = np.array(_blocks(fed, rounds, num_blocks))
    assert not np.any(path[1:] == path[:-1])
    counts = np.zeros((num_blocks, num_blocks))
    np.add.at(counts, (path[:-1], path[1:]), 1)
    others = ~np.eye(num_blocks, dtype=bool)
    expected = (counts.sum(1, keepdims=True) / (num_blocks - 1)) * others
    chi2 = float(((counts - expected)[others] ** 2 / expected[others]).sum())
    dof = num_blocks * (num_blocks - 2)
    p = 1.0 if dof == 0 else float(stats.chi2.sf(chi2, dof))
    report(f"random_norepeat, B={num_blocks}, {rounds} rounds: chi-square {chi2:.1f} on {dof} dof, p = {p:.3f}")
    assert p > 1e-3
    if num_blocks == 2:
        assert set(path[::2]) == {path[0]} and set(path[1::2]) == {1 - path[0]}  # it alternates
    # the random schedule's draws, kept wherever they do not repeat the block before
    rnd = np.array(_blocks(algorithms.configure(schedule="random", seed=11), rounds, num_blocks))
    kept = rnd[1:] != path[:-1]
    assert np.array_equal(path[1:][kept], rnd[1:][kept]) and path[0] == rnd[0]
    assert abs((~kept).mean() - 1 / num_blocks) < 0.02
    assert np.allclose(np.bincount(path, minlength=num_blocks) / rounds, 1 / num_blocks, atol=0.02)


def test_no_repeat_schedule_is_a_pure_function_of_seed_and_round():
    """A resumed run (or the server planning round 3000 first) sees the same path as one that counted
    from round 0; another seed draws another path."""
    fed = algorithms.configure(schedule="random_norepeat", seed=4)
    schedule._no_repeat.cache_clear()
    late = [schedule.choose_block(fed, t, 7) for t in (3000, 1500, 17)]  # random access, nothing cached
    schedule._no_repeat.cache_clear()
    path = _blocks(fed, 3001, 7)
    assert late == [path[3000], path[1500], path[17]]
    assert path[:50] != _blocks(algorithms.configure(schedule="random_norepeat", seed=5), 50, 7)


# ----------------------------------------------------------------------------- self_weight


def algorithm2_client_params(state, partition, client, eta, own_weight=None):
    """`lean.client_params` as it was before self_weight: the server model plus eta * every own
    pending delta (`own_weight` ignored)."""
    params = state["params"]
    for r in sorted(state["pending"]):
        delta = state["pending"][r]["deltas"].get(client)
        if delta is not None:
            block, rest = partition.split(params, state["pending"][r]["block"])
            params = blocks.merge(axpy(block, eta, delta), rest)
    return params


def run_recording(fed, n=4, sizes=None, params=None):
    """The simulator round by round: (servers, each client's lean model, trained blocks, participants,
    final state, batches_fn), the client models with the algorithm's own weights."""
    params = toy_params() if params is None else params
    part = blocks.partition(params, RULES)
    batches_fn = data.make_batches_fn(toy_clients(n), BS)
    trainer = loop.make_trainer(fed, toy_loss, batches_fn, part, optax.sgd(LR), client_sizes=sizes)
    state = lean.init_state(fed, params)
    servers, models, trained, parts = [], [], [], []
    for _ in range(fed.rounds):
        state, m = loop.run_round(trainer, state)
        trained.append(m["block"])
        parts.append(m["clients"])
        servers.append(state["params"])
        own = [lean.own_weights(trainer.algorithm, i, sizes) for i in range(n)]
        models.append([lean.client_params(state, part, i, fed.eta, own[i]) for i in range(n)])
    return servers, models, trained, parts, loop.flush(trainer, state), batches_fn


@pytest.mark.parametrize("staleness, participation", [(1, 1.0), (2, 0.5)])
def test_self_weight_1_is_algorithm_2_bitwise(staleness, participation, monkeypatch):
    """self_weight=1 (the default, or set) and the client models of before self_weight existed: every
    round's server and client models and the final model are bitwise equal."""
    settings = dict(rounds=6, num_clients=4, local_steps=K, eta=0.7, staleness=staleness, seed=3,
                    participation=participation)  # fmt: skip
    runs = [
        run_recording(algorithms.configure(**settings)),
        run_recording(algorithms.configure(**settings, self_weight=1)),
    ]
    monkeypatch.setattr(loop, "client_params", algorithm2_client_params)
    monkeypatch.setattr(lean, "client_params", algorithm2_client_params)
    runs.append(run_recording(algorithms.configure(**settings)))
    for servers, models, _, _, final, _ in runs[1:]:
        for t in range(6):
            _equal(servers[t], runs[0][0][t])
            for i in range(4):
                _equal(models[t][i], runs[0][1][t][i])
        _equal(final["params"], runs[0][4]["params"])
    assert not np.allclose(runs[0][4]["params"]["a"]["w"], toy_params()["a"]["w"])  # it trained


def numpy_algorithm2_weighted(fed, theta0, batches_fn, schedule_, participants_of, weights_of, lam_of):
    """Algorithm 2 with explicit client copies, local SGD, float64, extended with self_weight: a client
    adds eta * lam * its own delta after training; when round r's aggregate sum_i w_i Delta_r^i arrives
    (end of round r + s), every client adds eta * aggregate and each of round r's participants takes off
    eta * lam * its own delta. `weights_of(r)`: {client: w_i}; `lam_of(r, i)`: lam."""
    s, eta = fed.effective_staleness, fed.eta
    cp = lambda p: {k: {kk: np.array(vv, np.float64) for kk, vv in v.items()} for k, v in p.items()}  # noqa: E731
    server, clients = cp(theta0), [cp(theta0) for _ in range(fed.num_clients)]
    positions, own = [0] * fed.num_clients, {}
    servers, client_models = [], []

    def aggregate(r):
        k1, k2 = BLOCK_KEY[schedule_[r]]
        agg = sum(w * own[(r, i)] for i, w in weights_of(r).items())
        server[k1][k2] += eta * agg
        for i in range(fed.num_clients):
            clients[i][k1][k2] += eta * agg
            if i in participants_of[r]:
                clients[i][k1][k2] -= eta * lam_of(r, i) * own[(r, i)]

    for t in range(fed.rounds):
        k1, k2 = BLOCK_KEY[schedule_[t]]
        for i in participants_of[t]:
            batches, positions[i] = batches_fn(i, positions[i], fed.local_steps)
            own[(t, i)] = numpy_sgd(clients[i], batches, [(k1, k2)], LR, fed.local_steps)[k1][k2] - clients[i][k1][k2]
        for i in participants_of[t]:
            clients[i][k1][k2] += eta * lam_of(t, i) * own[(t, i)]
        if t - s >= 0:
            aggregate(t - s)
        servers.append(cp(server))
        client_models.append([cp(c) for c in clients])
    for r in range(max(fed.rounds - s, 0), fed.rounds):
        aggregate(r)
    return servers, client_models, server


@pytest.mark.parametrize(
    "self_weight, staleness, participation, aggregation",
    [(0.0, 1, 1.0, "uniform"), (0.0, 2, 0.5, "samples"), ("w", 1, 1.0, "uniform"), ("w", 2, 0.5, "samples"),
     (0.5, 1, 1.0, "uniform")],
)  # fmt: skip
def test_self_weight_matches_numpy_algorithm_2_extended(self_weight, staleness, participation, aggregation):
    """Every round's server and client models and the final model equal the NumPy reference with the
    weight (1e-6); after the correction for round r, block b_r of every client is the server's
    exactly, and a client's model is the server's plus eta * sum_r lam_r * its pending deltas (the lean
    form with the weight: with self_weight=0, every client holds exactly the server model)."""
    n = 4
    fed = algorithms.configure(
        rounds=8, num_clients=n, local_steps=K, eta=0.7, staleness=staleness, participation=participation, seed=3,
        aggregation=aggregation, self_weight=self_weight, schedule="random",
    )  # fmt: skip
    sizes = SIZES if aggregation == "samples" else None
    servers, models, trained, parts, final, batches_fn = run_recording(fed, n, sizes)
    assert any(a == b for a, b in zip(trained, trained[1:], strict=False)), "want a b_t == b_{t-1} case"

    def weights_of(r):
        return dict(zip(parts[r], schedule.aggregation_weights(fed, parts[r], sizes), strict=True))

    def lam_of(r, i):
        return weights_of(r)[i] if self_weight == "w" else self_weight

    if self_weight == "w" and aggregation == "uniform":
        assert lam_of(0, 0) == pytest.approx(1 / n)
    ref_servers, ref_clients, ref_final = numpy_algorithm2_weighted(
        fed, toy_params(), batches_fn, trained, parts, weights_of, lam_of
    )
    part = blocks.partition(toy_params(), RULES)
    for t in range(fed.rounds):
        _close(servers[t], ref_servers[t])
        for i in range(n):
            _close(models[t][i], ref_clients[t][i])
            if self_weight == 0.0:
                _equal(models[t][i], servers[t])
        r = t - staleness
        if r >= 0 and trained[r] not in trained[r + 1 : t + 1]:  # Eq. 3-4: b_r is the server's, bit for bit
            for i in range(n):
                _equal(part.block(models[t][i], trained[r]), part.block(servers[t], trained[r]))
    _close(final["params"], ref_final)
    default = run_recording(algorithms.configure(**{**fed.flat(), "self_weight": 1.0}), n, sizes)[4]
    assert not np.allclose(default["params"]["a"]["w"], final["params"]["a"]["w"])  # the weight matters


def test_self_weight_settings_and_their_errors():
    assert algorithms.configure(self_weight=1).options.self_weight == 1.0
    assert algorithms.configure(self_weight="w").options.self_weight == "w"
    for bad in (1.5, -0.1, "x", True):
        with pytest.raises(ValueError, match=r"^self_weight=.*: must be a number in \[0, 1\] or 'w'"):
            algorithms.configure(self_weight=bad)
    with pytest.raises(ValueError, match=r"^self_weight=0: a setting of parablock, which algorithm='fedbcd' does not"):
        algorithms.configure(algorithm="fedbcd", self_weight=0)
    algo = algorithms.make(algorithms.configure(num_clients=4, aggregation="samples", self_weight="w"))
    assert algo.own_weight(2, 0, SIZES) == pytest.approx(36 / 78)
    assert algorithms.make(algorithms.configure(algorithm="fedbcd")).own_weight(0, 0) == 1.0


def test_self_weight_0_from_a_config_file_or_a_flag_is_one_setting(tmp_path):
    """An int in a config file and the same number as a flag are one setting (a float): one cell hash,
    and a server and a client that set it the two ways agree."""
    from jaxblock.run import experiment
    from jaxblock.run.config import load_config

    tiny = os.path.join(ROOT, "configs", "tiny.py")
    (tmp_path / "mine.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('tiny', {tiny!r})\n"
        "tiny = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(tiny)\n\n\n"
        "def get_config():\n    config = tiny.get_config()\n    config.self_weight = 0\n    return config\n"
    )
    from_file = load_config(str(tmp_path / "mine.py"))
    from_flag = load_config(tiny, ["self_weight=0"])
    assert from_file.self_weight == from_flag.self_weight == 0.0 and isinstance(from_file.self_weight, float)
    assert experiment.settings_hash(experiment.agreed_settings(from_file)) == experiment.settings_hash(
        experiment.agreed_settings(from_flag)
    )


# ----------------------------------------------------------------------------- resume, threads, deployment


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """No-repeat schedule, self_weight='w' by sample count, staleness 2: 3 rounds, an orbax checkpoint
    round trip (the schedule's cache emptied, as in a new process), 4 more and the flush: the blocks,
    the server model after every round and the final model are bitwise the uninterrupted run's."""
    fed = algorithms.configure(rounds=7, num_clients=4, local_steps=K, staleness=2, seed=6, aggregation="samples",
                               self_weight="w", schedule="random_norepeat")  # fmt: skip
    params = toy_params()
    part = blocks.partition(params, RULES)
    trainer = loop.make_trainer(fed, toy_loss, data.make_batches_fn(toy_clients(4), BS), part, optax.sgd(LR),
                                client_sizes=SIZES)  # fmt: skip
    runs = []
    for stop in (None, 3):
        state, trace = lean.init_state(fed, params), []
        for _ in range(fed.rounds):
            if state["round"] == stop:
                state, meta = through_checkpoint(state, fed, part, tmp_path / "ckpt")  # as a resumed run sees it
                assert (meta["fed"]["self_weight"], meta["fed"]["schedule"]) == (fed.options.self_weight, fed.schedule)
                schedule._no_repeat.cache_clear()
            state, m = loop.run_round(trainer, state)
            trace.append((m["block"], state["params"]))
        runs.append((trace, loop.flush(trainer, state)["params"]))
    (a, final_a), (b, final_b) = runs
    trained = [x for x, _ in a]
    assert trained == [x for x, _ in b] and all(x != y for x, y in zip(trained, trained[1:], strict=False))
    for (_, pa), (_, pb) in zip(a, b, strict=True):
        _equal(pa, pb)
    _equal(final_a, final_b)


OPTIONS = {  # threaded runtime vs simulator, each new option
    "parablock_norepeat": dict(schedule="random_norepeat"),
    "fedbcd_norepeat": dict(algorithm="fedbcd", schedule="random_norepeat"),
    "self_weight_0": dict(self_weight=0.0),
    "self_weight_w_samples_sampled": dict(self_weight="w", aggregation="samples", participation=0.5, staleness=2),
    "self_weight_half_topk": dict(self_weight=0.5, compression="topk"),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_threaded_runtime_equals_the_simulator(option):
    """Server + 4 client threads through a memory:// store: the final model is bitwise the simulator's,
    every client ends holding it, and the option changed the result (it is not the default run)."""
    params, clients = toy_params(), toy_clients(4)
    part = blocks.partition(params, RULES)
    fed = algorithms.configure(rounds=6, num_clients=4, local_steps=3, seed=4, **OPTIONS[option])
    optimizer = optax.adamw(0.05, eps=1e-6)
    batches_fn = data.make_batches_fn(clients, BS)
    server, replicas = comm.run_in_threads(
        fed, params, part, local.make_local_train(toy_loss, optimizer), batches_fn, transport.Store("memory://"),
        comm.CommConfig(timeout_s=20.0), client_sizes=SIZES,
    )  # fmt: skip
    sim, history = loop.run(fed, params, toy_loss, batches_fn, part, optimizer, client_sizes=SIZES)
    _equal(jax.device_get(server), jax.device_get(sim["params"]))
    for replica in replicas.values():
        _equal(jax.device_get(replica), jax.device_get(server))
    default = {**fed.flat(), "schedule": "random"}
    if "self_weight" in default:
        default["self_weight"] = 1.0
    other, other_history = loop.run(algorithms.configure(**default), params, toy_loss, batches_fn, part, optimizer,
                                    client_sizes=SIZES)  # fmt: skip
    assert not np.allclose(np.asarray(other["params"]["a"]["w"]), np.asarray(sim["params"]["a"]["w"]))
    if fed.schedule == "random_norepeat":  # the random schedule repeats a block here; this one never does
        trained, random = [m["block"] for m in history], [m["block"] for m in other_history]
        assert all(a != b for a, b in zip(trained, trained[1:], strict=False))
        assert any(a == b for a, b in zip(random, random[1:], strict=False))


def test_a_deployment_client_restarted_with_self_weight_w_loses_nothing():
    """self_weight='w' by sample count, no-repeat schedule: client 1 dies right after its round-2
    checkpoint and rejoins from it; the final model is bitwise the simulator's (the restarted client
    weighs its pending deltas from the settings and the plans, as before it died)."""
    params, clients = toy_params(), toy_clients(3)
    part = blocks.partition(params, RULES)
    fed = algorithms.configure(rounds=5, num_clients=3, local_steps=2, seed=2, aggregation="samples",
                               self_weight="w", schedule="random_norepeat")  # fmt: skip
    sizes = SIZES[:3]
    train, batches = local.make_local_train(toy_loss, optax.sgd(0.1)), data.make_batches_fn(clients, BS)
    store, cc = transport.Store("memory://"), comm.CommConfig(timeout_s=20.0)
    saved, errors = {}, []
    dies_after_round_2 = killed_after(3, saved)

    def client(i):
        other = transport.Store(store.url, store.context)
        try:
            if i == 1:
                with pytest.raises(Killed):
                    comm.run_client(1, fed, params, part, train, batches, other, cc, wire.Link(),
                                    on_state=dies_after_round_2, client_sizes=sizes)  # fmt: skip
                comm.run_client(1, fed, params, part, train, batches, other, cc, wire.Link(), resume=saved["state"],
                                client_sizes=sizes)  # fmt: skip
            else:
                comm.run_client(i, fed, params, part, train, batches, other, cc, wire.Link(), client_sizes=sizes)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    server = comm.serve(fed, params, part, store, cc, client_sizes=sizes)
    for th in threads:
        th.join()
    assert not errors, errors
    sim, _ = loop.run(fed, params, toy_loss, batches, part, optax.sgd(0.1), client_sizes=sizes)
    _equal(jax.device_get(server), jax.device_get(sim["params"]))
