"""The federated core against independent references: NumPy Algorithm 2, FedAvg, invariants."""

import gc
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxblock import model
from jaxblock.fed import algorithms, blocks, data, lean, local, loop, schedule, validate
from jaxblock.model.config import ModelConfig

N, K, BS, LR = 3, 2, 4, 0.05
RULES = [("a/w", "A"), ("b/w", "B"), ("c/bias", "C")]


def toy_params(seed=0):
    rng = np.random.RandomState(seed)
    return {
        "a": {"w": rng.randn(4, 3).astype(np.float32) * 0.5},
        "b": {"w": rng.randn(3, 2).astype(np.float32) * 0.5},
        "c": {"bias": rng.randn(2).astype(np.float32) * 0.1},
    }


def toy_loss(p, batch):  # a 2-layer linear net, MSE
    pred = batch["x"] @ p["a"]["w"] @ p["b"]["w"] + p["c"]["bias"]
    return jnp.mean((pred - batch["y"]) ** 2)


def toy_grads(p, x, y):
    """NumPy gradient of toy_loss, by hand."""
    h = x @ p["a"]["w"]
    r = h @ p["b"]["w"] + p["c"]["bias"] - y
    g = 2 * r / r.size
    return {"a": {"w": x.T @ (g @ p["b"]["w"].T)}, "b": {"w": h.T @ g}, "c": {"bias": g.sum(0)}}


def numpy_sgd(model, batches, leaves, lr, steps):
    """LocalBlockTraining by hand: `steps` SGD steps on the (k1, k2) `leaves` of a float64 copy of `model`."""
    local = {k: {kk: np.array(vv, np.float64) for kk, vv in v.items()} for k, v in model.items()}
    for k in range(steps):
        g = toy_grads(local, batches["x"][k].astype(np.float64), batches["y"][k].astype(np.float64))
        for k1, k2 in leaves:
            local[k1][k2] -= lr * g[k1][k2]
    return local


def toy_clients(n=N, examples=24, seed=1):
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):  # non-IID: each client has its own true map
        x = rng.randn(examples, 4).astype(np.float32)
        w = rng.randn(4, 2).astype(np.float32) * (1 + i)
        out.append({"x": x, "y": (x @ w + 0.1 * rng.randn(examples, 2)).astype(np.float32)})
    return out


BLOCK_KEY = {0: ("a", "w"), 1: ("b", "w"), 2: ("c", "bias")}


def numpy_lr(fed, t):
    """LR in round t under fed.lr_decay, written out (OpenFedLLM's cosine_learning_rate, and linear)."""
    lo, progress = LR * fed.lr_decay_alpha, t / fed.rounds
    if fed.lr_decay == "cosine":
        return lo + 0.5 * (LR - lo) * (1 + math.cos(math.pi * progress))
    if fed.lr_decay == "linear":
        return LR - (LR - lo) * progress
    return LR


def numpy_algorithm2(fed, theta0, batches_fn, schedule, participants_of):
    """ParaBlock (Algorithm 2) with staleness s, explicit client copies, local SGD; float64.

    Returns the server model after every round and every client's model after every round.
    """
    s, eta = fed.effective_staleness, fed.eta
    cp = lambda p: {k: {kk: np.array(vv, np.float64) for kk, vv in v.items()} for k, v in p.items()}  # noqa: E731
    server = cp(theta0)
    clients = [cp(theta0) for _ in range(fed.num_clients)]
    positions = [0] * fed.num_clients
    own, agg = {}, {}  # own[(t, i)] = Delta_t^i ; agg[t] = Delta_t
    servers, client_models = [], []

    def aggregate(r):
        k1, k2 = BLOCK_KEY[schedule[r]]
        agg[r] = np.mean([own[(r, i)] for i in participants_of[r]], axis=0)
        server[k1][k2] += eta * agg[r]
        for i in range(fed.num_clients):  # everyone receives the aggregate ...
            clients[i][k1][k2] += eta * agg[r]
            if i in participants_of[r]:  # ... and the round's participants undo their own delta
                clients[i][k1][k2] -= eta * own[(r, i)]

    for t in range(fed.rounds):
        k1, k2 = BLOCK_KEY[schedule[t]]
        lr = numpy_lr(fed, t)
        for i in participants_of[t]:  # compute thread: LocalBlockTraining with SGD
            batches, positions[i] = batches_fn(i, positions[i], fed.local_steps)
            local_model = numpy_sgd(clients[i], batches, [(k1, k2)], lr, fed.local_steps)
            own[(t, i)] = local_model[k1][k2] - clients[i][k1][k2]
        for i in participants_of[t]:  # the client applies its own delta at once
            clients[i][k1][k2] += eta * own[(t, i)]
        if t - s >= 0:
            aggregate(t - s)  # communication thread delivers round t - s
        servers.append(cp(server))
        client_models.append([cp(c) for c in clients])
    for r in range(max(fed.rounds - s, 0), fed.rounds):  # final flush
        aggregate(r)
    return servers, client_models, server


def run_core(fed, params, clients, *, rules=RULES, optimizer=None, client_batch=1):
    """The jaxblock core, round by round, recording server/client models and each round's deltas."""
    part = algorithms.make(fed).partition(params, blocks.partition(params, rules))
    batches_fn = data.make_batches_fn(clients, BS)
    optimizer = optimizer or optax.sgd(LR)
    trainer = loop.make_trainer(fed, toy_loss, batches_fn, part, optimizer, client_batch=client_batch)
    state = lean.init_state(fed, params)
    servers, client_models, trained_blocks, parts, deltas = [], [], [], [], []
    for _ in range(fed.rounds):
        state, m = loop.run_round(trainer, state)
        trained_blocks.append(m["block"])
        parts.append(m["clients"])
        deltas.append(state["pending"].get(m["round"], {}).get("deltas"))
        servers.append(state["params"])
        client_models.append([lean.client_params(state, part, i, fed.eta) for i in range(fed.num_clients)])
    final = loop.flush(trainer, state)
    return servers, client_models, final, trained_blocks, parts, part, batches_fn


def _close(a, b, tol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float64), y, atol=tol, rtol=tol), a, b)


@pytest.mark.parametrize(
    "staleness, participation, lr_decay, client_batch",
    [(1, 1.0, "none", 1), (2, 1.0, "none", 1), (3, 1.0, "none", 1), (1, 0.5, "none", 1), (1, 1.0, "cosine", 1),
     (2, 0.5, "linear", 1), (1, 1.0, "none", N), (2, 0.5, "linear", 2)],
)  # fmt: skip
def test_parablock_equals_numpy_algorithm2(staleness, participation, lr_decay, client_batch):
    """(b) server trajectory and (a)-style client models equal an explicit NumPy Algorithm 2, with the
    clients trained one by one or `client_batch` at a time (one vmapped program)."""
    fed = algorithms.configure(
        rounds=8, num_clients=N, local_steps=K, eta=0.7, staleness=staleness, participation=participation, seed=3,
        lr_decay=lr_decay, lr_decay_alpha=0.1 if lr_decay == "linear" else 0.0,
    )  # fmt: skip
    params, clients = toy_params(), toy_clients()
    servers, client_models, final, schedule, parts, _, batches_fn = run_core(
        fed, params, clients, client_batch=client_batch
    )
    assert any(a == b for a, b in zip(schedule, schedule[1:], strict=False)), "want a b_t == b_{t-1} case"
    if participation < 1:
        assert {len(p) for p in parts} == {math.ceil(0.5 * N)} and len({tuple(p) for p in parts}) > 1
    ref_servers, ref_clients, ref_final = numpy_algorithm2(fed, params, batches_fn, schedule, parts)
    for t in range(fed.rounds):
        _close(servers[t], ref_servers[t])
        for i in range(N):
            _close(client_models[t][i], ref_clients[t][i])
    _close(final["params"], ref_final)


@pytest.mark.parametrize("staleness", [1, 2])
def test_eq3_4_invariant_for_every_client_after_every_round(staleness):
    """(a) Right after the correction for round r = t - s, block b_r of every client equals the server's."""
    fed = algorithms.configure(rounds=9, num_clients=N, local_steps=K, staleness=staleness, seed=5)
    params = toy_params()
    servers, client_models, _, schedule, _, part, _ = run_core(fed, params, toy_clients())
    checked = 0
    for t in range(staleness, fed.rounds):
        r = t - staleness
        if schedule[r] in schedule[r + 1 : t + 1]:
            continue  # the block was trained again since: the client's own newer delta is on it
        for i in range(N):
            client_block = part.block(client_models[t][i], schedule[r])
            server_block = part.block(servers[t], schedule[r])
            jax.tree.map(np.testing.assert_array_equal, client_block, server_block)
            checked += 1
        # ... while the block trained this round still differs between clients (it is pending)
        blocks_t = [part.block(client_models[t][i], schedule[t]) for i in range(N)]
        assert not np.array_equal(jax.tree.leaves(blocks_t[0])[0], jax.tree.leaves(blocks_t[1])[0])
    assert checked >= 3 * N


def test_one_client_parablock_equals_fedbcd():
    """(c) With one client the stale correction is exact: ParaBlock's final model is FedBCD's."""
    params, clients = toy_params(), toy_clients(n=1)
    finals = {}
    for algorithm in ("parablock", "fedbcd"):
        fed = algorithms.configure(algorithm=algorithm, rounds=6, num_clients=1, local_steps=K, seed=2)
        finals[algorithm] = run_core(fed, params, clients, optimizer=optax.adamw(0.05, eps=1e-6))[2]["params"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), finals["parablock"], finals["fedbcd"])
    assert not np.allclose(finals["fedbcd"]["a"]["w"], params["a"]["w"])  # it trained


def test_single_block_fedbcd_equals_fed_full_ft():
    """(d) FedBCD over one block of every parameter = FedAvg with local AdamW, written out here."""
    params, clients = toy_params(), toy_clients()
    fed = algorithms.configure(algorithm="fedbcd", rounds=4, num_clients=N, local_steps=K, eta=1.0)
    adamw = optax.adamw(0.05, b1=0.9, b2=0.999, eps=1e-6)
    core = run_core(fed, params, clients, rules=[(".*", "everything")], optimizer=adamw)[2]["params"]
    full = run_core(
        algorithms.configure(algorithm="fedavg_full", rounds=4, num_clients=N, local_steps=K), params, clients,
        optimizer=adamw,
    )[2]["params"]  # fmt: skip

    batches_fn = data.make_batches_fn(clients, BS)
    server = jax.tree.map(jnp.asarray, params)
    positions = [0] * N
    for _ in range(fed.rounds):
        deltas = []
        for i in range(N):
            p, state = server, adamw.init(server)
            batches, positions[i] = batches_fn(i, positions[i], K)
            for k in range(K):
                g = jax.grad(toy_loss)(p, jax.tree.map(lambda x, k=k: x[k], batches))
                updates, state = adamw.update(g, state, p)
                p = optax.apply_updates(p, updates)
            deltas.append(jax.tree.map(jnp.subtract, p, server))
        server = jax.tree.map(lambda s, *d: s + sum(d) / N, server, *deltas)
    _close(core, jax.tree.map(np.asarray, server), tol=1e-5)
    _close(full, jax.tree.map(np.asarray, server), tol=1e-5)


@pytest.mark.parametrize("staleness", [1, 2, 3])
def test_flush_leaves_all_T_aggregates_in_the_server(staleness):
    """(e) theta_T = theta_0 + eta * sum_t Delta_t on b_t, for every round including the last s."""
    fed = algorithms.configure(rounds=5, num_clients=N, local_steps=K, eta=0.5, staleness=staleness, seed=1)
    params, clients = toy_params(), toy_clients()
    part = blocks.partition(params, RULES)
    trainer = loop.make_trainer(fed, toy_loss, data.make_batches_fn(clients, BS), part, optax.sgd(LR))
    state = lean.init_state(fed, params)
    expected = jax.tree.map(lambda x: np.array(x, np.float64), params)
    for _ in range(fed.rounds):
        state, m = loop.run_round(trainer, state)
        entry = state["pending"][m["round"]]  # the round just trained is still in flight (s >= 1)
        mean = jax.tree.map(lambda *d: np.mean(d, axis=0), *[entry["deltas"][c] for c in entry["clients"]])
        k1, k2 = BLOCK_KEY[m["block"]]
        expected[k1][k2] += fed.eta * mean[k1][k2]
    assert len(state["pending"]) == staleness  # the last s rounds await the flush
    final = loop.flush(trainer, state)
    assert final["pending"] == {}
    _close(final["params"], expected)


def test_schedules():
    def seq(name, rounds=8, nb=3, seed=0):
        fed = algorithms.configure(schedule=name, seed=seed)
        return [schedule.choose_block(fed, t, nb) for t in range(rounds)]

    assert seq("sequential") == [0, 1, 2, 0, 1, 2, 0, 1]
    assert seq("reverse") == [2, 1, 0, 2, 1, 0, 2, 1]
    cyc = seq("cyclic", rounds=9)
    assert all(sorted(cyc[i : i + 3]) == [0, 1, 2] for i in (0, 3, 6))  # each block once per cycle
    assert len({tuple(cyc[i : i + 3]) for i in (0, 3, 6)}) > 1  # reshuffled between cycles
    rnd = seq("random", rounds=40, nb=4)
    assert rnd == seq("random", rounds=40, nb=4) and set(rnd) == {0, 1, 2, 3} and rnd != seq("random", 40, 4, seed=1)


def test_gradient_schedule_picks_the_largest_gradient_and_reports_its_cost():
    params, clients = toy_params(), toy_clients()
    params["c"]["bias"] = np.array([30.0, -30.0], np.float32)  # a huge bias error: its gradient dominates
    fed = algorithms.configure(schedule="gradient", rounds=1, num_clients=N, local_steps=K)
    part = blocks.partition(params, RULES)
    trainer = loop.make_trainer(fed, toy_loss, data.make_batches_fn(clients, BS), part, optax.sgd(LR))
    _, m = loop.run_round(trainer, lean.init_state(fed, params))
    assert m["block"] == 2 and m["schedule_seconds"] > 0


def test_aggregation_by_sample_count():
    fed = algorithms.configure(aggregation="samples", num_clients=3)
    w = schedule.aggregation_weights(fed, [0, 2], np.array([10, 99, 30]))
    np.testing.assert_allclose(w, [0.25, 0.75])
    params = toy_params()
    part = blocks.partition(params, RULES)
    deltas = [{"b": {"w": np.ones((3, 2), np.float32)}}, {"b": {"w": 3 * np.ones((3, 2), np.float32)}}]
    merged = loop.server_merge(params, part, 1, deltas, w, eta=2.0)
    np.testing.assert_allclose(merged["b"]["w"], params["b"]["w"] + 2.0 * 2.5, rtol=1e-6)
    assert merged["a"]["w"] is params["a"]["w"]  # other blocks untouched, not copied


def test_partial_participation_leaves_absent_clients_alone():
    fed = algorithms.configure(rounds=1, num_clients=4, participation=0.5, local_steps=K, seed=0)
    params = toy_params()
    trainer = loop.make_trainer(
        fed, toy_loss, data.make_batches_fn(toy_clients(4), BS), blocks.partition(params, RULES), optax.sgd(LR)
    )
    state, m = loop.run_round(trainer, lean.init_state(fed, params))
    absent = sorted(set(range(4)) - set(m["clients"]))
    assert len(m["clients"]) == 2 and all(state["positions"][c] == 0 for c in absent)
    assert all(state["positions"][c] == K * BS for c in m["clients"])


def test_a_nan_update_is_left_out_or_stops_the_run_as_the_policy_says():
    """ParaBlock, 3 clients, client 1's data is NaN: round 0's deltas are merged at the end of round 1
    without it, renormalised over the other two; with on_bad_update='stop' the run ends naming it."""
    params, clients = toy_params(), toy_clients()
    clients[1]["y"][:] = np.nan
    fed = algorithms.configure(rounds=2, num_clients=N, local_steps=K, seed=0)
    part = blocks.partition(params, RULES)

    def trainer(policy):
        return loop.make_trainer(fed, toy_loss, data.make_batches_fn(clients, BS), part, optax.sgd(LR), policy=policy)

    state, _ = loop.run_round(trainer(validate.Policy()), lean.init_state(fed, params))
    sent = state["pending"][0]
    after, m = loop.run_round(trainer(validate.Policy()), state)
    assert m["rejected"] == [[0, 1, "non-finite: NaN/Inf in the update"]] and m["merged"] == [[0, [0, 2]]]
    mean = jax.tree.map(lambda *d: sum(d) / 2, *[sent["deltas"][c] for c in (0, 2)])
    expected = loop.apply_aggregate(state["params"], part, sent["block"], mean, fed.eta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), after["params"], expected)
    assert 0 not in after["pending"]  # nothing of round 0 is waiting any more, the NaN delta neither
    with pytest.raises(
        validate.UpdateRejected,
        match=r"^round 0: client 1's update rejected \(non-finite: NaN/Inf in the update\); comm.on_bad_update='stop'$",
    ):
        loop.run_round(trainer(validate.Policy(on_bad_update="stop")), state)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_norm_bounds_reject_a_scaled_update():
    honest = {c: {"w": np.full(4, 0.1 * (c + 1), np.float32)} for c in range(3)}  # norms 0.2, 0.4, 0.6
    scaled = {**honest, 3: {"w": np.full(4, 1e6, np.float32)}}
    assert validate.screen(honest, validate.Policy(max_norm_ratio=5.0)) == {}
    assert validate.screen(scaled, validate.Policy(max_norm_ratio=5.0)) == {
        3: "norm: 2e+06 > 5 x the round's median 0.4"
    }
    assert validate.screen(scaled, validate.Policy(max_delta_norm=0.5)) == {
        2: "norm: 0.6 > comm.max_delta_norm=0.5",
        3: "norm: 2e+06 > comm.max_delta_norm=0.5",
    }
    assert validate.screen({0: {"w": np.array([1.0, np.inf], np.float32)}}, validate.Policy()) == {
        0: "non-finite: NaN/Inf in the update"
    }


def test_config_errors():
    with pytest.raises(ValueError, match="staleness=0: ParaBlock needs staleness >= 1"):
        algorithms.configure(staleness=0)
    with pytest.raises(ValueError, match="algorithm='fedsgd'"):
        algorithms.configure(algorithm="fedsgd")
    with pytest.raises(ValueError, match="participation=0"):
        algorithms.configure(participation=0)
    with pytest.raises(ValueError, match="lr_decay='exp': choose one of none, linear, cosine"):
        algorithms.configure(lr_decay="exp")
    with pytest.raises(ValueError, match="lr_decay_alpha=2"):
        algorithms.configure(lr_decay_alpha=2)


def _live_bytes():
    gc.collect()
    return sum(x.nbytes for x in jax.live_arrays())


@pytest.mark.parametrize("staleness", [1, 2])
def test_simulator_memory_is_one_model_plus_pending_deltas(staleness, report):
    """(3) live device bytes grow with N only by the pending block deltas, not by model copies."""
    cfg = ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16
    )
    params = model.init(cfg, jax.random.key(0))
    part = blocks.partition(params, blocks.llm_block_rules(cfg.num_layers, 2))
    block_bytes = max(b.bytes for b in part.blocks)  # float32 params, float32 deltas
    optimizer = local.make_optimizer(local.OptimizerConfig(learning_rate=1e-3), 2)
    train = local.make_local_train(local.lm_loss(cfg), optimizer)  # shared: compile once
    live = {}
    for n in (2, 16):
        clients = data.synthetic_clients(n, 8, 16, cfg.vocab_size, seed=n)
        fed = algorithms.configure(rounds=3, num_clients=n, local_steps=2, staleness=staleness, schedule="sequential")
        trainer = loop.Trainer(fed, local.lm_loss(cfg), data.make_batches_fn(clients, 2), part, train)
        state = lean.init_state(fed, params)
        for _ in range(3):
            state, _ = loop.run_round(trainer, state)
        live[n] = _live_bytes()
        pending = sum(len(e["deltas"]) for e in state["pending"].values())
        assert pending == n * staleness
        del state, trainer
    bound = (16 - 2) * (staleness + 1) * block_bytes * 1.1
    growth = live[16] - live[2]
    report(
        f"memory s={staleness}: live bytes N=16 minus N=2 = {growth / 2**20:.2f} MiB, "
        f"bound (16-2)(s+1) x block x 1.1 = {bound / 2**20:.2f} MiB (block = {block_bytes / 2**20:.2f} MiB)"
    )
    assert growth <= bound
    assert growth >= (16 - 2) * staleness * block_bytes * 0.9  # the pending deltas really are held


def test_client_batch_auto():
    """sim.client_batch: a setting > 0 is kept; auto batches a round on one accelerator when the stacked
    models fit, and goes one by one on the CPU, under a mesh, or when they do not fit."""
    small = {"w": np.zeros((1024, 256), np.float32)}  # 1 MiB
    big = {"w": np.zeros((64, 1024, 1024), np.float32)}  # 256 MiB: 10 of them exceed 1 GiB
    assert loop.client_batch_size(3, small, 10, 1, "cpu") == 3
    assert loop.client_batch_size(0, small, 10, 1, "gpu") == 10
    assert loop.client_batch_size(0, small, 10, 1, "cpu") == 1
    assert loop.client_batch_size(0, small, 10, 8, "gpu") == 1
    assert loop.client_batch_size(0, big, 10, 1, "gpu") == 1
