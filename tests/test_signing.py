"""Ed25519 keys and signatures (jaxblock/signing.py), and the server rejecting forged, replayed and
malformed uploads: the final model equals a run in which that client sent nothing."""

import os
import stat
import subprocess
import sys
import threading

import jax
import numpy as np
import optax
import pytest
from test_federated import BS, RULES, toy_clients, toy_loss, toy_params
from test_train import ROOT

from jaxblock.fed import algorithms, blocks, data, local, transforms, validate
from jaxblock.net import comm, receive, signing, transport


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    signing.make_keys(str(root), 3)
    return root


def test_keys_layout_and_private_files(keys):
    assert sorted(os.listdir(keys / "server")) == ["client_0.pub", "client_1.pub", "client_2.pub", "server.key"]
    assert sorted(os.listdir(keys / "client_1")) == ["client_0.pub", "client_1.key", "client_2.pub", "server.pub"]
    assert stat.S_IMODE(os.stat(keys / "client_1" / "client_1.key").st_mode) == 0o600
    with pytest.raises(ValueError, match="exists: keys are never overwritten"):
        signing.make_keys(str(keys), 3)


def test_a_signature_binds_signer_round_and_fields(keys):
    server, c1, c2 = (signing.Keys(str(keys / p)) for p in ("server", "client_1", "client_2"))
    doc = c1.seal({"kind": "delta", "round": 4, "block": 2, "client": 1})
    assert server.check(doc, "client_1", {"kind": "delta", "round": 4, "block": 2, "client": 1}) == doc

    def reason(d, signer="client_1", expect=None):
        with pytest.raises(signing.BadSignature) as e:
            server.check(d, signer, expect or {"kind": "delta", "round": 4, "block": 2, "client": 1})
        return str(e.value)

    assert reason({"kind": "delta", "round": 4}) == "unsigned: no signature where client_1 must sign"
    assert reason(c2.seal({"kind": "delta", "round": 4, "block": 2, "client": 1})) == (
        "forged: signed as 'client_2', expected client_1"
    )
    assert reason({**c2.seal({"round": 4}), "signer": "client_1"}) == "forged: the signature is not client_1's"
    assert reason({**doc, "block": 3}) == "forged: the signature is not client_1's"  # a field changed after signing
    assert reason(doc, expect={"kind": "delta", "round": 5}) == "replayed: signed for round=4, expected 5"
    assert reason(doc, signer="server") == "forged: signed as 'client_1', expected server"


def test_arrays_changed_after_signing_are_rejected(keys):
    server, c0 = signing.Keys(str(keys / "server")), signing.Keys(str(keys / "client_0"))
    store = transport.Store("memory://")
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    signed = {"kind": "delta", "round": 0, "block": 0, "client": 0}
    store.publish("round/0/client/0", tree, seal=lambda m: c0.seal({**m, **signed}))
    expected = transforms.wire_leaves((), jax.eval_shape(lambda: tree), "float32")
    manifest = store.get_json("round/0/client/0/COMMIT")
    verify = lambda m: server.check(m, "client_0", signed)  # noqa: E731
    back = receive.read_checked(store, "round/0/client/0", manifest, expected, 24, verify)
    np.testing.assert_array_equal(back["w"], tree["w"])
    store.publish("round/0/client/0", {"w": tree["w"] + 1})  # new arrays under the old signed manifest
    store.put_json("round/0/client/0/COMMIT", manifest)
    with pytest.raises(validate.BadUpdate, match="^forged: the arrays are not the ones signed$"):
        receive.read_checked(store, "round/0/client/0", manifest, expected, 24, verify)


def _attacker(store_url, context, keys, fed, part, params, stop):
    """Writes into client 2's slot every round: unsigned, signed by client 1, NaN (client 2's own key),
    a wrong shape, a huge norm, and a replay of its round-2 upload; each must be rejected."""
    store = transport.Store(store_url, context)
    c1, c2 = signing.Keys(str(keys / "client_1")), signing.Keys(str(keys / "client_2"))
    # It holds client 2's key, so it can join as client 2 (a never-joined client's slot is not read at all)
    store.put_json(transport.ready_key(2), c2.seal({"kind": "ready", "client": 2}))
    for t in range(fed.rounds):
        plan = store.wait_json(transport.plan_key(t), 30, "plan")
        if stop.is_set():
            return
        b = plan["block"]
        shapes = jax.eval_shape(lambda b=b: part.block(params, b))
        good = jax.tree.map(lambda s: np.full(s.shape, 1e-3, np.float32), shapes)
        signed = {"kind": "delta", "round": t, "block": b, "client": 2}
        prefix = transport.delta_prefix(t, 2)
        kind = t % 6
        if kind == 5:  # round 2's upload (client 2's own signature), arrays and manifest re-committed
            old = transport.delta_prefix(2, 2)
            manifest = store.get_json(f"{old}/COMMIT")
            store.publish(prefix, store.fetch(old, manifest)[0])
            store.put_json(f"{prefix}/COMMIT", manifest)
        elif kind == 0:
            store.publish(prefix, good)
        elif kind == 1:
            store.publish(prefix, good, seal=lambda m, s=signed: c1.seal({**m, **s}))
        elif kind == 2:
            bad = jax.tree.map(lambda x: np.full_like(x, np.nan), good)
            store.publish(prefix, bad, seal=lambda m, s=signed: c2.seal({**m, **s}))
        elif kind == 3:
            bad = jax.tree.map(lambda x: np.ones((1, 5), np.float32), good)
            store.publish(prefix, bad, seal=lambda m, s=signed: c2.seal({**m, **s}))
        else:
            bad = jax.tree.map(lambda x: x * 1e9, good)
            store.publish(prefix, bad, seal=lambda m, s=signed: c2.seal({**m, **s}))


def test_forged_and_bad_uploads_are_rejected_and_change_nothing(keys, report):
    params, clients = toy_params(), toy_clients(3)
    part = blocks.partition(params, RULES)
    fed = algorithms.configure(rounds=6, num_clients=3, local_steps=2)
    train, batches = local.make_local_train(toy_loss, optax.sgd(0.1)), data.make_batches_fn(clients, BS)
    policy = validate.Policy(max_norm_ratio=100.0)

    def run(attack: bool):
        store, merges, stop = transport.Store("memory://"), [], threading.Event()
        cc = comm.CommConfig(timeout_s=1.0, keys=str(keys))
        attacker = threading.Thread(target=_attacker, args=(store.url, store.context, keys, fed, part, params, stop))
        if attack:
            attacker.start()
        server, replicas = comm.run_in_threads(
            fed, params, part, train, batches, store, cc, clients=[0, 1], policy=policy, on_merge=merges.append
        )
        stop.set()
        if attack:
            attacker.join()
        return server, replicas, merges

    attacked, replicas, merges = run(attack=True)
    silent, _, _ = run(attack=False)
    reasons = {r: why.split(":")[0] for m in merges for r, c, why in m["left_out"] if c == 2}
    report(f"client 2's slot, rounds 0-5: {', '.join(reasons[r] for r in sorted(reasons))}")
    assert reasons == {0: "unsigned", 1: "forged", 2: "non-finite", 3: "shape", 4: "norm", 5: "replayed"}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(attacked), jax.device_get(silent))
    for replica in replicas.values():
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(replica), jax.device_get(attacked))


def test_keys_script_makes_the_directories(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "keys.py"), "--clients", "2", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == [
        str(tmp_path / p) for p in ("server", "client_0", "client_1")
    ]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and again.stderr.strip().endswith(
        "exists: keys are never overwritten (remove it or choose another --out)"
    )


def test_a_forged_server_error_stops_no_signed_client(keys):
    store = transport.Store("memory://")
    store.party_keys = signing.Keys(str(keys / "client_0"))
    store.put_json("server/error", {"kind": "error", "message": "forged: stop"})
    with pytest.raises(transport.TransportTimeout):  # it waited on, and named what it waited for
        store.wait_json("round/0/plan", 0.6, "round 0: no plan from the server")
    store.put_json("server/error", signing.Keys(str(keys / "server")).seal({"kind": "error", "message": "disk full"}))
    with pytest.raises(RuntimeError, match="^the server stopped: disk full$"):
        store.wait_json("round/0/plan", 5, "round 0: no plan from the server")


def test_garbage_in_the_store_is_rejected_never_read_as_an_update(tmp_path):
    """A COMMIT whose arrays were never written (or half written), or one that is not a manifest."""
    store = transport.Store(f"file://{tmp_path}/store")
    tree = {"w": np.ones((4, 3), np.float32)}
    expected = transforms.wire_leaves((), jax.eval_shape(lambda: tree), "float32")
    store.publish("round/0/client/0", tree)
    manifest = store.get_json("round/0/client/0/COMMIT")
    store.put_json("round/0/client/1/COMMIT", manifest)  # a marker with no arrays behind it
    with pytest.raises(validate.BadUpdate, match="^garbage: unreadable array"):
        receive.read_checked(store, "round/0/client/1", manifest, expected, 48)
    for f in (tmp_path / "store" / "round" / "0" / "client" / "0" / "w").rglob("*"):
        if f.is_file() and f.name != "zarr.json":
            f.write_bytes(f.read_bytes()[:5])  # a chunk cut short, as by a writer that died
    with pytest.raises(validate.BadUpdate, match="^garbage: unreadable array"):
        receive.read_checked(store, "round/0/client/0", manifest, expected, 48)
    for bad in (None, [], {"leaves": "x"}, {"leaves": [["w", [4, 3], "float32"]]}):
        with pytest.raises(validate.BadUpdate, match="^garbage: unreadable manifest"):
            receive.check_manifest(bad, expected, 48)
