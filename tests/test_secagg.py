"""Secure aggregation's core (jaxblock/fed/secagg.py): quantization, masks, keys, Shamir, sealing,
the SecAgg+ graph, and whole in-memory rounds with dropouts and forged requests."""

import contextlib
import dataclasses
import itertools
import math
import random
import time

import jax
import numpy as np
import pytest
from scipy import stats

from jaxblock.fed import secagg as sa


def _updates(count: int, n: int, seed: int = 0) -> np.ndarray:
    """float32[count, n]: updates of scale 0.3, a few coordinates beyond the bound 1 (clipped)."""
    return (0.3 * np.random.default_rng(seed).standard_normal((count, n))).astype(np.float32)


def _quantized(x: np.ndarray, bits: int) -> dict[int, np.ndarray]:
    return {i: sa.quantize(x[i], 1.0, len(x), bits, np.random.default_rng(100 + i)) for i in range(len(x))}


def test_quantize_stays_within_one_step_of_the_clipped_value_and_never_wraps():
    x = np.concatenate([_updates(1, 100_000)[0], [1.0, -1.0, 5.0, -5.0]]).astype(np.float32)
    for bits, num_clients in ((8, 3), (32, 10), (64, 7)):
        top = sa.levels(num_clients, bits)
        assert num_clients * top <= 2**bits - 1
        q = sa.quantize(x, 1.0, num_clients, bits, np.random.default_rng(0))
        assert q.dtype == sa.word_dtype(bits) and int(q.max()) <= top and int(q[-3]) == 0
        assert top - int(q[-4]) <= top * 2**-50  # +bound is L (64 bits: the largest float64 <= L)
        err = np.abs(sa.dequantize_sum(q, 1.0, num_clients, bits, 1) - np.clip(x, -1, 1))
        assert err.max() <= sa.error_bound(1.0, num_clients, bits), (bits, err.max())
        if bits == 8:  # coarse: the error really is up to a step, so the bound is not vacuous
            assert err.max() > 0.9 * 2 / top
    full = np.full(10, 1.0, np.float32)  # every client at +bound: the largest sum, still no wrap
    total = sa.add([sa.quantize(full, 1.0, 3, 8, np.random.default_rng(i)) for i in range(3)], 8)
    np.testing.assert_allclose(sa.dequantize_sum(total, 1.0, 3, 8, 3), 3.0)


def test_stochastic_rounding_is_unbiased():
    top = sa.levels(3, 8)  # 85 levels: a step of 2/85
    x = np.full(200_000, -1 + 2 * 40.5 / top, np.float32)  # halfway between levels 40 and 41
    q = sa.quantize(x, 1.0, 3, 8, np.random.default_rng(1))
    assert set(np.unique(q)) == {40, 41}
    mean_err = sa.dequantize_sum(q, 1.0, 3, 8, 1).mean() - float(x[0])
    # std of the mean: step / 2 / sqrt(n) = 2.6e-5; rounding down or to nearest would be off by 1.2e-2
    assert abs(mean_err) < 5 * (2 / top) / 2 / math.sqrt(x.size), mean_err


def test_expand_is_chacha20_deterministic_and_fast(report):
    # RFC 7539 A.1 test vector 1: key and nonce zero, counter 0, keystream 76 b8 e0 ad a0 f1 3d 90 ...
    np.testing.assert_array_equal(sa.expand(bytes(32), 2, 32), [0xADE0B876, 0x903DF1A0])
    seed = random.Random(0).randbytes(32)
    words = sa.expand(seed, 300_000, 32)  # more than one 256 KiB chunk
    np.testing.assert_array_equal(sa.expand(seed, 1000, 32), words[:1000])
    np.testing.assert_array_equal(sa.expand(seed, 1000, 20), words[:1000] & (2**20 - 1))
    assert sa.expand(seed, 1000, 64).dtype == np.uint64
    assert not np.array_equal(sa.expand(random.Random(1).randbytes(32), 1000, 32), words[:1000])

    n = 1_000_000
    start = time.perf_counter()
    for _ in range(4):
        sa.expand(seed, n, 32)
    mb_per_s = 4 * 4 * n / 1e6 / (time.perf_counter() - start)
    x = _updates(1, n)[0]
    start = time.perf_counter()
    q = sa.quantize(x, 1.0, 10, 32, np.random.default_rng(0))
    quantize_ms = 1e3 * (time.perf_counter() - start)
    seeds = [random.Random(i).randbytes(32) for i in range(4)]
    start = time.perf_counter()
    masked = sa.mask(q, 0, seeds[0], {1: seeds[1], 2: seeds[2], 3: seeds[3]}, 32)
    mask_ms = 1e3 * (time.perf_counter() - start)
    start = time.perf_counter()
    sa.unmask(masked, [0], {0: seeds[0]}, {(0, 1): seeds[1], (0, 2): seeds[2], (0, 3): seeds[3]}, n, 32)
    unmask_ms = 1e3 * (time.perf_counter() - start)
    report(f"secagg: ChaCha20 masks {mb_per_s:.0f} MB/s; 1M values: quantize {quantize_ms:.0f} ms, "
           f"mask with self + 3 pairs {mask_ms:.0f} ms, unmask 1 self + 3 dangling pairs {unmask_ms:.0f} ms")  # fmt: skip
    assert mb_per_s > 50, f"mask expansion at {mb_per_s:.0f} MB/s: not the native ChaCha20 stream"


def test_agreed_seeds_match_at_both_ends_and_are_bound_to_their_purpose():
    (a_sk, a_pk), (b_sk, b_pk), (_, c_pk) = sa.generate_keypair(), sa.generate_keypair(), sa.generate_keypair()
    mask7 = sa.info(7, "mask")
    assert sa.agree(a_sk, b_pk, mask7) == sa.agree(b_sk, a_pk, mask7)
    assert len(sa.agree(a_sk, b_pk, mask7)) == 32
    assert sa.agree(a_sk, b_pk, mask7) != sa.agree(a_sk, b_pk, sa.info(8, "mask"))
    assert sa.agree(a_sk, b_pk, mask7) != sa.agree(a_sk, b_pk, sa.info(7, "shares"))
    assert sa.agree(a_sk, b_pk, mask7) != sa.agree(a_sk, c_pk, mask7)
    assert sa.public_of(a_sk) == a_pk
    with pytest.raises(ValueError, match="32 bytes"):
        sa.agree(a_sk, b_pk[:31], mask7)


def test_shamir_any_t_shares_reconstruct_and_fewer_do_not():
    secret = b"\x00\x07" + random.Random(2).randbytes(30)  # leading zero bytes must survive
    shares = sa.split(secret, 4, 7, random.Random(3))
    assert [x for x, _ in shares] == list(range(1, 8))
    for subset in itertools.combinations(shares, 4):
        assert sa.combine(subset, 4) == secret
    assert sa.combine(shares, 4) == secret
    for subset in itertools.combinations(shares, 3):
        with pytest.raises(ValueError, match="fewer than the threshold t=4"):
            sa.combine(subset, 4)
        with contextlib.suppress(ValueError):  # 3 points as if t were 3: a different value, or no secret at all
            assert sa.combine(subset, 3) != secret
    with pytest.raises(ValueError, match="fewer than the threshold"):
        sa.combine(shares[:3] + shares[:1], 4)  # a repeated share is not a 4th
    assert sa.combine(sa.split(b"", 2, 3), 2) == b""
    assert sa.combine(sa.split(bytes(64), 2, 3), 2) == bytes(64)


def test_seal_opens_with_its_key_and_detects_tampering():
    key, other = random.Random(4).randbytes(32), random.Random(5).randbytes(32)
    sealed = sa.seal(key, b"shares of b and s_sk", b"round 7 shares 1 to 2")
    assert sa.open_(key, sealed, b"round 7 shares 1 to 2") == b"shares of b and s_sk"
    assert sealed != sa.seal(key, b"shares of b and s_sk", b"round 7 shares 1 to 2")  # a fresh nonce each time
    tampered = bytearray(sealed)
    tampered[20] ^= 1
    for k, c, ad in ((other, sealed, b"round 7 shares 1 to 2"), (key, bytes(tampered), b"round 7 shares 1 to 2"),
                     (key, sealed, b"round 7 shares 1 to 3")):  # fmt: skip
        with pytest.raises(sa.BadCiphertext, match="wrong key, or its bytes were altered"):
            sa.open_(k, c, ad)


@pytest.mark.parametrize("n", [9, 25])
@pytest.mark.parametrize("k", [0, 3, 4, 8, 40])
def test_neighbors_are_symmetric_with_the_right_degree(n, k):
    parties = list(range(100, 100 + n))
    graph = sa.neighbors(parties, k, b"round 7")
    degree = n - 1 if k == 0 or 2 * math.ceil(k / 2) >= n - 1 else 2 * math.ceil(k / 2)
    assert set(graph) == set(parties)
    for p, peers in graph.items():
        assert p not in peers and len(peers) == degree and all(p in graph[q] for q in peers)
    assert sa.neighbors(parties, k, b"round 7") == graph
    if degree < n - 1:  # sparse: the seed shuffles it
        assert sa.neighbors(parties, k, b"round 8") != graph


@pytest.mark.parametrize(("k", "bits"), [(0, 32), (4, 32), (4, 20)])
def test_masked_sum_is_exactly_the_sum_of_quantized_inputs(k, bits):
    x = _updates(8, 5000)
    q = _quantized(x, bits)
    setup = sa.Setup(7, tuple(range(8)), threshold=3 if k else 5, neighbors=k, seed=b"round 7", bits=bits)
    total, survivors = sa.simulate(setup, q)
    assert survivors == list(range(8))
    np.testing.assert_array_equal(total, sa.add(q.values(), bits))
    err = np.abs(sa.dequantize_sum(total, 1.0, 8, bits, 8) - np.clip(x, -1, 1).astype(np.float64).sum(0))
    assert err.max() <= 8 * sa.error_bound(1.0, 8, bits)


def test_one_masked_upload_looks_uniform_and_uncorrelated_with_its_update():
    n = 100_000
    x = _updates(1, n)[0]
    q = sa.quantize(x, 1.0, 10, 32, np.random.default_rng(0))
    seeds = [random.Random(10 + i).randbytes(32) for i in range(4)]
    masked = sa.mask(q, 1, seeds[0], {0: seeds[1], 2: seeds[2], 3: seeds[3]}, 32)

    def uniform_bytes_p(a):
        return stats.chisquare(np.bincount(a.view(np.uint8), minlength=256)).pvalue

    assert uniform_bytes_p(masked) > 1e-3
    assert abs(np.corrcoef(masked.astype(np.float64), x)[0, 1]) < 0.02
    assert uniform_bytes_p(q) < 1e-10  # without masks the same checks fail: they can tell
    assert np.corrcoef(q.astype(np.float64), x)[0, 1] > 0.99


@pytest.mark.parametrize(("k", "n", "t"), [(0, 10, 6), (4, 16, 3)])
def test_dropouts_after_sharing_and_after_upload_are_recovered(k, n, t):
    q = _quantized(_updates(n, 2000), 32)
    setup = sa.Setup(3, tuple(range(n)), threshold=t, neighbors=k, seed=b"round 3")
    graph, gone = setup.graph(), []
    for u in setup.parties:  # 4 dropouts that leave every client t share holders who answer
        if len(gone) < 4 and all(len({v, *graph[v]} - {*gone, u}) >= t for v in setup.parties):
            gone.append(u)
    assert len(gone) == 4
    total, survivors = sa.simulate(
        setup, q, drop_before_sharing=gone[:1], drop_before_upload=gone[1:3], drop_before_answer=gone[3:]
    )  # one never shared; two shared keys, never uploaded; one uploaded, never answered
    assert survivors == sorted(set(range(n)) - set(gone[:3]))
    np.testing.assert_array_equal(total, sa.add([q[u] for u in survivors], 32))
    assert not np.array_equal(total, sa.add(q.values(), 32))


def test_below_threshold_the_round_cannot_be_unmasked():
    q = _quantized(_updates(5, 100), 32)
    setup = sa.Setup(7, tuple(range(5)), threshold=3)
    with pytest.raises(sa.CannotUnmask, match=r"^round 7 cannot be unmasked: 2 masked inputs arrived, fewer than t=3$"):
        sa.simulate(setup, q, drop_before_upload=[0, 1, 2])
    with pytest.raises(
        sa.CannotUnmask, match="round 7 cannot be unmasked: client 0's self_mask has 2 shares of the t=3"
    ):
        sa.simulate(setup, q, drop_before_answer=[0, 1, 2])
    with pytest.raises(sa.CannotUnmask, match="2 clients shared their keys, fewer than t=3"):
        sa.simulate(setup, q, drop_before_sharing=[0, 1, 2])
    with pytest.raises(ValueError, match=r"threshold t=2: must be in \(2.5, 5\]"):
        sa.Setup(7, tuple(range(5)), threshold=2)


def _shared(setup):
    """A round run to the relayed shares: (server, clients, each client's inbox)."""
    clients, publics = {}, {}
    for u in setup.parties:
        clients[u], publics[u] = sa.client_keys(setup, u)
    server = sa.collect_keys(setup, publics)
    outboxes = {}
    for u in setup.parties:
        clients[u], outboxes[u] = sa.share_keys(clients[u], sa.peer_keys(server, u))
    server, inboxes = sa.relay(server, outboxes)
    return server, clients, inboxes


def _to_requests(setup, q, drop_before_upload=()):
    """A round run to the server's requests: (server, clients, masked uploads, requests)."""
    server, clients, inboxes = _shared(setup)
    masked = {}
    for u in set(setup.parties) - set(drop_before_upload):
        clients[u], masked[u] = sa.masked_input(clients[u], q[u], inboxes[u])
    return server, clients, masked, sa.requests(server, masked)


def test_a_request_for_both_kinds_of_one_peers_shares_is_refused():
    q = _quantized(_updates(5, 100), 32)
    server, clients, masked, asks = _to_requests(sa.Setup(7, tuple(range(5)), threshold=3), q, drop_before_upload=[4])
    assert asks[0] == [(0, sa.SELF_MASK), (1, sa.SELF_MASK), (2, sa.SELF_MASK), (3, sa.SELF_MASK), (4, sa.MASK_KEY)]
    with pytest.raises(sa.Refused, match="asked for both kinds of client 1's shares in round 7"):
        sa.answer(clients[0], [(1, sa.SELF_MASK), (2, sa.SELF_MASK), (1, sa.MASK_KEY)])
    with pytest.raises(sa.Refused, match="its own mask key"):
        sa.answer(clients[0], [(0, sa.MASK_KEY)])
    with pytest.raises(sa.Refused, match="answers only after its own upload"):
        sa.answer(clients[4], [(0, sa.SELF_MASK)])
    answers = {}
    for v, ask in asks.items():
        clients[v], answers[v] = sa.answer(clients[v], ask)
    # a second request claiming that 1 dropped after all: refused, since 0 revealed 1's self-mask shares
    with pytest.raises(sa.Refused, match="already revealed client 1's self_mask shares, asked for its mask_key"):
        sa.answer(clients[0], [(1, sa.MASK_KEY)])
    assert sa.answer(clients[0], asks[0])[1] == answers[0]  # the same request again: the same shares
    total = sa.unmask_round(server, masked, answers)
    np.testing.assert_array_equal(total, sa.add([q[u] for u in range(4)], 32))


def test_sealed_shares_cannot_be_redirected_and_altered_shares_are_caught():
    setup = sa.Setup(1, (0, 1, 2, 3), threshold=3)
    server, clients, inboxes = _shared(setup)
    forged = {**inboxes[2], 1: inboxes[3][0]}  # 0's shares for 3, passed to 2 as if from 1
    with pytest.raises(sa.BadCiphertext):
        sa.masked_input(clients[2], np.zeros(10, np.uint32), forged)

    q = _quantized(_updates(4, 10), 32)
    masked = {}
    for u in (0, 1, 2):  # 3 drops: the server rebuilds its mask key
        clients[u], masked[u] = sa.masked_input(clients[u], q[u], inboxes[u])
    answers = {}
    for v, ask in sa.requests(server, masked).items():
        clients[v], answers[v] = sa.answer(clients[v], ask)
    np.testing.assert_array_equal(sa.unmask_round(server, masked, answers), sa.add([q[0], q[1], q[2]], 32))
    x, y = sa.share_from_bytes(answers[1][-1][2])
    assert answers[1][-1][:2] == (3, sa.MASK_KEY)
    altered = {**answers, 1: [*answers[1][:-1], (3, sa.MASK_KEY, sa.share_bytes((x, y + 1)))]}
    with pytest.raises(ValueError, match="round 1: client 3's mask_key does not come back from its shares"):
        sa.unmask_round(server, masked, altered)


def test_client_state_is_plain_data_and_forgets_its_secrets_after_upload():
    q = _quantized(_updates(3, 50), 32)
    _, clients, _, _ = _to_requests(sa.Setup(2, (0, 1, 2), threshold=2), q)

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, int) and plain(x) for k, x in v.items())
        if isinstance(v, tuple):
            return all(plain(x) for x in v)
        return isinstance(v, bytes | int | str | bool)

    state = clients[1]
    assert all(plain(v) for v in dataclasses.asdict(state).values())
    assert state.c_sk == state.s_sk == state.self_seed == b"" and state.uploaded
    assert sorted(state.held) == [0, 1, 2] and state.masked_with == (0, 2)
    with pytest.raises(ValueError, match="client 1: already uploaded this round"):
        sa.masked_input(state, q[1], {})


# ----------------------------------------------------------------------------- the update transform


def test_the_transform_gives_the_mean_within_the_quantization_bound_and_never_a_single_upload():
    """Through the transforms' reduce, as every exchange calls it: the layers below see each survivor's
    upload as the survivors' mean, within the stated bound of the float mean."""
    from jaxblock.fed import transforms

    rng = np.random.default_rng(1)
    ups = {c: {"a": rng.standard_normal((30, 4)).astype(np.float32) * 0.01, "b": rng.standard_normal(7).astype(np.float32) * 0.01}
           for c in range(5)}  # fmt: skip
    tr = sa.SecureAggregation(clip_norm=1.0, clients_per_round=5, seed=9)
    wire, state = {}, {}
    for c, u in ups.items():
        wire[c], state = tr.encode(state, c, 0, u)
    assert wire[0]["q"].dtype == np.uint32 and wire[0]["q"].shape == (127,) and int(state["c4"]) == 1
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ups[0])
    seen = transforms.reduce((tr,), wire, like, lambda dense: dense, round_=3)
    assert sorted(seen) == list(range(5)) and all(seen[c] is seen[0] for c in seen)
    mean = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *ups.values())
    bound = sa.error_bound(1.0, 5, 32)
    for got, want in zip(jax.tree.leaves(seen[0]), jax.tree.leaves(mean), strict=True):
        assert np.max(np.abs(got - want)) <= bound + 1e-7 and not np.array_equal(got, want)
    assert tr.wire_leaves(like, "float32") == {"q": ((127,), "uint32", None)}


def test_a_secure_run_trains_as_the_plain_run_within_quantization(tmp_path):
    from test_train import final_params, small_config

    from jaxblock.run import experiment

    common = ["algorithm=fedbcd", "rounds=2"]
    experiment.train(small_config(*common), str(tmp_path / "plain"), progress=False)
    secure = experiment.train(small_config(*common, "secagg.on=True", "secagg.clip_norm=100", "dp.noise_seed=3"), str(tmp_path / "sa"),
                              progress=False)  # fmt: skip
    assert secure["fed"]["secagg.on"] is True
    a, b = final_params(str(tmp_path / "plain"))[1], final_params(str(tmp_path / "sa"))[1]
    diffs = [
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    # quantized (not bitwise the plain run); one step of 2 x 100 / (2^32 / 3) = 1.4e-7 per value, which
    # round 2's AdamW (it normalises by tiny second moments) can grow ~100x: 1.04e-5 seen at another secret
    assert 0 < max(diffs) < 1e-4


@pytest.mark.parametrize(
    "extra, line",
    [
        (["algorithm=flora"], "its server needs each client's adapter"),
        (["algorithm=fedcybgd"], "a sum of one is its update"),
        (["algorithm=fedbuff"], "an asynchronous buffer"),
        (["compression=topk"], "each client's indices differ"),
        (["comm.max_norm_ratio=3"], "cannot see an individual update's norm"),
        (["secagg.clip_norm=0"], "needs a clip norm"),
    ],
    ids=["flora", "fedcybgd", "fedbuff", "topk", "norm_ratio", "no_clip"],
)
def test_what_secure_aggregation_cannot_run_with_is_refused_before_anything_is_written(tmp_path, extra, line):
    from test_train import small_config

    from jaxblock.run import experiment

    config = small_config("secagg.on=True", "secagg.clip_norm=1", *extra)
    with pytest.raises(ValueError, match=line):
        experiment.train(config, str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match=line):  # the deployment's server refuses it alike
        experiment.serve(config, str(tmp_path / "server"), "memory://")
    assert not (tmp_path / "run").exists() and not (tmp_path / "server").exists()
