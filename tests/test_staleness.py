"""Per-client staleness against scalar staleness (bitwise) and a NumPy reference with explicit client copies."""

import jax
import numpy as np
import optax
import pytest
from test_federated import BLOCK_KEY, BS, LR, RULES, K, numpy_sgd, run_core, toy_clients, toy_loss, toy_params

from jaxblock.fed import algorithms, blocks, data, lean, loop


def _equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _close(a, b, tol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float64), y, atol=tol, rtol=tol), a, b)


@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize("participation", [1.0, 0.5])
def test_uniform_tuple_staleness_equals_scalar_bitwise(s, participation):
    """staleness=(s,)*N and staleness=s: every round's server and client models and the flushed model are bitwise equal."""
    n, params, clients = 4, toy_params(), toy_clients(4)
    runs = {}
    for staleness in (s, (s,) * n):
        fed = algorithms.configure(
            rounds=6, num_clients=n, local_steps=K, eta=0.7, staleness=staleness, participation=participation, seed=3
        )
        runs[type(staleness)] = run_core(fed, params, clients)
    (servers_a, clients_a, final_a, sched_a, parts_a, *_), (servers_b, clients_b, final_b, sched_b, parts_b, *_) = (
        runs[int],
        runs[tuple],
    )
    assert sched_a == sched_b and parts_a == parts_b
    if participation < 1:
        assert {len(p) for p in parts_a} == {2}
    for t in range(6):
        _equal(servers_a[t], servers_b[t])
        for i in range(n):
            _equal(clients_a[t][i], clients_b[t][i])
    _equal(final_a["params"], final_b["params"])
    assert not np.allclose(final_a["params"]["a"]["w"], params["a"]["w"])  # it trained


def numpy_per_client_staleness(fed, theta0, batches_fn, schedule, participants_of):
    """ParaBlock with client i's delta of round r merged at the end of round r + s_i, float64, local SGD, and an
    explicit full model per client. Each merge: weight 1/M_r times (1 + tau_i)^-a, tau_i = s_i - min s; every client
    adds eta * the merged sum to its copy and a merged client also takes off its own delta; a delta with
    tau > max_staleness (> 0) is dropped: only its own client takes it off. After the last round the rest arrives
    in the rounds T, T+1, ... with no training.

    Returns, after every round and after the flush: server models, client models and the pending {(r, i): delta}.
    """
    s, eta, n = fed.stalenesses, fed.eta, fed.num_clients
    a = fed.options.staleness_weight or 0.0
    cp = lambda p: {k: {kk: np.array(vv, np.float64) for kk, vv in v.items()} for k, v in p.items()}  # noqa: E731
    server = cp(theta0)
    models = [cp(theta0) for _ in range(n)]
    positions = [0] * n
    pending = {}  # (r, i) -> Delta_r^i, uploaded, not yet merged nor dropped
    out = []

    def end_of_round(t):
        for r in sorted({r for r, _ in pending}):
            arrived = sorted(i for rr, i in pending if rr == r and r + s[i] <= t)
            k1, k2 = BLOCK_KEY[schedule[r]]
            total = 0.0
            for i in arrived:
                tau = s[i] - min(s)
                delta = pending.pop((r, i))
                models[i][k1][k2] -= eta * delta  # its own delta leaves its copy: merged or dropped
                if fed.options.max_staleness and tau > fed.options.max_staleness:
                    continue
                total = total + (1 / len(participants_of[r])) * (1 + tau) ** -a * delta
            server[k1][k2] += eta * total
            for j in range(n):
                models[j][k1][k2] += eta * total

    def record():
        out.append((cp(server), [cp(m) for m in models], {key: d.copy() for key, d in pending.items()}))

    for t in range(fed.rounds):
        k1, k2 = BLOCK_KEY[schedule[t]]
        for i in participants_of[t]:
            batches, positions[i] = batches_fn(i, positions[i], fed.local_steps)
            local = numpy_sgd(models[i], batches, [(k1, k2)], LR, fed.local_steps)
            pending[(t, i)] = local[k1][k2] - models[i][k1][k2]
            models[i][k1][k2] += eta * pending[(t, i)]
        end_of_round(t)
        record()
    t = fed.rounds
    while pending:
        end_of_round(t)
        t += 1
    record()
    return out


def _run_recording(fed, n):
    """The jaxblock simulator: after every round and after the flush, (server, client_params of each client, state)."""
    params = toy_params()
    part = blocks.partition(params, RULES)
    batches_fn = data.make_batches_fn(toy_clients(n), BS)
    trainer = loop.make_trainer(fed, toy_loss, batches_fn, part, optax.sgd(LR))
    state = lean.init_state(fed, params)
    out, history = [], []
    for _ in range(fed.rounds):
        state, m = loop.run_round(trainer, state)
        history.append(m)
        out.append((state["params"], [lean.client_params(state, part, i, fed.eta) for i in range(n)], state))
    state = loop.flush(trainer, state)
    out.append((state["params"], [lean.client_params(state, part, i, fed.eta) for i in range(n)], state))
    return out, history, part, batches_fn


CASES = {  # (staleness_weight, max_staleness, participation)
    "plain": (None, 0, 1.0),
    "weighted": (0.5, 0, 1.0),
    "dropped": (None, 1, 1.0),
    "sampled": (None, 0, 0.5),
    "weighted_sampled_tau_at_max": (0.5, 2, 0.5),
}


@pytest.mark.parametrize("case", CASES)
def test_one_slow_client_matches_numpy_copies(case):
    """N=3, staleness (1, 1, 3): server params and every client's model (client_params) after every round and after
    the flush equal the NumPy reference with explicit client copies, to 1e-6; metrics' merged/dropped agree with it."""
    weight, max_staleness, participation = CASES[case]
    n = 3
    fed = algorithms.configure(
        rounds=7, num_clients=n, local_steps=K, eta=0.7, staleness=(1, 1, 3), staleness_weight=weight,
        max_staleness=max_staleness, participation=participation, seed=2,
    )  # fmt: skip
    got, history, _, batches_fn = _run_recording(fed, n)
    schedule, parts = [m["block"] for m in history], [m["clients"] for m in history]
    ref = numpy_per_client_staleness(fed, toy_params(), batches_fn, schedule, parts)
    for t, ((server, models, _), (ref_server, ref_models, _)) in enumerate(zip(got, ref, strict=True)):
        _close(server, ref_server)
        for i in range(n):
            try:
                _close(models[i], ref_models[i])
            except AssertionError as e:
                raise AssertionError(f"after round {t}: client {i}'s model") from e
    _close(got[-1][1][2], ref[-1][0])  # after the flush, the slow client holds the server model

    slow_rounds = [r for r, p in enumerate(parts) if 2 in p]
    merged = [(r, c) for m in history for r, cs in m["merged"] for c in cs]
    dropped = [tuple(x) for m in history for x in m["dropped"]]
    if case == "dropped":  # tau = 2 > 1: every one of the slow client's deltas that arrives is dropped
        assert dropped == [(r, 2) for r in slow_rounds if r + 3 < fed.rounds] and all(c != 2 for _, c in merged)
        _close(got[-1][0], ref[-1][0])
    else:
        assert dropped == [] and {(r, 2) for r in slow_rounds if r + 3 < fed.rounds} <= set(merged)
        for m in history:  # a round's merge of the slow client's delta happens 3 rounds late
            assert all(m["round"] - r == (3 if c == 2 else 1) for r, cs in m["merged"] for c in cs)


@pytest.mark.parametrize("staleness, max_staleness", [((1, 1, 3), 0), ((1, 2, 3), 1), ((2, 1, 1), 0)])
def test_lean_form_equals_the_explicit_client_copies(staleness, max_staleness):
    """After every round, for each client: (its NumPy explicit copy - the NumPy server) = eta * the sum of the deltas
    that jaxblock's state holds as its pending ones (each on its round's block), and these are the reference's pending
    (round, client) set; client_params(state) - state params agrees too."""
    n = 3
    fed = algorithms.configure(
        rounds=6, num_clients=n, local_steps=K, eta=0.7, staleness=staleness, max_staleness=max_staleness, seed=7
    )
    got, history, part, batches_fn = _run_recording(fed, n)
    schedule, parts = [m["block"] for m in history], [m["clients"] for m in history]
    ref = numpy_per_client_staleness(fed, toy_params(), batches_fn, schedule, parts)
    for t, ((server, models, state), (ref_server, ref_models, ref_pending)) in enumerate(zip(got, ref, strict=True)):
        held = {(r, c) for r, e in state["pending"].items() for c in e["deltas"]}
        assert held == set(ref_pending), f"after round {t}"
        for i in range(n):
            lean = {k: {kk: np.zeros(np.shape(v)) for kk, v in d.items()} for k, d in toy_params().items()}
            for e in state["pending"].values():
                if i in e["deltas"]:
                    k1, k2 = BLOCK_KEY[e["block"]]
                    lean[k1][k2] += fed.eta * np.asarray(e["deltas"][i][k1][k2], np.float64)
            explicit = jax.tree.map(np.subtract, ref_models[i], ref_server)
            _close(lean, explicit)
            _close(
                jax.tree.map(lambda c, s: np.asarray(c, np.float64) - np.asarray(s, np.float64), models[i], server),
                explicit,
            )
    assert any(ref_pending for _, _, ref_pending in ref[:-1]) and not ref[-1][2]


def test_per_client_staleness_config_errors():
    """A tuple of the wrong length, a tuple outside ParaBlock and an s_i of 0 are one-line ValueErrors."""
    with pytest.raises(ValueError, match="staleness lists 2 values for num_clients=3"):
        algorithms.configure(num_clients=3, staleness=(1, 2))
    with pytest.raises(
        ValueError, match=r"staleness=\[1, 2\]: a setting of parablock, which algorithm='fedbcd' does not use"
    ):
        algorithms.configure(algorithm="fedbcd", num_clients=2, staleness=(1, 2))
    with pytest.raises(ValueError, match="ParaBlock needs staleness >= 1"):
        algorithms.configure(num_clients=2, staleness=(0, 1))
    assert algorithms.configure(num_clients=3, staleness=(1, 1, 3)).effective_staleness == 3
