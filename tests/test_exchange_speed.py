"""What the exchange path's shortcuts (scripts/bench_exchange.py measures them) must not change: a
published tree is the caller's values, never an alias of them; arrays read back are aligned for XLA
and writable; a signed bfloat16 upload verifies; the norm and finiteness checks give the answers
(and the norm the bits) of the one-pass check they replace."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxblock.fed import transforms, validate
from jaxblock.net import receive, signing, transport

SIGNED = {"kind": "delta", "round": 0, "block": 0, "client": 0}


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):
    return transport.Store("memory://" if request.param == "memory" else f"file://{tmp_path}/store")


def _tree():
    rng = np.random.default_rng(0)
    return {"layers_0": {"q": rng.standard_normal((3, 40), np.float32), "n": np.arange(5, dtype=np.float32)}}


def test_a_published_tree_does_not_follow_later_changes_to_the_callers_arrays(store):
    tree = _tree()
    want = jax.tree.map(np.copy, tree)
    store.publish("round/0/client/0", tree)
    tree["layers_0"]["q"][:] = np.nan  # the caller reuses its buffer after publish returned
    back, _ = store.wait_fetch("round/0/client/0", 1.0, "test")
    jax.tree.map(np.testing.assert_array_equal, back, want)


def test_arrays_read_back_are_aligned_writable_and_one_raw_chunk(store):
    store.publish("round/0/client/0", _tree())
    back, _ = store.wait_fetch("round/0/client/0", 1.0, "test")
    for x in jax.tree.leaves(back):
        assert x.ctypes.data % 64 == 0 and x.flags.writeable and x.flags.c_contiguous
    meta = json.loads(store.kv.read("round/0/client/0/layers_0/q/zarr.json").result().value)
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [3, 40]
    assert meta["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}]


def test_a_signed_bfloat16_upload_verifies_and_a_changed_byte_does_not(store, tmp_path):
    signing.make_keys(str(tmp_path / "keys"), 1)
    client, server = (signing.Keys(str(tmp_path / "keys" / p)) for p in ("client_0", "server"))
    tree = _tree()
    store.publish("round/0/client/0", tree, "bfloat16", seal=lambda m: client.seal({**m, **SIGNED}))
    manifest = store.get_json("round/0/client/0/COMMIT")
    expected = transforms.wire_leaves((), jax.eval_shape(lambda: tree), "bfloat16")
    verify = lambda m: server.check(m, "client_0", SIGNED)  # noqa: E731
    back = receive.read_checked(store, "round/0/client/0", manifest, expected, 10**6, verify)
    want = tree["layers_0"]["q"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(back["layers_0"]["q"], want)
    changed = dict(tree, layers_0={**tree["layers_0"], "n": tree["layers_0"]["n"] + 1})
    store.publish("round/0/client/0", changed, "bfloat16")  # new arrays under the old signed manifest
    store.put_json("round/0/client/0/COMMIT", manifest)
    with pytest.raises(validate.BadUpdate, match="^forged: "):
        receive.read_checked(store, "round/0/client/0", manifest, expected, 10**6, verify)


@jax.jit
def _one_pass(leaves):  # the check _finite_and_norm replaced
    finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))
    return finite, jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf, 3e38])  # 3e38: finite, its square is not
def test_finite_and_norm_answer_as_the_one_pass_check(bad):
    rng = np.random.default_rng(1)
    leaves = [rng.standard_normal((17, 9), np.float32), rng.standard_normal(31).astype(ml_dtypes.bfloat16)]
    if bad is not None:
        leaves[0][4, 2] = bad
    finite, norm = validate._finite_and_norm(leaves)
    want_finite, want_norm = _one_pass(leaves)
    assert finite == bool(want_finite) == (bad is None or bad == 3e38)
    assert np.asarray(norm).tobytes() == np.asarray(want_norm).tobytes() or np.isnan(norm) and np.isnan(want_norm)
