"""Top-k compression with error feedback against the dense run, a NumPy densification and exact byte counts."""

import math

import jax
import numpy as np
import optax
import pytest
from test_federated import BS, LR, RULES, K, toy_clients, toy_loss, toy_params

from jaxblock.fed import algorithms, blocks, data, lean, loop, transforms, wire
from jaxblock.net import exchange as net_exchange
from jaxblock.net import transport

N = 3


def wide_params(hidden=10, seed=0):
    """The toy model with a hidden width of 10: leaves of 40 and 20 values, so that ceil(0.2 * size) is exact."""
    rng = np.random.RandomState(seed)
    return {
        "a": {"w": rng.randn(4, hidden).astype(np.float32) * 0.5},
        "b": {"w": rng.randn(hidden, 2).astype(np.float32) * 0.5},
        "c": {"bias": rng.randn(2).astype(np.float32) * 0.1},
    }


def _fed(algorithm, **kw):
    kw = {"rounds": 6, "num_clients": N, "local_steps": K, "eta": 0.7, "seed": 1, "schedule": "sequential", **kw}
    if algorithm == "parablock":
        kw.setdefault("staleness", 1)
    return algorithms.configure(algorithm=algorithm, **kw)


def _run(fed, params=None, rules=RULES, **trainer_kw):
    """loop.run, recording the server params after every round."""
    params, servers = toy_params() if params is None else params, []
    state, history = loop.run(
        fed, params, toy_loss, data.make_batches_fn(toy_clients(N), BS), blocks.partition(params, rules),
        optax.sgd(LR), on_round=lambda s, m: servers.append(s["params"]), **trainer_kw,
    )  # fmt: skip
    return state, history, servers


def _equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _add(total, tree):
    return tree if total is None else jax.tree.map(np.add, total, tree)


def _sparse_leaves(upload):
    return jax.tree.leaves(upload, is_leaf=lambda n: isinstance(n, dict) and set(n) == {"index", "value"})


def _densify(upload, like):
    """NumPy: the dense array of each sparse leaf (zeros where nothing was sent)."""

    def dense(sparse, x):
        out = np.zeros(np.size(x), np.float64)
        out[np.asarray(sparse["index"])] = np.asarray(sparse["value"], np.float64)
        return out.reshape(np.shape(x))

    return jax.tree.map(dense, upload, like, is_leaf=lambda n: isinstance(n, dict) and set(n) == {"index", "value"})


@pytest.mark.parametrize("algorithm, participation", [("parablock", 1.0), ("parablock", 0.5), ("fedbcd", 1.0)])
def test_ratio_one_equals_the_dense_run_bitwise(algorithm, participation):
    """compression='topk', topk_ratio=1.0: every round's server params and the final ones equal compression='none' bitwise."""
    dense = _run(_fed(algorithm, participation=participation, rounds=4))
    sparse = _run(_fed(algorithm, participation=participation, rounds=4, compression="topk", topk_ratio=1.0))
    for a, b in zip(dense[2], sparse[2], strict=True):
        _equal(a, b)
    _equal(dense[0]["params"], sparse[0]["params"])
    assert not np.allclose(dense[0]["params"]["a"]["w"], toy_params()["a"]["w"])  # it trained
    assert [m["block"] for m in dense[1]] == [m["block"] for m in sparse[1]]


def test_sent_plus_residual_is_every_raw_delta_and_k_per_leaf():
    """ParaBlock s=1, ratio 0.2: per (client, block), sum of the NumPy-densified uploads + the final residual =
    sum of the raw deltas; each leaf sends k = ceil(0.2 size) int32 indices, the top-k of delta + old residual;
    the client's own model keeps the whole raw delta; the flushed server = theta_0 + eta * mean of densified uploads."""
    fed = _fed("parablock", compression="topk", topk_ratio=0.2)
    params = toy_params()
    part = blocks.partition(params, RULES)
    trainer = loop.make_trainer(fed, toy_loss, data.make_batches_fn(toy_clients(N), BS), part, optax.sgd(LR))
    state = lean.init_state(fed, params)
    raw, sent, moved = {}, {}, {}  # (client, block) -> float64 sums; block -> eta * sum of mean densified uploads
    for _ in range(fed.rounds):
        old_residuals = state.get("extra", {}).get("residuals", {})
        state, m = loop.run_round(trainer, state)
        t, b = m["round"], m["block"]
        entry = state["pending"][t]  # staleness 1: still in flight
        dense_uploads = []
        for c in m["clients"]:
            delta, upload = entry["deltas"][c], entry["uploads"][c]
            old = old_residuals.get(f"c{c}", {}).get(f"b{b}")
            corrected = delta if old is None else jax.tree.map(lambda d, r: np.asarray(d) + np.asarray(r), delta, old)
            for x, u in zip(jax.tree.leaves(corrected), _sparse_leaves(upload), strict=True):
                x, index, value = np.asarray(x).reshape(-1), np.asarray(u["index"]), np.asarray(u["value"])
                assert index.dtype == np.int32 and value.dtype == np.float32
                assert index.shape == value.shape == (math.ceil(0.2 * x.size),)
                assert len(set(index.tolist())) == index.size
                np.testing.assert_array_equal(value, x[index])  # the values sent are the corrected delta's ...
                rest = np.delete(np.abs(x), index)
                assert rest.size == 0 or np.abs(value).min() >= rest.max()  # ... largest in magnitude
            dense = _densify(upload, delta)
            dense_uploads.append(dense)
            raw[c, b] = _add(raw.get((c, b)), jax.tree.map(lambda d: np.asarray(d, np.float64), delta))
            sent[c, b] = _add(sent.get((c, b)), dense)
            # the client's model: server + eta * its whole raw delta, not the sparse upload
            own = part.block(lean.client_params(state, part, c, fed.eta), b)
            server_b = part.block(state["params"], b)
            jax.tree.map(
                lambda o, s, d: np.testing.assert_allclose(o, s + fed.eta * d, atol=1e-6), own, server_b, delta
            )
        mean = jax.tree.map(lambda *d: fed.eta * np.mean(d, axis=0), *dense_uploads)
        moved[b] = _add(moved.get(b), mean)
    residuals = state["extra"]["residuals"]
    assert len(raw) == N * part.num_blocks  # every (client, block) trained twice: the residual carried over
    for (c, b), total in raw.items():
        residual = residuals[f"c{c}"][f"b{b}"]
        assert any(np.abs(np.asarray(r)).max() > 0 for r in jax.tree.leaves(residual))  # something was held back
        recon = jax.tree.map(lambda s, r: s + np.asarray(r, np.float64), sent[(c, b)], residual)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-6), recon, total)
    final = loop.flush(trainer, state)["params"]
    for b, step in moved.items():
        jax.tree.map(
            lambda x, x0, d: np.testing.assert_allclose(np.asarray(x, np.float64) - x0, d, atol=1e-6),
            part.block(final, b), part.block(params, b), step,
        )  # fmt: skip


def test_fedbcd_server_adds_the_mean_of_the_densified_uploads(monkeypatch):
    """FedBCD, ratio 0.2: each round the server's block moves by eta * mean of the NumPy-densified uploads (caught
    by wrapping transforms.compress) and every other block stays bitwise the same."""
    calls = []
    compress = transforms.compress

    def spy(delta, residual, ratio):
        upload, new_residual = compress(delta, residual, ratio)
        calls.append(upload)
        return upload, new_residual

    monkeypatch.setattr(transforms, "compress", spy)
    fed = _fed("fedbcd", compression="topk", topk_ratio=0.2, rounds=4)
    params = toy_params()
    part = blocks.partition(params, RULES)
    trainer = loop.make_trainer(fed, toy_loss, data.make_batches_fn(toy_clients(N), BS), part, optax.sgd(LR))
    state = lean.init_state(fed, params)
    for _ in range(fed.rounds):
        calls.clear()
        before = state["params"]
        state, m = loop.run_round(trainer, state)
        assert len(calls) == len(m["clients"]) == N
        b = m["block"]
        mean = jax.tree.map(lambda *d: np.mean(d, axis=0), *[_densify(u, part.block(params, b)) for u in calls])
        jax.tree.map(
            lambda x, y, d: np.testing.assert_allclose(np.asarray(y, np.float64) - x, fed.eta * d, atol=1e-6),
            part.block(before, b), part.block(state["params"], b), mean,
        )  # fmt: skip
        for other in set(range(part.num_blocks)) - {b}:
            _equal(part.block(before, other), part.block(state["params"], other))


def test_bytes_up_is_point_four_of_dense_at_ratio_point_two():
    """bytes_up per participant at ratio 0.2 = sum over leaves of ceil(0.2 size) * 8 (int32 + float32), which is
    0.4x (+-0.02) of the dense run's float32 bytes_up (4 bytes a value) for the wide toy."""
    params, rules = wide_params(), [("a/w", "A"), ("b/w", "B"), ("c/bias", None)]
    for algorithm in ("parablock", "fedbcd"):
        dense = _run(_fed(algorithm, rounds=3), params, rules)[1]
        sparse = _run(_fed(algorithm, rounds=3, compression="topk", topk_ratio=0.2), params, rules)[1]
        for d, s in zip(dense, sparse, strict=True):
            assert d["block"] == s["block"] and d["clients"] == s["clients"]
            size = {0: 40, 1: 20}[d["block"]]
            assert d["bytes_up"] == [4 * size] * len(d["clients"])
            assert s["bytes_up"] == [8 * math.ceil(0.2 * size)] * len(s["clients"])
            for db, sb in zip(d["bytes_up"], s["bytes_up"], strict=True):
                assert abs(sb / db - 0.4) <= 0.02


def test_bytes_up_counts_every_leaf_exactly_with_ceil():
    """On the 3-leaf toy (12, 6 and 2 values), a block's upload is sum of ceil(0.2 size) * 8 bytes, not 0.4x."""
    sparse = _run(_fed("fedbcd", rounds=3, compression="topk", topk_ratio=0.2))[1]
    sizes = {0: [12], 1: [6], 2: [2]}
    for m in sparse:
        assert m["bytes_up"] == [sum(8 * math.ceil(0.2 * n) for n in sizes[m["block"]])] * N


class _CountingStore(transport.Store):
    """A Store that counts what is published under each kind of key (client uploads, aggregates)."""

    def __init__(self, url):
        super().__init__(url)
        self.published = {"client": 0, "aggregate": 0}

    def publish(self, prefix, tree, wire_dtype="float32"):
        self.published[prefix.split("/")[2]] += 1
        return super().publish(prefix, tree, wire_dtype)


def test_sparse_upload_crosses_a_store_and_a_store_run_equals_the_memory_run():
    """A top-k upload published to Store('memory://') is fetched with int32 indices and equal values (and the
    bytes publish reports = payload_bytes); a ParaBlock/FedBCD run at 0.2 through the store equals the in-memory run bitwise."""
    delta = jax.tree.map(lambda x: x * 0.01, toy_params(seed=5))
    upload, _ = transforms.compress(delta, None, 0.2)
    store = transport.Store("memory://")
    nbytes = store.publish("round/0/client/1", jax.device_get(upload))
    fetched, fetched_bytes = store.wait_fetch("round/0/client/1", 5.0, "test upload")
    assert nbytes == fetched_bytes == wire.payload_bytes(upload, "float32") == 8 * (3 + 2 + 1)
    assert jax.tree.structure(fetched) == jax.tree.structure(jax.device_get(upload))
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(upload)[0], jax.tree.leaves(fetched), strict=True):
        want = np.int32 if path[-1].key == "index" else np.float32
        assert y.dtype == want, (path, y.dtype)
        np.testing.assert_array_equal(y, np.asarray(x))

    for algorithm in ("parablock", "fedbcd"):
        fed = _fed(algorithm, rounds=4, compression="topk", topk_ratio=0.2)
        memory = _run(fed)
        store = _CountingStore("memory://")
        stored = _run(fed, exchange=net_exchange.ThroughStore(store, fed.wire_dtype))
        assert store.published == {"client": fed.rounds * N, "aggregate": fed.rounds}  # it went through the store
        for a, b in zip(memory[2], stored[2], strict=True):
            _equal(a, b)
        _equal(memory[0]["params"], stored[0]["params"])
        _equal(memory[0]["extra"]["residuals"], stored[0]["extra"]["residuals"])
        assert [m["bytes_up"] for m in memory[1]] == [m["bytes_up"] for m in stored[1]]
