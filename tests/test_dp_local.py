"""DP-SGD in LocalBlockTraining: per-example block gradients, clipping, noise, and sampled batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblock import model
from jaxblock.fed import blocks, data, local
from jaxblock.model import lora
from jaxblock.model.config import ModelConfig

CFG = ModelConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
)
K, B, T = 2, 4, 12


def _batches(seed=0, k=K, ragged=False):
    """Token batches [k, B, T] with a noise key per step; `ragged`: each example its own target count."""
    tokens = jax.random.randint(jax.random.key(seed), (k, B, T), 0, CFG.vocab_size)
    start = jnp.arange(B)[:, None] + 2 if ragged else T // 2
    loss_mask = jnp.broadcast_to(jnp.arange(T) >= start, (k, B, T)).astype(jnp.float32)
    noise_key = np.random.default_rng(seed).integers(0, 2**32, (k, 2), dtype=np.uint32)
    return {"tokens": tokens, "loss_mask": loss_mask, "noise_key": noise_key}


@pytest.fixture(scope="module")
def setup():
    params = model.init(CFG, jax.random.key(0))
    part = blocks.partition(params, blocks.llm_block_rules(CFG.num_layers, 1))
    return params, part


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a, b)))


def _sgd(lr, steps=K):
    return local.make_optimizer(local.OptimizerConfig("sgd", lr), steps)


def test_bad_dp_settings_are_one_line_errors(setup):
    with pytest.raises(ValueError, match=r"^dp.clip_norm=0.0: must be > 0$"):
        local.DPSGD(0.0, 1.0)
    with pytest.raises(ValueError, match=r"^dp.noise_multiplier=-0.5: must be >= 0$"):
        local.DPSGD(1.0, -0.5)
    params, part = setup
    train = local.make_local_train(local.lm_loss(CFG), _sgd(0.1), dp=local.DPSGD(1.0, 1.0))
    batches = {k: v for k, v in _batches().items() if k != "noise_key"}
    with pytest.raises(ValueError, match="batches need 'noise_key'"):
        train(*part.split(params, 1), batches)
    with pytest.raises(ValueError, match="batches need 'noise_key'"):
        train.batched(*[[x] for x in part.split(params, 1)], [batches])


def test_per_example_gradients_equal_a_loop_of_single_example_grads(setup):
    params, part = setup
    block, frozen = part.split(params, 1)
    loss_fn = local.lm_loss(CFG)
    batch = {k: v[0] for k, v in _batches(ragged=True).items() if k != "noise_key"}
    losses, grads = jax.jit(local.per_example_gradients, static_argnums=0)(loss_fn, block, frozen, batch)
    one = jax.jit(jax.value_and_grad(lambda blk, ex: loss_fn(blocks.merge(blk, frozen), ex)))
    for i in range(B):
        loss, grad = one(block, jax.tree.map(lambda x, i=i: x[i : i + 1], batch))
        np.testing.assert_allclose(losses[i], loss, rtol=1e-6)
        jax.tree.map(lambda g, r, i=i: np.testing.assert_allclose(g[i], r, rtol=1e-5, atol=1e-7), grads, grad)
    assert jax.tree.structure(grads) == jax.tree.structure(block)  # the block's leaves, nothing frozen
    assert np.ptp(np.asarray(losses)) > 1e-3  # the examples really differ


def test_clipping_bounds_every_norm_and_leaves_small_gradients_alone():
    c = 0.7
    scales = np.array([0.01, 0.3, 1.0, 5.0, 100.0], np.float32)  # per-example norms in units of C
    rng = np.random.default_rng(0)
    raw = {"a": rng.normal(size=(5, 6, 7)), "b": {"c": rng.normal(size=(5, 11))}}
    norms = np.sqrt(sum(np.sum(x.reshape(5, -1) ** 2, axis=1) for x in jax.tree.leaves(raw)))
    grads = jax.tree.map(lambda x: (x * (c * scales / norms).reshape(-1, *[1] * (x.ndim - 1))).astype(np.float32), raw)
    clipped = local.clip_per_example(grads, c)
    out_norms = np.sqrt(sum(np.sum(np.asarray(x).reshape(5, -1) ** 2, axis=1) for x in jax.tree.leaves(clipped)))
    assert (out_norms <= c + 1e-6).all(), out_norms
    np.testing.assert_allclose(out_norms[scales > 1], c, rtol=1e-5)  # clipped to C exactly, not below
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(clipped), strict=True):
        np.testing.assert_array_equal(y[scales < 1], x[scales < 1])  # under C: the identity
        np.testing.assert_allclose(y[3], x[3] / 5.0, rtol=1e-5)  # over C: the same direction


def _dot_output_shapes(jaxpr) -> set[tuple[int, ...]]:
    shapes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.add(tuple(eqn.outvars[0].aval.shape))
        for sub in jax.core.jaxprs_in_params(eqn.params):
            shapes |= _dot_output_shapes(sub)
    return shapes


def test_a_dp_step_forms_no_gradient_of_a_frozen_leaf():
    """LoRA adapters as the block, every base kernel frozen: no dot in the DP step outputs a kernel's
    shape, per example ([B, ...]) or not, in any flattening (as test_lora checks the plain step)."""
    cfg = CFG.replace(lora_alpha=8.0)
    adapters = lora.LoraConfig(rank=3, targets=tuple(lora.TARGETS))
    params = lora.add(cfg, model.init(CFG, jax.random.key(0)), adapters, jax.random.key(1))
    frozen, block = lora.split(params)
    batch = {k: v[0] for k, v in _batches().items()}
    dp, opt = local.DPSGD(1.0, 1.0), _sgd(0.1)

    def step_shapes(blk, frz):
        step = lambda b: local.train_step(local.lm_loss(cfg), opt, b, frz, opt.init(b), batch, dp=dp)  # noqa: E731
        return _dot_output_shapes(jax.make_jaxpr(step)(blk).jaxpr)

    kernels = [x.shape for x in jax.tree.leaves(frozen) if x.ndim >= 2]
    flat = {s for k in kernels for s in (k, (k[0], int(np.prod(k[1:]))), (int(np.prod(k[:-1])), k[-1]))}
    forbidden = flat | {(B, *s) for s in flat} | {(B, 1, *s) for s in flat}
    assert not forbidden & step_shapes(block, frozen)
    # The check can fail: DP on the whole model forms the kernels' per-example gradients.
    assert forbidden & step_shapes(params, {})


def _linear_loss(p, batch):
    """A toy model, y = x @ (w1 + w2): mean over examples of the squared error."""
    return jnp.mean(jnp.sum((batch["x"] @ (p["w1"] + p["w2"]) - batch["y"]) ** 2, axis=-1))


def _toy_problem(width=160, out=128, b=B, k=1, seed=0):
    """`_linear_loss`'s params (two leaves of width x out, >= 20k parameters each) and batches."""
    rng = np.random.default_rng(seed)
    params = {"w1": rng.normal(size=(width, out)).astype(np.float32), "w2": np.zeros((width, out), np.float32)}
    batches = {
        "x": rng.normal(size=(k, b, width)).astype(np.float32),
        "y": rng.normal(size=(k, b, out)).astype(np.float32),
        "noise_key": rng.integers(0, 2**32, (k, 2), dtype=np.uint32),
    }
    return params, batches


def test_noise_std_is_lr_times_z_times_c_over_b():
    """C tiny, so the clipped signal is ~1e-2 of the noise: one SGD step moves each coordinate by
    eta_l * N(0, (z C)^2) / B, independently across leaves and steps' keys."""
    params, batches = _toy_problem()
    lr, z, c = 20.0, 2.0, 1e-4
    train = local.make_local_train(_linear_loss, _sgd(lr, 1), dp=local.DPSGD(c, z))
    delta, _ = train(params, {}, batches)
    d = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(delta)])
    assert d.size >= 20_000
    expected = lr * z * c / B
    assert abs(d.std() / expected - 1) < 0.05, (d.std(), expected)
    assert abs(d.mean()) < 5 * expected / np.sqrt(d.size)
    corr = np.corrcoef(np.ravel(delta["w1"]), np.ravel(delta["w2"]))[0, 1]
    assert abs(corr) < 0.05, corr  # one key per leaf, not one noise draw for all
    other = dict(batches, noise_key=batches["noise_key"] + 1)
    again, _ = train(params, {}, batches)
    jax.tree.map(np.testing.assert_array_equal, again, delta)  # the key alone decides the noise
    assert abs(np.corrcoef(np.ravel(train(params, {}, other)[0]["w1"]), np.ravel(delta["w1"]))[0, 1]) < 0.05
    assert train.compilations() == 1  # a new key is a new value, not a new executable


def test_zero_noise_and_huge_clip_is_the_plain_mean_gradient_step(setup):
    """z = 0, C = 1e6: over K steps of SGD with momentum the DP path trains exactly what the batch
    gradient trains (every example has as many target tokens, so the batch loss is the mean of the
    examples' losses). The optimizer only ever sees the gradient, so this holds for AdamW too."""
    params, part = setup
    block, frozen = part.split(params, 1)
    opt = local.make_optimizer(local.OptimizerConfig("sgd", 0.5, momentum=0.9), K)
    batches = _batches(seed=3)
    dp_train = local.make_local_train(local.lm_loss(CFG), opt, dp=local.DPSGD(1e6, 0.0))
    dp_delta, dp_losses = dp_train(block, frozen, batches)
    plain = {k: v for k, v in batches.items() if k != "noise_key"}
    delta, losses = local.make_local_train(local.lm_loss(CFG), opt)(block, frozen, plain)
    np.testing.assert_allclose(dp_losses, losses, rtol=1e-5)
    assert _max_diff(dp_delta, delta) <= 2e-6, _max_diff(dp_delta, delta)
    assert np.abs(np.asarray(delta["layers_1"]["mlp"]["up_proj"])).max() > 1e-3  # it really moved


def test_batched_dp_clients_equal_one_by_one(setup):
    """`train.batched` with dp: each client's noise key is its own (clients 0 and 2 have the same
    model and data, only their keys differ), and every client gets its `train` result."""
    params, part = setup
    train = local.make_local_train(
        local.lm_loss(CFG), local.make_optimizer(local.OptimizerConfig(learning_rate=1e-2), K), dp=local.DPSGD(0.5, 1.0)
    )
    other = jax.tree.map(lambda x: x * 1.01, params["layers_0"])
    splits = [part.split(p, 1) for p in (params, {**params, "layers_0": other}, params)]
    batches = [_batches(seed=0), _batches(seed=1), dict(_batches(seed=0), noise_key=_batches(seed=2)["noise_key"])]
    got = train.batched([s[0] for s in splits], [s[1] for s in splits], batches, 0.5)
    for (block, frozen), batch, (delta, losses) in zip(splits, batches, got, strict=True):
        ref_delta, ref_losses = train(block, frozen, batch, 0.5)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        assert _max_diff(delta, ref_delta) <= 1e-5  # AdamW: 1e-3 of a step
    np.testing.assert_allclose(got[0][1][0], got[2][1][0], rtol=1e-6)  # same model and data ...
    assert _max_diff(got[0][0], got[2][0]) > 1e-3  # ... but their own noise
    assert train.compilations() == 2  # one batched executable, one per-client


# ----------------------------------------------------------------------------- sampled batches


def _clients(sizes=(9, 20), t=3):
    """Client c's row r holds tokens 1000 c + r: a batch shows which rows it drew."""
    return [
        {"tokens": (1000 * c + np.arange(n))[:, None].repeat(t, 1).astype(np.int32), "loss_mask": np.ones((n, t))}
        for c, n in enumerate(sizes)
    ]


def test_sampled_batches_are_a_pure_function_of_the_position():
    fn = data.make_sampled_batches_fn(_clients(), 4, seed=7)
    long, end = fn(1, 0, 6)
    assert end == 24 and long["tokens"].shape == (6, 4, 3) and long["noise_key"].shape == (6, 2)
    assert long["noise_key"].dtype == np.uint32
    again, _ = fn(1, 0, 6)
    jax.tree.map(np.testing.assert_array_equal, again, long)
    head, pos = fn(1, 0, 2)
    tail, end2 = fn(1, pos, 4)  # a run resumed after 2 steps reads what the long run read
    assert end2 == end
    jax.tree.map(lambda h, t, x: np.testing.assert_array_equal(np.concatenate([h, t]), x), head, tail, long)
    # step s's rows are default_rng([seed, client, s]).choice(n, B, replace=False): what accounting assumes
    expected = np.random.default_rng([7, 1, 3]).choice(20, 4, replace=False)
    np.testing.assert_array_equal(long["tokens"][3, :, 0], 1000 + expected)
    np.testing.assert_array_equal(long["loss_mask"], 1.0)


def test_sampled_rows_are_distinct_within_a_step_and_keys_differ():
    fn = data.make_sampled_batches_fn(_clients(), 9, seed=0)
    small, _ = fn(0, 0, 50)  # client 0 has exactly 9 rows: every step is a permutation of them
    for step in small["tokens"][:, :, 0]:
        np.testing.assert_array_equal(np.sort(step), np.arange(9))
    assert len({tuple(s) for s in small["tokens"][:, :, 0]}) > 40  # ... in a fresh order each step
    big, _ = fn(1, 0, 200)
    rows = big["tokens"][:, :, 0] - 1000
    assert all(len(set(r)) == 9 for r in rows)  # without replacement
    counts = np.bincount(rows.ravel(), minlength=20)  # uniform: 90 draws per row expected
    assert counts.min() > 50 and counts.max() < 130, counts
    keys = {tuple(k) for b in (small, big) for k in b["noise_key"]}
    assert len(keys) == 250  # per step and per client
    other_seed, _ = data.make_sampled_batches_fn(_clients(), 9, seed=1)(1, 0, 200)
    assert not np.array_equal(other_seed["tokens"], big["tokens"])
    assert not {tuple(k) for k in other_seed["noise_key"]} & keys


def test_a_client_smaller_than_the_batch_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^client 0 has 9 examples: fewer than batch_size=10$"):
        data.make_sampled_batches_fn(_clients(), 10, seed=0)


def test_sampled_batches_train_with_dp():
    """The two halves together: a client's sampled batches drive DP local training of the toy model,
    and its loss on all of the client's data falls."""
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(8, 2)).astype(np.float32)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    clients = [{"x": x, "y": x @ w_true + 0.1 * rng.normal(size=(64, 2)).astype(np.float32)}]
    batches, _ = data.make_sampled_batches_fn(clients, 8, seed=5)(0, 0, 40)
    params = {"w1": np.zeros((8, 2), np.float32), "w2": np.zeros((8, 2), np.float32)}
    part = blocks.partition(params, [("w1", "w"), ("w2", None)])
    block, frozen = part.split(params, 0)
    train = local.make_local_train(_linear_loss, _sgd(0.5, 40), dp=local.DPSGD(1.0, 0.5))
    delta, losses = train(block, frozen, batches)
    before = _linear_loss(params, clients[0])
    after = _linear_loss(blocks.merge(jax.tree.map(jnp.add, block, delta), frozen), clients[0])
    assert after < 0.2 * before, (before, after)
    assert losses.shape == (40,)


# ----------------------------------------------------------------------------- Poisson sampling


def test_poisson_draws_have_mean_batch_size_and_use_the_steps_secret_keys():
    """Each of client 1's 50 examples is in a step with probability q = 5 / 50, drawn from the step's
    key default_rng([seed, client, s]) (the one sampling without replacement uses); the drawn rows
    fill a fixed buffer of poisson_cap(5) rows in index order, the rest zeros, with their 0/1 mask."""
    fn = data.make_sampled_batches_fn(_clients((9, 50)), 5, seed=7, sampling="poisson")
    long, end = fn(1, 0, 2000)
    m = data.poisson_cap(5)
    assert end == 2000 * 5 and long["tokens"].shape == (2000, m, 3) and long["sample_mask"].shape == (2000, m)
    counts = long["sample_mask"].sum(axis=1)
    assert abs(counts.mean() - 5) < 0.25 and abs(counts.var() / 4.5 - 1) < 0.15, (counts.mean(), counts.var())
    for s in (0, 3, 1999):
        drawn = np.flatnonzero(np.random.default_rng([7, 1, s]).random(50) < 0.1)
        np.testing.assert_array_equal(long["sample_mask"][s], np.arange(m) < len(drawn))
        np.testing.assert_array_equal(long["tokens"][s, : len(drawn), 0], 1000 + drawn)
        assert not long["tokens"][s, len(drawn) :].any() and not long["loss_mask"][s, len(drawn) :].any()
    rows = long["tokens"][:, :, 0][long["sample_mask"] > 0] - 1000
    per_row = np.bincount(rows, minlength=50)  # 200 expected each
    assert per_row.min() > 140 and per_row.max() < 260, per_row
    fixed, _ = data.make_sampled_batches_fn(_clients((9, 50)), 5, seed=7)(1, 0, 2000)
    np.testing.assert_array_equal(long["noise_key"], fixed["noise_key"])  # the same noise keys
    head, pos = fn(1, 0, 3)
    tail, _ = fn(1, pos, 2)  # a resumed run draws what the long run drew
    jax.tree.map(lambda h, t, x: np.testing.assert_array_equal(np.concatenate([h, t]), x[:5]), head, tail, long)


def test_a_poisson_draw_over_the_buffer_widens_it_instead_of_truncating():
    """cap=2 (the real one overflows with probability 1e-12 a step): a call whose step draws more gets
    a buffer that holds every drawn row, rounded to `multiple`; train.batched pads the narrower
    clients' buffers with masked rows and equals one-by-one training."""
    fn = data.make_sampled_batches_fn(_clients((9, 20)), 4, seed=0, sampling="poisson", multiple=3, cap=2)
    batches = [fn(c, 0, 3)[0] for c in (0, 1)]
    for c, batch in enumerate(batches):
        n = (9, 20)[c]
        drawn = [np.flatnonzero(np.random.default_rng([0, c, s]).random(n) < 4 / n) for s in range(3)]
        width = batch["sample_mask"].shape[1]
        assert width == max(2, -(-max(map(len, drawn)) // 3) * 3) and width % 3 == 0 and width >= 6
        np.testing.assert_array_equal(batch["sample_mask"].sum(axis=1), [len(d) for d in drawn])
    assert data.poisson_cap(4) == 25 and data.poisson_cap(4, multiple=8) == 32
    rng = np.random.default_rng(1)
    xy = [{"x": rng.normal(size=(n, 6)).astype(np.float32), "y": rng.normal(size=(n, 3)).astype(np.float32)}
          for n in (9, 40)]  # fmt: skip
    toy = data.make_sampled_batches_fn(xy, 4, seed=4, sampling="poisson", cap=5)  # client 0 draws 7
    toy_batches = [toy(0, 0, 2)[0], toy(1, 0, 2)[0]]
    assert toy_batches[0]["sample_mask"].shape != toy_batches[1]["sample_mask"].shape
    params = {"w1": rng.normal(size=(6, 3)).astype(np.float32), "w2": np.zeros((6, 3), np.float32)}
    train = local.make_local_train(_linear_loss, _sgd(0.1, 2), dp=local.DPSGD(1.0, 0.5, expected_batch=4))
    got = train.batched([params, params], [{}, {}], toy_batches)
    for (delta, losses), batch in zip(got, toy_batches, strict=True):
        ref_delta, ref_losses = train(params, {}, batch)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        assert _max_diff(delta, ref_delta) <= 1e-6


def _poisson_buffer(batches, drawn: int):
    """The toy batches as a Poisson buffer whose first `drawn` rows were drawn."""
    mask = (np.arange(batches["x"].shape[1]) < drawn).astype(np.float32)
    return dict(batches, sample_mask=np.broadcast_to(mask, batches["x"].shape[:2]).copy())


def test_poisson_noise_std_is_lr_times_z_times_c_over_the_expected_batch():
    """The issue's noise test with Poisson sampling: 2 of a 12-row buffer drawn, expected batch 4;
    one SGD step's noise has std eta z C / 4 (the expected batch, not the 2 drawn)."""
    params, batches = _toy_problem(b=12)
    lr, z, c = 20.0, 2.0, 1e-4
    train = local.make_local_train(_linear_loss, _sgd(lr, 1), dp=local.DPSGD(c, z, expected_batch=4))
    delta, _ = train(params, {}, _poisson_buffer(batches, 2))
    d = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(delta)])
    expected = lr * z * c / 4
    assert abs(d.std() / expected - 1) < 0.05, (d.std(), expected)


def test_a_poisson_step_sums_the_drawn_examples_only_over_the_expected_batch():
    """z = 0, C huge: the step is eta * (sum of the drawn rows' gradients) / B; the buffer's other
    rows (here real data, not zeros) add nothing. Equal to plain SGD on the drawn rows' mean loss
    scaled by drawn / B."""
    params, batches = _toy_problem(width=8, out=3, b=10)
    lr, drawn, b = 0.05, 3, 4
    train = local.make_local_train(_linear_loss, _sgd(lr, 1), dp=local.DPSGD(1e6, 0.0, expected_batch=b))
    delta, losses = train(params, {}, _poisson_buffer(batches, drawn))
    only = {k: v[:, :drawn] for k, v in batches.items() if k != "noise_key"}
    plain, plain_losses = local.make_local_train(_linear_loss, _sgd(lr * drawn / b, 1))(params, {}, only)
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)  # the loss: the drawn rows' mean
    assert _max_diff(delta, plain) <= 1e-5 * _max_diff(plain, jax.tree.map(np.zeros_like, plain))
    with pytest.raises(ValueError, match="Poisson batches"):
        train(params, {}, batches)  # expected_batch without a mask
    with pytest.raises(ValueError, match="Poisson batches"):
        local.make_local_train(_linear_loss, _sgd(lr, 1), dp=local.DPSGD(1.0, 0.0))(
            params, {}, _poisson_buffer(batches, drawn)
        )
