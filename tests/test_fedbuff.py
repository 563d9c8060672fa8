"""FedBuff's event simulation against synchronous FedAvg, a hand-written event queue and hand-computed applies."""

import heapq
import math

import jax
import numpy as np
import optax
import pytest
from test_federated import BLOCK_KEY, BS, LR, RULES, toy_clients, toy_loss, toy_params

from jaxblock.fed import algorithms, blocks, data, loop, wire
from jaxblock.fed.algorithms import fedbuff
from jaxblock.run import checkpoint

NC, K = 4, 2
TOY_VALUES = 4 * 3 + 3 * 2 + 2  # every parameter of the toy model
# Per-client links (MB/s, ms): unequal, so that arrival times rarely tie.
LINKS = [wire.Link(100.0, 20.0), wire.Link(50.0, 5.0), wire.Link(100.0, 20.0), wire.Link(0.0, 1.0)]
ASYNC = {"buffer_size": 2, "client_slowdown": (1.0, 1.0, 1.5, 5.0), "step_seconds": 0.25}


def fed_config(**kw):
    return algorithms.configure(**{"algorithm": "fedbuff", "num_clients": NC, "local_steps": K, **kw})


def setup(fed, links=LINKS):
    params = toy_params()
    algorithm = fedbuff.FedBuff(fed)
    part = algorithm.partition(params, blocks.partition(params, RULES))
    batches_fn = data.make_batches_fn(toy_clients(fed.num_clients), BS)
    trainer = loop.make_trainer(fed, toy_loss, batches_fn, part, optax.sgd(LR), algorithm=algorithm)
    return trainer, fedbuff.init_state(fed, params, links)


def run(trainer, state, rounds, links=LINKS):
    """(final state, metrics of every round, the state before every round)."""
    history, states = [], []
    for _ in range(rounds):
        states.append(state)
        state, metrics = fedbuff.run_round(trainer, state, links)
        history.append(metrics)
    return state, history, states


def hand_fedbuff(fed, links, rounds):
    """FedBuff's event order written out: a heap of (time, 0 = arrival | 1 = pull, client).

    Returns per apply (clients, staleness, dropped since the previous apply, time)."""
    z, n = fed.options.buffer_size or fed.num_clients, fed.num_clients
    version, base, buffer, dropped, applies = 0, [0] * n, [], [], []
    events = [(0.0, 1, c) for c in range(n)]
    while len(applies) < rounds:
        now, kind, c = heapq.heappop(events)
        if kind == 1:  # pull: train on this version, arrive after download + compute + upload
            base[c] = version
            link = links[c]
            wire = link.latency_ms / 1e3 + (
                4 * TOY_VALUES / (link.bandwidth_mbps * 1e6) if link.bandwidth_mbps else 0.0
            )
            compute = fed.options.step_seconds * fed.local_steps * fed.options.client_slowdown[c]
            heapq.heappush(events, (now + wire + compute + wire, 0, c))
            continue
        heapq.heappush(events, (now, 1, c))  # it pulls again after every arrival at `now`
        tau = version - base[c]
        if fed.options.max_staleness and tau > fed.options.max_staleness:
            dropped.append(c)
            continue
        buffer.append((c, tau))
        if len(buffer) == z:
            applies.append(([b[0] for b in buffer], [b[1] for b in buffer], dropped, now))
            version, buffer, dropped = version + 1, [], []
    return applies


def through_checkpoint(state, fed, part, directory):
    """The state after a real orbax checkpoint round trip (checkpoint.save, then restore), and its meta."""
    mgr = checkpoint.manager(str(directory))
    checkpoint.save(mgr, state, fed, wall_s=0.0)
    mgr.wait_until_finished()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state["params"])
    restored, meta = checkpoint.restore(mgr, target, part)
    mgr.close()
    return restored, meta


@pytest.mark.parametrize("lr_decay", ["none", "cosine"])
def test_equal_speeds_and_full_buffer_is_fedavg_bitwise(lr_decay, report):
    """Z = N, equal speeds, a = 0: every client pulls v, all arrive together, one apply = FedAvg."""
    fed = fed_config(rounds=4, eta=0.7, lr_decay=lr_decay, staleness_weight=0.0)
    trainer, state = setup(fed, links=[wire.Link(100.0, 20.0)] * NC)
    final, history, _ = run(trainer, state, fed.rounds, links=[wire.Link(100.0, 20.0)] * NC)
    sync = algorithms.configure(
        algorithm="fedavg_full", rounds=fed.rounds, num_clients=NC, local_steps=K, eta=0.7, lr_decay=lr_decay
    )
    params = toy_params()
    ref, _ = loop.run(
        sync, params, toy_loss, data.make_batches_fn(toy_clients(NC), BS), blocks.partition(params, RULES),
        optax.sgd(LR),
    )  # fmt: skip
    assert [m["clients"] for m in history] == [list(range(NC))] * fed.rounds
    assert [m["staleness"] for m in history] == [[0] * NC] * fed.rounds
    assert all(m["loss"] is not None for m in history)  # every round trained
    jax.tree.map(np.testing.assert_array_equal, final["params"], ref["params"])
    np.testing.assert_array_equal(final["positions"], ref["positions"])
    report(f"fedbuff Z=N equal speeds a=0 ({lr_decay}): server params bitwise equal to fedavg_full after 4 rounds")


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_event_order_equals_a_hand_written_event_queue(max_staleness):
    """Slow clients: who is applied, with which staleness, what is dropped and when, as a heap says."""
    fed = fed_config(rounds=8, max_staleness=max_staleness, **ASYNC)
    trainer, state = setup(fed)
    _, history, _ = run(trainer, state, fed.rounds)
    expected = hand_fedbuff(fed, LINKS, fed.rounds)
    assert [m["clients"] for m in history] == [e[0] for e in expected]
    assert [m["staleness"] for m in history] == [e[1] for e in expected]
    assert [m["dropped"] for m in history] == [e[2] for e in expected]
    assert [m["modeled_time_s"] for m in history] == [e[3] for e in expected]
    taus = [tau for m in history for tau in m["staleness"]]
    if max_staleness:
        assert max(taus) <= 1 and any(m["dropped"] for m in history)
    else:
        assert max(taus) >= 2 and not any(m["dropped"] for m in history)
    slow = [row for m in history for row in m["modeled_rows"] if row["client"] == 3]
    assert slow and all(row["compute_s"] == 5 * 0.25 * K and row["bytes_up"] == 4 * TOY_VALUES for row in slow)


@pytest.mark.parametrize("fedbuff_blocks, speeds", [(False, ASYNC), (True, ASYNC), (False, {})])
def test_resume_from_a_checkpointed_state_is_bitwise(fedbuff_blocks, speeds, tmp_path):
    """Through a real checkpoint: with deltas in flight, and (equal speeds, Z = N) with none."""
    fed = fed_config(rounds=7, fedbuff_blocks=fedbuff_blocks, **speeds)
    links = LINKS if speeds else [wire.Link()] * NC
    trainer, state = setup(fed, links)
    full, history, _ = run(trainer, state, fed.rounds, links)
    half, _, _ = run(trainer, state, 3, links)
    assert bool(half["extra"]) == bool(speeds)  # in flight: ASYNC's deltas; equal speeds: nobody
    restored, _ = through_checkpoint(half, fed, trainer.partition, tmp_path)
    resumed, resumed_history, _ = run(trainer, restored, 4, links)
    jax.tree.map(np.testing.assert_array_equal, resumed["params"], full["params"])
    assert resumed["extra_meta"] == full["extra_meta"]
    drop = {"seconds", "client_compute_s"}  # real time
    strip = lambda m: {k: v for k, v in m.items() if k not in drop}  # noqa: E731
    assert [strip(m) for m in resumed_history] == [strip(m) for m in history[3:]]


def test_staleness_weight_of_one_apply_by_hand():
    """a = 0.5: params += eta / Z * sum_k delta_k / sqrt(1 + tau_k), for an apply with stale deltas."""
    fed = fed_config(rounds=8, eta=0.8, **ASYNC)
    trainer, state = setup(fed)
    _, history, states = run(trainer, state, fed.rounds)
    checked = 0
    for m, before, after in zip(history, states, [*states[1:], None], strict=True):
        inflight = before["extra"].get("inflight", {})
        from_before = len(set(m["clients"])) == len(m["clients"]) and all(f"c{c}" in inflight for c in m["clients"])
        if after is None or not from_before or max(m["staleness"]) == 0:
            continue  # want an apply of stale deltas that were all in flight before the round
        expected = jax.tree.map(lambda x: np.asarray(x, np.float64), before["params"])
        for c, tau in zip(m["clients"], m["staleness"], strict=True):
            w = 1 / math.sqrt(1 + tau)
            expected = jax.tree.map(lambda p, d, w=w: p + fed.eta * w / 2 * np.asarray(d), expected, inflight[f"c{c}"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), after["params"], expected)
        checked += 1
    assert checked >= 1


def test_block_updates_change_only_the_buffered_blocks():
    fed = fed_config(rounds=8, fedbuff_blocks=True, **ASYNC)
    trainer, state = setup(fed)
    assert trainer.partition.num_blocks == 3
    final, history, states = run(trainer, state, fed.rounds)
    for m, before, after in zip(history, states, [*states[1:], final], strict=True):
        for b, (k1, k2) in BLOCK_KEY.items():
            changed = not np.array_equal(after["params"][k1][k2], before["params"][k1][k2])
            assert changed == (b in m["blocks"]), (m["round"], b, m["blocks"])
        assert m["block"] == m["blocks"][0] and m["block_name"] == trainer.partition.blocks[m["block"]].name
        assert m["params_up"] == [trainer.partition.blocks[b].params for b in m["blocks"]]
    assert {b for m in history for b in m["blocks"]} == {0, 1, 2}
    assert any(len(set(m["blocks"])) > 1 for m in history)  # one apply into two blocks


def test_full_partition_and_config_errors():
    params = toy_params()
    layer = blocks.partition(params, RULES)
    assert fedbuff.FedBuff(fed_config()).partition(params, layer).num_blocks == 1
    assert fedbuff.FedBuff(fed_config(fedbuff_blocks=True)).partition(params, layer) is layer
    with pytest.raises(ValueError, match=r"client_slowdown=\(1.0, 0.0, 1.0, 1.0\): every value must be > 0"):
        fedbuff.FedBuff(fed_config(client_slowdown=(1.0, 0.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="got 3 links for num_clients=4"):
        fedbuff.init_state(fed_config(), params, LINKS[:3])
