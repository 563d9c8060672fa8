"""Secure aggregation in the deployment (issue 29): the protocol through a store (`net/secure.py`),
its dropouts and refusals, and whole runs equal to the simulator's secure-aggregation run."""

import dataclasses
import threading

import jax
import numpy as np
import optax
import pytest
from scipy import stats
from test_comm import run_threads
from test_federated import BS, RULES, toy_clients, toy_loss, toy_params

from jaxblock.fed import algorithms, blocks, data, local, loop
from jaxblock.fed import secagg as sa
from jaxblock.net import comm, secure, signing, transport
from jaxblock.net.protocol import CommConfig


def _fed(algorithm: str, **extra):
    transform = sa.SecureAggregation(clip_norm=2.0, clients_per_round=4, seed=7, **extra)
    fed = algorithms.configure(algorithm=algorithm, rounds=4, num_clients=4, local_steps=2, seed=4)
    return dataclasses.replace(fed, transforms=(transform,))


@pytest.mark.parametrize("algorithm, neighbors, signed", [("parablock", 0, True), ("fedbcd", 2, False)])
def test_the_deployment_with_secure_aggregation_equals_the_simulator_bitwise(algorithm, neighbors, signed, tmp_path):
    """Server + 4 client threads through a file:// store (signed: every message, the protocol's too,
    signed and checked by its readers, clients checking each other's); with keep_rounds, every upload
    the store ever held is checked: uniform bytes (a quantized update is not: it sits mid-range)."""
    fed = _fed(algorithm, neighbors=neighbors)
    params, clients = toy_params(), toy_clients(4)
    part, optimizer = blocks.partition(params, RULES), optax.adamw(0.05, eps=1e-6)
    store = transport.Store(f"file://{tmp_path}/store")
    if signed:
        signing.make_keys(str(tmp_path / "keys"), 4)
        cc = CommConfig(timeout_s=120.0, keep_rounds=True, keys=str(tmp_path / "keys"))  # nobody is left out
        train = local.make_local_train(toy_loss, optimizer)
        server, replicas = comm.run_in_threads(fed, params, part, train, data.make_batches_fn(clients, BS), store, cc)
        assert store.get_json(secure.key(0, "keys/1"))["signer"] == "client_1"
    else:
        server, replicas, _ = run_threads(fed, params, clients, part, optimizer, 120.0, store=store, keep_rounds=True)
    simulated, _ = loop.run(fed, params, toy_loss, data.make_batches_fn(clients, BS), part, optimizer)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(server), jax.device_get(simulated["params"]))
    for replica in replicas.values():
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(replica), jax.device_get(server))
    uploads = 0
    for r in range(fed.rounds):
        for c in range(4):
            q, _ = store.fetch(transport.delta_prefix(r, c), store.get_json(f"{transport.delta_prefix(r, c)}/COMMIT"))
            counts = np.bincount(q["q"].view(np.uint8), minlength=256)
            assert stats.chisquare(counts).pvalue > 1e-4, (r, c)  # masked: uniform bytes
            uploads += 1
    assert uploads == 16
    assert store.get_json(secure.key(0, "ask"))["survivors"] == [0, 1, 2, 3]


def _round(store, transform, comm, drop_before_upload=(), drop_before_answer=(), ask=None):
    """One protocol round of `transform.clients_per_round` clients through `store`, the server's
    unmasking in a thread: (its result or exception, {client: quantized input})."""
    parties = list(range(transform.clients_per_round))
    rng = np.random.default_rng(0)
    inputs = {c: sa.quantize(rng.normal(0, 0.3, 1000), 2.0, len(parties), 32, rng) for c in parties}
    server = secure.ServerSide(store, None, transform, comm)
    sides = {c: secure.ClientSide(store, None, transform, comm, c) for c in parties}
    for c in parties:
        sides[c].start(0, parties)
    server.agree(0, parties)
    masked = {}
    for c in parties:
        if c not in drop_before_upload:
            masked[c] = sides[c].masked(0, {"q": inputs[c]})["q"]
            if c not in drop_before_answer:
                sides[c].answer_later(0)
    if ask is not None:  # a forged request, written where the server's would go
        store.put_json(secure.key(0, "ask"), {"kind": "secagg_ask", "round": 0, "survivors": sorted(masked),
                                              "requests": ask})  # fmt: skip
    out = {}
    thread = threading.Thread(target=lambda: out.update(result=_try(server.unmask, 0, masked)))
    thread.start()
    thread.join(30)
    for side in sides.values():
        side.close()
    return out["result"], inputs


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e


def test_dropouts_after_key_agreement_and_after_upload_are_recovered_through_the_store():
    transform = sa.SecureAggregation(clip_norm=2.0, clients_per_round=5)  # t = 3 of 5
    comm = CommConfig(timeout_s=1.0, server_timeout_s=30.0)
    (total, survivors), inputs = _round(transport.Store("memory://"), transform, comm,
                                        drop_before_upload=[3], drop_before_answer=[2])  # fmt: skip
    assert survivors == [0, 1, 2, 4]  # 2 uploaded (its self-mask comes back from the others' shares), 3 did not
    np.testing.assert_array_equal(total, sa.add([inputs[c] for c in survivors], 32))


def test_below_the_threshold_the_round_ends_with_its_line():
    transform = sa.SecureAggregation(clip_norm=2.0, clients_per_round=4)  # t = 3 of 4
    comm = CommConfig(timeout_s=0.5, server_timeout_s=2.0)  # the clients stop waiting for an ask that never comes
    error, _ = _round(transport.Store("memory://"), transform, comm, drop_before_upload=[2, 3])
    assert isinstance(error, sa.CannotUnmask)
    assert str(error) == "round 0 cannot be unmasked: 2 masked inputs arrived, fewer than t=3"


def test_a_request_for_both_kinds_of_a_peers_shares_is_refused_and_answered_with_nothing(caplog):
    transform = sa.SecureAggregation(clip_norm=2.0, clients_per_round=4)
    comm = CommConfig(timeout_s=0.5, server_timeout_s=30.0)
    store = transport.Store("memory://")
    both = {str(v): [[0, sa.SELF_MASK], [0, sa.MASK_KEY]] for v in range(4)}
    error, _ = _round(store, transform, comm, ask=both)
    assert isinstance(error, sa.CannotUnmask)  # nobody answered
    assert all(store.get_json(secure.key(0, f"answers/{c}")) is None for c in range(4))
    assert "asked for both kinds of client 0's shares" in caplog.text


def test_with_keys_a_forged_key_advert_is_ignored_and_its_client_left_out(tmp_path):
    """The server takes only adverts signed by their client: one written under client 3's name by
    anyone else is ignored, and the round goes on without client 3."""
    dirs = signing.make_keys(str(tmp_path / "keys"), 4)
    keys = {name: signing.Keys(d) for name, d in zip(["server", 0, 1, 2, 3], dirs, strict=True)}
    transform = sa.SecureAggregation(clip_norm=2.0, clients_per_round=4)
    comm = CommConfig(timeout_s=0.5, server_timeout_s=30.0)
    store = transport.Store("memory://")
    forged = keys[0].seal({"kind": "secagg_keys", "round": 0, "client": 3, "c_pk": "00" * 32, "s_pk": "00" * 32})
    store.put_json(secure.key(0, "keys/3"), forged)
    server = secure.ServerSide(store, keys["server"], transform, comm)
    sides = {c: secure.ClientSide(store, keys[c], transform, comm, c) for c in range(3)}
    for c in range(3):
        sides[c].start(0, [0, 1, 2, 3])
    server.agree(0, [0, 1, 2, 3])
    assert store.get_json(secure.key(0, "u1"))["clients"] == [0, 1, 2]
    for side in sides.values():
        side.close()


def test_replay_unmask_rebuilds_a_round_from_the_store_and_catches_what_differs(monkeypatch):
    """chaos.py's end check: the server's unmasking redone from U1's keys, U2, the ask and the answers
    the store keeps equals the server's; an altered upload, a lost answer or a lost ask do not pass."""
    seen, unmask = {}, secure.ServerSide.unmask
    monkeypatch.setattr(
        secure.ServerSide, "unmask", lambda self, r, masked: unmask(self, r, seen.update(masked) or masked)
    )
    transform = sa.SecureAggregation(clip_norm=2.0, clients_per_round=5)  # t = 3 of 5
    comm = CommConfig(timeout_s=1.0, server_timeout_s=30.0)
    store, parties = transport.Store("memory://"), list(range(5))
    (total, survivors), inputs = _round(store, transform, comm, drop_before_upload=[3], drop_before_answer=[2])
    assert survivors == [0, 1, 2, 4] and sorted(seen) == survivors
    for c, q in seen.items():  # where a client's upload sits
        store.publish(transport.delta_prefix(0, c), {"q": q})
    replayed, who = secure.replay_unmask(store, transform, 0, parties)  # the uploads read from the store
    assert who == survivors
    np.testing.assert_array_equal(replayed, total)
    np.testing.assert_array_equal(replayed, sa.add([inputs[c] for c in survivors], 32))
    given, _ = secure.replay_unmask(store, transform, 0, parties, masked=seen)
    np.testing.assert_array_equal(given, total)
    altered = {**seen, 4: seen[4] + np.uint32(1)}  # one client's words moved by one
    moved, _ = secure.replay_unmask(store, transform, 0, parties, masked=altered)
    assert np.all(moved - total == 1)
    store.delete(secure.key(0, "answers/0"))  # 1 and 4 answer: 2 shares of each secret, t = 3
    with pytest.raises(sa.CannotUnmask, match="of the t=3 needed"):
        secure.replay_unmask(store, transform, 0, parties)
    store.delete(secure.key(0, "ask"))
    with pytest.raises(ValueError, match="no secure-aggregation ask"):
        secure.replay_unmask(store, transform, 0, parties)


def test_an_unusable_key_advert_is_left_out_instead_of_crashing_its_neighbours():
    """An all-zero X25519 key (a low-order point: every agreement with it is zeros) or a short one,
    written as client 3's advert, is garbage: the server leaves client 3 out of U1, and the others'
    round goes on."""
    transform = sa.SecureAggregation(clip_norm=2.0, clients_per_round=4)  # t = 3 of 4
    comm_ = CommConfig(timeout_s=0.5, server_timeout_s=30.0)
    for bad in ("00" * 32, "ab" * 31):
        store = transport.Store("memory://")
        advert = {"kind": "secagg_keys", "round": 0, "client": 3, "c_pk": bad, "s_pk": bad}
        store.put_json(secure.key(0, "keys/3"), advert)
        server = secure.ServerSide(store, None, transform, comm_)
        sides = {c: secure.ClientSide(store, None, transform, comm_, c) for c in range(3)}
        for c in range(3):
            sides[c].start(0, [0, 1, 2, 3])
        server.agree(0, [0, 1, 2, 3])
        assert store.get_json(secure.key(0, "u1"))["clients"] == [0, 1, 2]
        q = {c: np.full(8, c, np.uint32) for c in range(3)}
        masked = {c: sides[c].masked(0, {"q": q[c]})["q"] for c in range(3)}
        for c in range(3):
            sides[c].answer_later(0)
        total, survivors = server.unmask(0, masked)
        assert survivors == [0, 1, 2] and total.tolist() == [3] * 8
        for side in sides.values():
            side.close()


def test_an_upload_left_out_of_the_unmasked_sum_is_left_out_by_name_and_the_weights_renormalise():
    """An unmasker may return fewer survivors than uploads arrived (a restarted server's ask names
    those it asked): the missing one is rejected by name, and the algorithm's weights are computed
    without it (before, it was neither merged nor left out, and the survivors' weights summed to 3/4)."""
    from jaxblock.fed import exchange, validate

    n = 64
    base = sa.SecureAggregation(clip_norm=2.0, clients_per_round=4)
    inputs = {c: sa.quantize(np.full(n, 0.1 * (c + 1)), 2.0, 4, 32, np.random.default_rng(c)) for c in range(4)}
    transform = dataclasses.replace(base, unmasker=lambda r, masked: (sa.add([inputs[c] for c in (0, 1, 2)], 32),
                                                                      [0, 1, 2]))  # fmt: skip
    fed = dataclasses.replace(algorithms.configure(algorithm="fedbcd", num_clients=4), transforms=(transform,))
    weights = []

    def weights_of(kept, bad):
        weights.append((list(kept), list(bad)))
        return np.full(len(kept), 1 / len(kept))

    like = {"w": jax.ShapeDtypeStruct((n,), np.float32)}
    side = exchange.server_side(algorithms.make(fed), 3, like, weights_of, validate.Policy(), (transform,))
    result = side({c: {"q": inputs[c]} for c in range(4)})
    assert result.merged == [0, 1, 2] and list(result.rejected) == [3]
    assert result.rejected[3].startswith("not passed on")
    assert weights == [([0, 1, 2], [3])]
    np.testing.assert_allclose(np.asarray(result.down["w"]), 0.2, atol=1e-6)  # the mean of 0.1, 0.2, 0.3
