"""Numerical parity with transformers' PyTorch Llama/Qwen2, and HF checkpoint round trips."""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
from hf_models import KINDS, hf_config, hf_greedy, hf_logits, make_hf_model
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import jaxblock
from jaxblock import model

TOL = 1e-4


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    hf_model = make_hf_model(request.param, path)
    cfg, params = jaxblock.load_hf(path)
    return request.param, path, hf_model, cfg, params


def _tokens(batch=2, length=24, vocab=256, seed=0):
    return np.random.RandomState(seed).randint(3, vocab, (batch, length)).astype(np.int32)


def test_logits_match_transformers(checkpoint, report):
    kind, _, hf_model, cfg, params = checkpoint
    tokens = _tokens()
    diff = np.abs(np.asarray(jaxblock.forward(cfg, params, tokens)) - hf_logits(hf_model, tokens)).max()
    # Far positions make the low RoPE frequencies (the ones llama3 scaling rescales) matter.
    positions = np.broadcast_to(5000 + np.arange(tokens.shape[1]), tokens.shape)
    ours_far = np.asarray(jaxblock.forward(cfg, params, tokens, jnp.asarray(positions)))
    diff_far = np.abs(ours_far - hf_logits(hf_model, tokens, positions)).max()
    report(f"parity {kind}: max |logits diff| fp32 = {diff:.2e} (positions 0..23), {diff_far:.2e} (positions 5000..)")
    assert diff <= TOL and diff_far <= TOL


def test_save_hf_then_transformers_gives_same_logits(checkpoint, tmp_path, report):
    kind, _, hf_model, cfg, params = checkpoint
    jaxblock.save_hf(cfg, params, str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokens = _tokens(seed=1)
    diff = np.abs(hf_logits(reloaded, tokens) - hf_logits(hf_model, tokens)).max()
    report(f"save_hf {kind}: transformers on the saved checkpoint vs the original, max |logits diff| = {diff:.2e}")
    assert diff <= TOL


def test_greedy_generation_matches_transformers(checkpoint, report):
    kind, _, hf_model, cfg, params = checkpoint
    prompts = _tokens(batch=2, length=6, seed=2)
    ours = np.asarray(jaxblock.generate(cfg, params, prompts, 20))
    ref = hf_greedy(hf_model, prompts, 20)
    same = int((ours == ref).all(axis=0).sum())
    report(f"generate {kind}: {same}/20 greedy tokens equal to transformers (batch of 2)")
    assert same == 20, f"ours {ours.tolist()} vs transformers {ref.tolist()}"


def test_left_padded_batch_generation_matches_transformers(tmp_path):
    hf_model = make_hf_model("llama", str(tmp_path))
    cfg, params = jaxblock.load_hf(str(tmp_path))
    prompts = _tokens(batch=3, length=7, seed=3)
    mask = np.ones(prompts.shape, bool)
    mask[0, :3] = False  # row 0 has a 4-token prompt, row 1 a 6-token prompt
    mask[1, :1] = False
    prompts[~mask] = 0
    ours = np.asarray(jaxblock.generate(cfg, params, prompts, 12, prompt_mask=mask))
    ref = hf_greedy(hf_model, prompts, 12, mask)
    np.testing.assert_array_equal(ours, ref)
    # And each padded row decodes exactly as it would alone, unpadded.
    alone = np.asarray(jaxblock.generate(cfg, params, prompts[:1, 3:], 12))
    np.testing.assert_array_equal(ours[:1], alone)


def test_generation_stops_at_eos(checkpoint):
    _, _, _, cfg, params = checkpoint
    prompts = _tokens(batch=2, length=6, seed=2)
    free = np.asarray(jaxblock.generate(cfg, params, prompts, 10))
    eos = int(free[0, 3])  # pretend the 4th token of row 0 is EOS
    stopped = np.asarray(jaxblock.generate(cfg, params, prompts, 10, eos_token_id=eos, pad_token_id=255))
    first = int(np.argmax(free[0] == eos))
    np.testing.assert_array_equal(stopped[0, : first + 1], free[0, : first + 1])
    assert (stopped[0, first + 1 :] == 255).all()


@pytest.mark.parametrize("kind", ["llama", "llama3_tied"])
def test_rope_frequencies_match_transformers(kind):
    hf = hf_config(kind)
    ref, _ = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf) if kind != "llama" else (None, None)
    cfg = jaxblock.model.config.from_hf_config(hf.to_dict())
    ours = model.rope_inv_freq(cfg)
    if ref is None:  # default RoPE: the plain formula
        h = hf.head_dim
        ref = 1.0 / (hf.rope_parameters["rope_theta"] ** (torch.arange(0, h, 2).float() / h))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    if kind == "llama3_tied":  # the scaling must really change some frequencies
        plain = 1.0 / (500000.0 ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim))
        assert np.abs(ours / plain - 1).max() > 0.5


def test_hub_config_layout_loads_the_same(checkpoint, tmp_path):
    """Llama 3.x on the hub: `rope_scaling` plus a top-level `rope_theta` (no `rope_parameters`)."""
    kind, path, _, cfg, params = checkpoint
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    hf["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    old = tmp_path / "old_layout"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(hf))
    os.symlink(os.path.join(path, "model.safetensors"), old / "model.safetensors")
    cfg_old, params_old = jaxblock.load_hf(str(old))
    assert cfg_old == cfg
    assert cfg_old.rope_theta == {"llama": 1e4, "llama3_tied": 5e5, "qwen2": 1e6}[kind]
    jax.tree.map(np.testing.assert_array_equal, params_old, params)


def test_sharded_safetensors_round_trip(checkpoint, tmp_path):
    kind, _, hf_model, cfg, params = checkpoint
    jaxblock.save_hf(cfg, params, str(tmp_path), max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (tmp_path / "model.safetensors").exists()
    cfg2, params2 = jaxblock.load_hf(str(tmp_path))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokens = _tokens(seed=4)
    assert np.abs(hf_logits(reloaded, tokens) - hf_logits(hf_model, tokens)).max() <= TOL


def test_bfloat16_dtype_policy(checkpoint, report):
    kind, path, _, cfg, params = checkpoint
    cfg16, params16 = jaxblock.load_hf(path, param_dtype="bfloat16", dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    tokens = _tokens(seed=5)
    ref = np.asarray(jaxblock.forward(cfg, params, tokens))
    out = jaxblock.forward(cfg16, params16, tokens)
    assert out.dtype == jnp.float32  # logits are always float32
    rel = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
    agree = (np.asarray(out).argmax(-1) == ref.argmax(-1)).mean()
    report(f"bf16 {kind}: max |logits diff| / max |logit| = {rel:.3f}, argmax agreement {agree:.0%}")
    assert rel < 0.05 and agree > 0.9
    # bf16 params are stored as bf16 by save_hf
    out_dir = os.path.join(path, "bf16")
    jaxblock.save_hf(cfg16, params16, out_dir)
    with safe_open(os.path.join(out_dir, "model.safetensors"), framework="numpy") as f:
        assert f.get_tensor("model.norm.weight").dtype == ml_dtypes.bfloat16


def test_load_hf_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        jaxblock.load_hf(str(tmp_path))
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        jaxblock.load_hf(str(tmp_path / "missing"))
    make_hf_model("llama", str(tmp_path))
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"\[.mlp.\].*has shape .* config wants"):
        jaxblock.load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        jaxblock.load_hf(str(tmp_path))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny llama checkpoint as one model.safetensors and as two shards, to copy and damage."""
    single = str(tmp_path_factory.mktemp("single"))
    make_hf_model("llama", single)
    sharded = str(tmp_path_factory.mktemp("sharded"))
    jaxblock.save_hf(*jaxblock.load_hf(single), sharded, max_shard_bytes=256 * 1024)
    return {"single": single, "sharded": sharded}


def _edit_json(file, edit):
    with open(file) as f:
        data = json.load(f)
    with open(file, "w") as f:
        json.dump(edit(data), f)


def _edit_tensor(file, name, edit):
    with safe_open(file, framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    tensors[name] = edit(tensors[name])
    save_file(tensors, file, metadata={"format": "pt"})


def _overwrite(file, offset, data):
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _with_value(x, value, dtype=np.float32):
    x = x.astype(dtype)
    x.flat[7] = value
    return x


def _to_fp8(file, name):
    tensors = safetensors.torch.load_file(file)
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})


UP0 = "model.layers.0.mlp.up_proj.weight"
SHARD2 = "model-00002-of-00002.safetensors"
NOT_SAFETENSORS = "the file is truncated or not a safetensors file"
# (layout, damage to the copy in directory d, param_dtype, the error with {d} for the directory)
DAMAGES = {
    "config_not_json": (
        "single",
        lambda d: pathlib.Path(d, "config.json").write_text('{"hidden_size": 64,'),
        "float32",
        "hf_checkpoint {d}/config.json: not valid JSON (Expecting property name enclosed in double quotes:"
        " line 1 column 20 (char 19))",
    ),
    "config_not_object": (
        "single",
        lambda d: pathlib.Path(d, "config.json").write_text("[]"),
        "float32",
        "hf_checkpoint {d}/config.json: not a JSON object",
    ),
    "config_missing_key": (
        "single",
        lambda d: _edit_json(f"{d}/config.json", lambda c: {k: v for k, v in c.items() if k != "hidden_size"}),
        "float32",
        "hf_checkpoint {d}/config.json: missing 'hidden_size'",
    ),
    "config_wrong_type": (
        "single",
        lambda d: _edit_json(f"{d}/config.json", lambda c: {**c, "hidden_size": "64"}),
        "float32",
        "hf_checkpoint {d}/config.json: a value has the wrong type"
        " ('<' not supported between instances of 'str' and 'int')",
    ),
    "index_not_json": (
        "sharded",
        lambda d: _overwrite(f"{d}/model.safetensors.index.json", 0, b"\x00\x01"),
        "float32",
        "hf_checkpoint {d}/model.safetensors.index.json: not valid JSON (Expecting value: line 1 column 1 (char 0))",
    ),
    "index_without_weight_map": (
        "sharded",
        lambda d: _edit_json(f"{d}/model.safetensors.index.json", lambda i: {"metadata": i["metadata"]}),
        "float32",
        "hf_checkpoint {d}/model.safetensors.index.json: needs a 'weight_map' object (tensor name -> file name)",
    ),
    "shard_missing": (
        "sharded",
        lambda d: os.remove(f"{d}/{SHARD2}"),
        "float32",
        f"hf_checkpoint {{d}}/{SHARD2}: missing (model.safetensors.index.json names it)",
    ),
    "truncated_to_half": (
        "single",
        lambda d: os.truncate(f"{d}/model.safetensors", os.path.getsize(f"{d}/model.safetensors") // 2),
        "float32",
        "hf_checkpoint {d}/model.safetensors: cannot be read"
        f" (Error while deserializing header: incomplete metadata, file not fully covered): {NOT_SAFETENSORS}",
    ),
    "garbage_first_bytes": (
        "single",
        lambda d: _overwrite(f"{d}/model.safetensors", 0, b"GARBAGE!"),
        "float32",
        f"hf_checkpoint {{d}}/model.safetensors: cannot be read"
        f" (Error while deserializing header: header too large): {NOT_SAFETENSORS}",
    ),
    "shard_truncated": (  # fails while loading tensors, after shard 1 was read
        "sharded",
        lambda d: os.truncate(f"{d}/{SHARD2}", os.path.getsize(f"{d}/{SHARD2}") - 100),
        "float32",
        f"hf_checkpoint {{d}}/{SHARD2}: cannot be read"
        f" (Error while deserializing header: incomplete metadata, file not fully covered): {NOT_SAFETENSORS}",
    ),
    "nan_weight": (
        "single",
        lambda d: _edit_tensor(f"{d}/model.safetensors", UP0, lambda x: _with_value(x, np.nan)),
        "float32",
        f"hf_checkpoint {{d}}: tensor {UP0} in model.safetensors has NaN/Inf: the base model is damaged",
    ),
    "inf_bf16_weight_in_a_shard": (  # bfloat16 all the way: the exponent-bits check
        "sharded",
        lambda d: _edit_tensor(
            f"{d}/{SHARD2}", "model.norm.weight", lambda x: _with_value(x, -np.inf, ml_dtypes.bfloat16)
        ),
        "bfloat16",
        f"hf_checkpoint {{d}}: tensor model.norm.weight in {SHARD2} has NaN/Inf: the base model is damaged",
    ),
    "float16_overflow": (
        "single",
        lambda d: _edit_tensor(f"{d}/model.safetensors", UP0, lambda x: _with_value(x, 1e5)),
        "float16",
        f"hf_checkpoint {{d}}: tensor {UP0} in model.safetensors overflows param_dtype=float16 (max |value| 1e+05)",
    ),
    "fp8_weight": (
        "single",
        lambda d: _to_fp8(f"{d}/model.safetensors", UP0),
        "float32",
        f"hf_checkpoint {{d}}: tensor {UP0} in model.safetensors has dtype F8_E4M3: load_hf reads BF16, F16, F32, F64",
    ),
    "shape_does_not_fit_config": (
        "single",
        lambda d: _edit_json(f"{d}/config.json", lambda c: {**c, "hidden_size": 32}),
        "float32",
        "hf_checkpoint {d}: tensor model.layers.0.self_attn.q_proj.weight in model.safetensors has shape (96, 64),"
        " which config.json does not describe (cannot reshape array of size 6144 into shape (32,4,24))",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_load_hf_damaged_checkpoint_names_the_file(damage, pristine, tmp_path):
    layout, spoil, param_dtype, message = DAMAGES[damage]
    d = str(tmp_path / "ckpt")
    shutil.copytree(pristine[layout], d)
    spoil(d)
    with pytest.raises(ValueError) as e:
        jaxblock.load_hf(d, param_dtype=param_dtype, dtype=param_dtype)
    assert str(e.value) == message.format(d=d)
    assert "\n" not in str(e.value)
