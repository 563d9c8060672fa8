"""FedCyBGD (sequential cycle, each client its own block) against a NumPy sequential loop and the metrics' wire counts."""

import jax
import numpy as np
import optax
import pytest
from test_federated import BS, LR, RULES, K, numpy_sgd, toy_clients, toy_loss, toy_params

from jaxblock.fed import algorithms, blocks, data, loop

RULES_2_FROZEN_C = [("a/w", "A"), ("b/w", "B"), ("c/bias", None)]  # c frozen
RULES_2_ALL = [("a/w", "A"), ("b/w|c/bias", "B")]  # every leaf, in 2 blocks
# The leaves of each block, as (key, subkey), for the NumPy references.
LEAVES = {
    "frozen_c": [[("a", "w")], [("b", "w")]],
    "all": [[("a", "w")], [("b", "w"), ("c", "bias")]],
    "three": [[("a", "w")], [("b", "w")], [("c", "bias")]],
}


def _run(fed, rules, n_data=None):
    """The jaxblock simulator round by round: (state after each round, metrics, final state, partition)."""
    params = toy_params()
    part = algorithms.make(fed).partition(params, blocks.partition(params, rules))
    batches_fn = data.make_batches_fn(toy_clients(n_data or fed.num_clients), BS)
    trainer = loop.make_trainer(fed, toy_loss, batches_fn, part, optax.sgd(LR))
    state = trainer.init_state(params)
    states, history = [], []
    for _ in range(fed.rounds):
        state, m = loop.run_round(trainer, state)
        states.append(state)
        history.append(m)
    return states, history, loop.flush(trainer, state), part


def _f64(p):
    return {k: {kk: np.array(vv, np.float64) for kk, vv in v.items()} for k, v in p.items()}


@pytest.mark.parametrize("rules, leaves", [(RULES_2_FROZEN_C, "frozen_c"), (RULES_2_ALL, "all")])
def test_fedcybgd_equals_numpy_sequential_loop(rules, leaves):
    """Server params after every turn (and the final ones) equal a float64 NumPy loop: client t % 2 trains
    block (t % 2) % 2 for K SGD steps from the server model on its own batches, then the server block is replaced."""
    fed = algorithms.configure(algorithm="fedcybgd", rounds=6, num_clients=2, local_steps=K, seed=4)
    states, history, final, _ = _run(fed, rules)

    batches_fn = data.make_batches_fn(toy_clients(2), BS)
    server, positions = _f64(toy_params()), [0, 0]
    for t in range(fed.rounds):
        c = t % 2
        block = LEAVES[leaves][c % 2]
        batches, positions[c] = batches_fn(c, positions[c], K)
        local = numpy_sgd(server, batches, block, LR, K)
        for k1, k2 in block:  # the server's block is replaced by the client's
            server[k1][k2] = local[k1][k2].copy()
        assert history[t]["clients"] == [c] and history[t]["block"] == c % 2
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), states[t]["params"], server)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), final["params"], server)
    if leaves == "frozen_c":
        np.testing.assert_array_equal(final["params"]["c"]["bias"], toy_params()["c"]["bias"])
    assert not np.allclose(final["params"]["a"]["w"], toy_params()["a"]["w"])  # it trained


def test_one_cycle_touches_each_block_once_and_too_few_clients_is_an_error():
    """N = B = 3: turns 0..2 are clients 0, 1, 2 on blocks 0, 1, 2, and each turn changes exactly its
    block of the server model (every other leaf bitwise unchanged); N < B raises a one-line ValueError."""
    fed = algorithms.configure(algorithm="fedcybgd", rounds=6, num_clients=3, local_steps=K)
    states, history, _, part = _run(fed, RULES)
    assert [m["clients"] for m in history] == [[0], [1], [2], [0], [1], [2]]
    assert [m["block"] for m in history] == [0, 1, 2, 0, 1, 2]
    for cycle in (history[:3], history[3:]):
        assert sorted(m["block"] for m in cycle) == list(range(part.num_blocks))
    before = toy_params()
    for t, state in enumerate(states):
        after = state["params"]
        for b in range(part.num_blocks):
            old, new = jax.tree.leaves(part.block(before, b)), jax.tree.leaves(part.block(after, b))
            same = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(old, new, strict=True))
            assert same == (b != history[t]["block"]), f"turn {t}: block {b} changed={not same}"
        before = after

    params = toy_params()
    too_few = algorithms.configure(algorithm="fedcybgd", num_clients=2)
    with pytest.raises(ValueError, match=r"num_clients=2 < 3 blocks") as err:
        algorithms.make(too_few).partition(params, blocks.partition(params, RULES))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"num_clients=2 < 3 blocks"):  # the simulator's entry point too
        algorithms.make(too_few).partition(params, blocks.partition(params, RULES))


@pytest.mark.parametrize("num_clients, rules", [(3, RULES), (4, RULES_2_ALL)])
def test_params_down_counts_the_blocks_changed_since_the_clients_last_turn(num_clients, rules):
    """params_down = {client: values of the blocks whose server values differ between the end of the client's
    last turn (the start, in the first cycle) and the start of this turn}, found by comparing the params;
    params_up = [its block's values], bytes_down = 4 x params_down."""
    fed = algorithms.configure(algorithm="fedcybgd", rounds=2 * num_clients + 1, num_clients=num_clients, local_steps=K)
    states, history, _, part = _run(fed, rules)
    servers = [toy_params()] + [s["params"] for s in states]  # servers[t] = the model at the start of turn t
    sizes = [b.params for b in part.blocks]
    for t, m in enumerate(history):
        (c,) = m["clients"]
        seen = servers[t - num_clients + 1] if t >= num_clients else servers[0]  # what the client last held
        changed = [
            b
            for b in range(part.num_blocks)
            if not all(
                np.array_equal(np.asarray(x), np.asarray(y))
                for x, y in zip(
                    jax.tree.leaves(part.block(seen, b)), jax.tree.leaves(part.block(servers[t], b)), strict=True
                )
            )
        ]
        if 0 < t < num_clients:  # first cycle: every previous turn's block
            assert changed == sorted({m2["block"] for m2 in history[:t]})
        assert m["params_down"] == {c: sum(sizes[b] for b in changed)}, f"turn {t}, changed blocks {changed}"
        assert m["bytes_down"] == {str(c): 4 * sum(sizes[b] for b in changed)}
        assert m["params_up"] == [sizes[m["block"]]]
        assert m["bytes_up"] == [4 * sizes[m["block"]]]
    assert history[0]["params_down"] == {0: 0}
