"""LoRA in the model and the LoRA federated methods: FedIT, FFA-LoRA, FLoRA; PEFT interop."""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from hf_models import hf_logits, make_hf_model
from jax.sharding import PartitionSpec as P
from test_train import ROOT, final_params, read_jsonl, small_config
from transformers import AutoModelForCausalLM

import jaxblock
import jaxblock.model.sharding
from jaxblock import model
from jaxblock.fed import algorithms, blocks, data, lean, local, loop, schedule
from jaxblock.model import lora
from jaxblock.model.config import ModelConfig
from jaxblock.run import config as config_lib
from jaxblock.run import experiment, runtime

CFG = ModelConfig(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
)
ALL = tuple(lora.TARGETS)


def _tokens(batch=2, length=5, vocab=128, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(3, vocab, (batch, length)), jnp.int32)


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a, b)))


def _random_b(params, seed=1, scale=0.1):
    """The adapters with a random (non-zero) B, as after some training (each leaf its own draw)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [
        scale * jax.random.normal(k, x.shape) if lora._path(p).endswith("_lora_b") else x
        for k, (p, x) in zip(keys, leaves, strict=True)
    ])  # fmt: skip


def test_a_fresh_adapter_leaves_the_model_bitwise_unchanged():
    params = model.init(CFG, jax.random.key(0))
    cfg = CFG.replace(lora_alpha=16.0)
    adapted = lora.add(cfg, params, lora.LoraConfig(rank=4, targets=ALL), jax.random.key(1))
    tokens = _tokens()
    np.testing.assert_array_equal(model.forward(cfg, adapted, tokens), model.forward(CFG, params, tokens))
    # and a trained one does change it, by exactly its merged weights
    trained = _random_b(adapted)
    out = model.forward(cfg, trained, tokens)
    assert float(jnp.abs(out - model.forward(CFG, params, tokens)).max()) > 1e-2
    np.testing.assert_allclose(model.forward(CFG, lora.merge(cfg, trained), tokens), out, atol=1e-5)
    with pytest.raises(ValueError, match="lora_alpha=0.0"):
        model.forward(CFG, trained, tokens)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lora_logits_and_peft_export_equal_peft_on_transformers(kind, tmp_path, report):
    from peft import PeftModel

    path = str(tmp_path / "base")
    make_hf_model(kind, path)
    cfg, params = jaxblock.load_hf(path)
    cfg = cfg.replace(lora_alpha=12.0)
    adapted = _random_b(lora.add(cfg, params, lora.LoraConfig(rank=6, targets=ALL), jax.random.key(3)))
    lora.save_peft(cfg, adapted, str(tmp_path / "adapter"), base_model_name_or_path=path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    tokens = np.asarray(_tokens(length=12, vocab=256))
    ours = np.asarray(model.forward(cfg, adapted, tokens))
    diff = np.abs(ours - hf_logits(peft_model, tokens)).max()
    change = np.abs(ours - np.asarray(model.forward(cfg, params, tokens))).max()
    report(f"LoRA {kind}: max |logits diff| vs peft {diff:.1e} (the adapter moves logits by {change:.2f})")
    assert diff <= 1e-4 and change > 1e-2


def _lora_step_jaxpr(block, frozen, cfg):
    batch = {"tokens": _tokens(), "loss_mask": jnp.ones((2, 5), jnp.int32)}
    opt = optax.adamw(1e-3)
    state = opt.init(block)
    fn = lambda b, s: local.train_step(local.lm_loss(cfg), opt, b, frozen, s, batch)  # noqa: E731
    return jax.make_jaxpr(fn)(block, state), state


def _matmul_output_shapes(jaxpr) -> set[tuple[int, ...]]:
    shapes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.add(tuple(eqn.outvars[0].aval.shape))
        for v in eqn.params.values():  # scan, pjit, custom_vjp: their bodies
            inner = getattr(v, "jaxpr", None)
            if inner is not None:
                shapes |= _matmul_output_shapes(getattr(inner, "jaxpr", inner))
    return shapes


def test_a_lora_step_keeps_optimizer_state_and_gradients_to_the_adapters():
    cfg = CFG.replace(lora_alpha=8.0)
    params = lora.add(cfg, model.init(CFG, jax.random.key(0)), lora.LoraConfig(rank=3, targets=ALL), jax.random.key(1))
    fed = algorithms.configure(algorithm="fedit", num_clients=2)
    algo = algorithms.make(fed, cfg, lora.LoraConfig(rank=3, targets=ALL))
    part = algo.partition(params, None)
    block, frozen = part.split(params, 0)
    jaxpr, opt_state = _lora_step_jaxpr(block, frozen, cfg)
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(block))
    mu_shapes = sorted(x.shape for x in jax.tree.leaves(opt_state[0].mu))
    assert adapter_shapes == mu_shapes  # AdamW's moments: one per adapter leaf, none for a base weight
    assert all(lora.is_adapter(lora._path(p)) for p, _ in jax.tree_util.tree_flatten_with_path(block)[0])
    assert len(jax.tree.leaves(block)) == 2 * len(ALL) * CFG.num_layers
    kernels = [x.shape for x in jax.tree.leaves(frozen) if x.ndim >= 2]
    forbidden = (
        {s for s in kernels}
        | {(s[0], int(np.prod(s[1:]))) for s in kernels}
        | {(int(np.prod(s[:-1])), s[-1]) for s in kernels}
    )
    assert not forbidden & _matmul_output_shapes(jaxpr.jaxpr)
    # The check can fail: a full fine-tuning step does compute full-size weight gradients.
    full, _ = _lora_step_jaxpr(model.init(CFG, jax.random.key(0)), {}, CFG)
    assert forbidden & _matmul_output_shapes(full.jaxpr)


# ----------------------------------------------------------------------------- the federated methods


def _problem(num_clients, seed=0, non_iid=True):
    """Tiny LM clients: each client's tokens come from its own slice of the vocabulary (non-IID)."""
    rng = np.random.default_rng(seed)
    clients = []
    for c in range(num_clients):
        lo = 3 + (40 * c if non_iid else 0)
        tokens = rng.integers(lo, lo + 40, (16, 6)).astype(np.int32)
        clients.append({"tokens": tokens, "loss_mask": np.ones_like(tokens)})
    return clients, data.make_batches_fn(clients, 4, seed=seed)


def _trainer(fed, lc, opt, num_clients=None):
    cfg = CFG.replace(lora_alpha=lc.alpha)
    algo = algorithms.make(fed, cfg, lc)
    params = algo.server_params(model.init(CFG, jax.random.key(0)))
    part = algo.partition(params, None)
    clients, batches_fn = _problem(fed.num_clients)
    trainer = loop.make_trainer(
        fed, local.lm_loss(cfg), batches_fn, part, opt, client_sizes=[8, 16, 24, 32][: fed.num_clients], algorithm=algo
    )
    return cfg, algo, params, trainer


def test_fedit_with_one_client_is_centralized_lora_training():
    fed = algorithms.configure(algorithm="fedit", rounds=3, num_clients=1, local_steps=2)
    lc = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    cfg, _, params, trainer = _trainer(fed, lc, optax.sgd(0.5))
    state = lean.init_state(fed, params)
    for _ in range(fed.rounds):
        state, _ = loop.run_round(trainer, state)
    # Centralized: 6 plain SGD steps on the adapters, on the same batches in the same order.
    base, adapters = lora.split(params)
    loss = local.lm_loss(cfg)
    batches, _ = trainer.batches_fn(0, 0, fed.rounds * fed.local_steps)
    for i in range(fed.rounds * fed.local_steps):
        grads = jax.grad(lambda a: loss(blocks.merge(base, a), jax.tree.map(lambda x: x[i], batches)))(adapters)  # noqa: B023
        adapters = jax.tree.map(lambda a, g: a - 0.5 * g, adapters, grads)
    ours = lora.split(state["params"])[1]
    moved = _max_diff(ours, lora.split(params)[1])
    assert moved > 1e-3
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), ours, adapters)
    jax.tree.map(np.testing.assert_array_equal, lora.split(state["params"])[0], base)  # the base stays frozen


def test_ffa_lora_trains_b_only_and_a_stays_at_its_seeded_init():
    fed = algorithms.configure(algorithm="ffa_lora", rounds=2, num_clients=3, local_steps=2)
    lc = lora.LoraConfig(rank=4, alpha=8.0)
    _, _, params, trainer = _trainer(fed, lc, optax.adamw(1e-2))
    assert {b.name for b in trainer.partition.blocks} == {"adapters"}
    state, _ = loop.run(fed, params, trainer.loss_fn, trainer.batches_fn, trainer.partition, optax.adamw(1e-2),
                             algorithm=trainer.algorithm)  # fmt: skip
    before, after = lora.split(params)[1], lora.split(state["params"])[1]
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after), strict=True):
        if lora._path(path).endswith("_lora_a"):
            np.testing.assert_array_equal(x, y)
        else:
            assert float(jnp.abs(y).max()) > 0  # B moved from zero
    # The shared A is the seeded init every client draws: the same key, the same matrix.
    again = lora.add(CFG.replace(lora_alpha=8.0), model.init(CFG, jax.random.key(0)), lc, jax.random.key(lc.init_seed))
    jax.tree.map(np.testing.assert_array_equal, lora.split(again)[1], before)


def test_flora_merges_the_exact_weighted_sum_of_heterogeneous_products(report):
    fed = algorithms.configure(
        algorithm="flora", rounds=1, num_clients=3, local_steps=2, aggregation="samples", eta=1.0
    )
    lc = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "up_proj"), client_ranks=(2, 5, 3))
    cfg, algo, params, trainer = _trainer(fed, lc, optax.adamw(2e-2))
    state, metrics = loop.run_round(trainer, lean.init_state(fed, params))
    assert metrics["aggregated_round"] == 0 and metrics["params_down"] == sum(metrics["params_up"])
    # Each client's trained adapter, recomputed, and the update it should bring: sum_i p_i s_i A_i B_i.
    weights = schedule.aggregation_weights(fed, [0, 1, 2], trainer.client_sizes)
    trained = []
    for c in range(3):
        block, frozen = trainer.partition.split(algo.client_model(params, c, 0), 0)
        batches, _ = trainer.batches_fn(c, 0, fed.local_steps)
        delta, _ = trainer.local_train(block, frozen, batches)
        trained.append(jax.tree.map(jnp.add, block, delta))
        assert jax.tree.leaves(block)[0].shape[-1] == lc.client_ranks[c]
    expected = jax.tree.map(lambda x: x, params)
    for w, c, t in zip(weights, range(3), trained, strict=True):
        expected = lora.add_products(expected, t, w * cfg.lora_alpha / lc.client_ranks[c])
    err = _max_diff(state["params"], expected)
    moved = _max_diff(state["params"], params)
    assert err <= 1e-6 and moved > 1e-4
    # FedIT's average of the factors, mean(A) mean(B), on the same (equal-rank) trained adapters.
    same = lora.LoraConfig(rank=4, alpha=8.0, targets=lc.targets)
    _, algo4, _, trainer4 = _trainer(fed, same, optax.adamw(2e-2))
    exact, fedit = jax.tree.map(lambda x: x, params), None
    factors = []
    for c in range(3):
        block, frozen = trainer4.partition.split(algo4.client_model(params, c, 0), 0)
        delta, _ = trainer4.local_train(block, frozen, trainer4.batches_fn(c, 0, 2)[0])
        factors.append(jax.tree.map(jnp.add, block, delta))
        exact = lora.add_products(exact, factors[-1], weights[c] * 2.0)
    mean = jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs, strict=True)), *factors)
    fedit = lora.add_products(params, mean, 2.0)
    upd_exact = jax.tree.map(jnp.subtract, exact, params)
    upd_fedit = jax.tree.map(jnp.subtract, fedit, params)
    num = sum(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.sum((a - b) ** 2)), upd_exact, upd_fedit)))
    den = sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(upd_exact))
    report(f"FLoRA: merged update vs sum_i p_i s_i A_i B_i (ranks 2,5,3): max err {err:.1e}; "
           f"FedIT's mean(A) mean(B) on non-IID clients is {np.sqrt(num / den):.1%} off the exact sum (relative L2)")  # fmt: skip
    assert num > 0


def test_flora_batched_clients_of_different_ranks_train_apart():
    """sim.client_batch with FLoRA's per-client ranks (2, 5, 2): the rank-2 clients train as one batch,
    the rank-5 one alone (different shapes do not stack); the round equals one by one."""
    fed = algorithms.configure(algorithm="flora", rounds=1, num_clients=3, local_steps=2)
    lc = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), client_ranks=(2, 5, 2))
    _, _, params, trainer = _trainer(fed, lc, optax.adamw(2e-2))
    one, _ = loop.run_round(trainer, lean.init_state(fed, params))
    batched = dataclasses.replace(trainer, client_batch=3)
    many, metrics = loop.run_round(batched, lean.init_state(fed, params))
    assert _max_diff(many["params"], one["params"]) <= 1e-5 and _max_diff(one["params"], params) > 1e-4
    assert set(metrics["client_compute_s"]) == {0, 1, 2}


# ----------------------------------------------------------------------------- runs: resume, export

LORA_RUN = ["lora.rank=4", "lora.alpha=8.0", "model.vocab_size=512", f"data.tokenizer={ROOT}/assets/tiny_base"]


class _Killed(Exception):
    pass


@pytest.mark.parametrize("algorithm", ["fedit", "flora"])
def test_a_lora_run_stopped_mid_way_resumes_to_bit_identical_adapters(algorithm, tmp_path, monkeypatch, capsys):
    ranks = ["lora.client_ranks=[2, 4, 3]"] if algorithm == "flora" else []
    config = small_config("rounds=4", f"algorithm={algorithm}", *LORA_RUN, *ranks)
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    experiment.train(config, straight, progress=False)
    run_round, calls = loop.run_round, []

    def dies_in_round_2(trainer, state):  # as a kill would: after round 1's checkpoint, mid round 2
        calls.append(state["round"])
        if state["round"] == 2:
            raise _Killed
        return run_round(trainer, state)

    monkeypatch.setattr(loop, "run_round", dies_in_round_2)
    with pytest.raises(_Killed):
        experiment.train(config, stopped, progress=False)
    # In a process that lives on, orbax finishes the step-2 save it had started: wait for it, as a
    # rerun after a real kill would find it complete or not at all.
    deadline = time.time() + 30
    while not os.path.isdir(os.path.join(stopped, "checkpoints", "2")) and time.time() < deadline:
        time.sleep(0.05)
    monkeypatch.setattr(loop, "run_round", run_round)
    capsys.readouterr()
    experiment.train(config, stopped, progress=False)
    assert "from round 2 (checkpoint step 2)" in capsys.readouterr().out
    (step_a, a), (step_b, b) = final_params(straight), final_params(stopped)
    assert step_a == step_b == 4 and calls == [0, 1, 2]
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert lora.has_adapters(a) == (algorithm == "fedit")  # FLoRA merges every round's adapters
    _, cfg, restored, step = experiment.restore_model(stopped)  # as eval.py and export_hf.py read it
    assert step == 4 and cfg.lora_alpha == 8.0
    jax.tree.map(np.testing.assert_array_equal, restored, b)
    # The link model counts what crosses the wire: FLoRA's download is every client's adapter.
    rows = read_jsonl(os.path.join(straight, "timeline.jsonl"))

    def adapter_bytes(r):  # float32, 2 layers x (q_proj: 64 -> 4 x 16, v_proj: 64 -> 2 x 16)
        return 4 * 2 * r * ((64 + 64) + (64 + 32))

    ups = [adapter_bytes(r) for r in (2, 4, 3)] if algorithm == "flora" else [adapter_bytes(4)] * 3
    assert [r["bytes_up"] for r in rows[:3]] == ups
    assert {r["bytes_down"] for r in rows} == {sum(ups) if algorithm == "flora" else ups[0]}


def test_lora_runs_export_merged_and_as_a_peft_adapter(tmp_path, report):
    from peft import PeftModel

    workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
    config = small_config("rounds=2", "algorithm=fedit", *LORA_RUN, "lora.targets=['q_proj', 'k_proj', 'down_proj']")
    experiment.train(config, workdir, progress=False)
    experiment.export_hf(workdir, out)
    _, cfg, params, _ = experiment.restore_model(workdir)
    assert lora.has_adapters(params) and cfg.lora_alpha == 8.0
    base_dir = str(tmp_path / "base")  # the run's base model (a seeded random init) as transformers reads it
    jaxblock.save_hf(*runtime.load_model(config), base_dir)
    tokens = np.asarray(_tokens(length=9, vocab=512))
    ours = np.asarray(model.forward(cfg, params, tokens))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    d_merged, d_peft = np.abs(hf_logits(merged, tokens) - ours).max(), np.abs(hf_logits(adapted, tokens) - ours).max()
    report(f"FedIT export: max |logits diff| vs jaxblock: merged checkpoint {d_merged:.1e}, PEFT adapter {d_peft:.1e}")
    assert d_merged <= 1e-4 and d_peft <= 1e-4
    assert np.abs(ours - np.asarray(model.forward(cfg, lora.split(params)[0], tokens))).max() > 1e-4  # it trained


def test_adapter_leaves_have_shardings_from_their_kernels_axes():
    config = small_config("algorithm=fedit", "lora.targets=['q_proj', 'o_proj', 'down_proj']")
    cfg = config_lib.model_config(config)
    axes = runtime.logical_axes(config, cfg)
    assert jax.tree.structure(axes) == jax.tree.structure(runtime.server_shapes(config, cfg))
    layout = jaxblock.model.sharding.Layout(jaxblock.model.sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
                                      jaxblock.model.sharding.rules_from_config(config.rules))  # fmt: skip
    specs = jax.tree.map(lambda s: s.spec, layout.tree_shardings(axes)["layers_0"])
    attn, mlp = specs["self_attn"], specs["mlp"]
    assert attn["q_proj_lora_a"] == P("fsdp", None) and attn["q_proj_lora_b"] == P(None, "tensor")
    assert attn["o_proj_lora_a"] == P("tensor", None) and attn["o_proj_lora_b"] == P(None, "fsdp")
    assert mlp["down_proj_lora_a"] == P("tensor", None) and mlp["down_proj_lora_b"] == P(None, "fsdp")


def test_fedit_in_the_threaded_runtime_equals_the_simulator():
    from jaxblock.net import comm, transport

    fed = algorithms.configure(algorithm="fedit", rounds=2, num_clients=2, local_steps=2)
    lc = lora.LoraConfig(rank=2, alpha=4.0)
    cfg, algo, params, trainer = _trainer(fed, lc, optax.adamw(1e-2))
    server, replicas = comm.run_in_threads(
        fed, params, trainer.partition, trainer.local_train, trainer.batches_fn, transport.Store("memory://"),
        comm.CommConfig(timeout_s=30.0), algorithm=algo,
    )  # fmt: skip
    sim, _ = loop.run(fed, params, trainer.loss_fn, trainer.batches_fn, trainer.partition, optax.adamw(1e-2),
                           algorithm=algo)  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(server), jax.device_get(sim["params"]))
    assert _max_diff(server, params) > 0 and all(_max_diff(r, server) == 0 for r in replicas.values())


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.targets=['q_proj', 'qkv']", r"lora.targets: unknown \['qkv'\]"),
        ("lora.client_ranks=[2, 4]", r"lora.client_ranks has 2 ranks for num_clients=3"),
        ("lora.rank=0", r"config.lora.rank=0: must be an integer >= 1"),
        ("algorithm=fedit", r"lora.client_ranks is FLoRA's: algorithm='fedit' gives every client lora.rank"),
        ("lora.client_ranks=[2, 0, 1]", r"every rank must be >= 1"),
    ],
)
def test_bad_lora_settings_are_one_line_errors(override, message):
    config = small_config("algorithm=flora", "lora.client_ranks=[1, 2, 3]", override)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)
        runtime.make_partition(config, config_lib.model_config(config))


def test_a_run_config_from_before_newer_keys_still_builds_its_model_and_partition():
    """eval.py / export_hf.py on a workdir whose config.json predates lr_decay, wire_dtype and lora."""
    config = small_config()
    for key in ("lr_decay", "lr_decay_alpha", "wire_dtype", "lora"):
        del config[key]
    fed = runtime.fed_config(config)
    assert (fed.lr_decay, fed.wire_dtype) == ("none", "float32")
    cfg = config_lib.model_config(config)
    assert cfg.lora_alpha == 0.0 and runtime.make_partition(config, cfg).num_blocks == 2
