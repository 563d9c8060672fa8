"""Explicit shardings on 8 fake CPU devices give the same numbers as one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxblock import model
from jaxblock.model.config import ModelConfig
from jaxblock.model.sharding import Layout, make_mesh
from jaxblock.run import runtime

CFG = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, model_type="qwen2", qkv_bias=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def layout():
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    return Layout(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))


def test_params_are_created_sharded(layout):
    params = runtime.init_params(CFG, jax.random.key(0), layout)
    q = params["layers_0"]["self_attn"]["q_proj"]  # [D,N,H] = [embed, heads, head_dim]
    assert q.sharding.spec == PartitionSpec("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (32, 2, 16)  # really split, not replicated
    assert params["embed_tokens"].sharding.spec == PartitionSpec("tensor", "fsdp")


def test_sharded_forward_equals_single_device(layout, report):
    params = runtime.init_params(CFG, jax.random.key(0), layout)
    single = jax.device_put(params, jax.devices()[0])
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, CFG.vocab_size)
    ref = np.asarray(model.forward(CFG, single, tokens))

    param_shardings = layout.tree_shardings(model.logical_axes(CFG))
    batch_sharding = layout.sharding(("activation_batch", "activation_length"))
    sharded_forward = jax.jit(
        lambda p, t: model.forward(CFG, p, t, layout=layout),
        in_shardings=(param_shardings, batch_sharding),
        out_shardings=layout.sharding(("activation_batch", "activation_length", "activation_vocab")),
    )
    out = sharded_forward(params, jax.device_put(tokens, batch_sharding))
    assert out.sharding.spec == PartitionSpec(("data", "fsdp"), None, "tensor")
    diff = np.abs(np.asarray(out) - ref).max()
    report(f"sharding: 8-device (data 2, fsdp 2, tensor 2) forward vs 1 device, max |logits diff| = {diff:.2e}")
    assert diff <= 1e-5


def test_load_hf_places_params_on_the_mesh(layout, tmp_path):
    import jaxblock

    params = runtime.init_params(CFG, jax.random.key(2))
    jaxblock.save_hf(CFG, params, str(tmp_path))
    _, loaded = jaxblock.load_hf(str(tmp_path), layout=layout)
    down = loaded["layers_1"]["mlp"]["down_proj"]  # [F,D] = [mlp, embed]
    assert isinstance(down.sharding, NamedSharding) and down.sharding.spec == PartitionSpec("tensor", "fsdp")
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_sharded_generation_equals_single_device(layout):
    import jaxblock

    params = runtime.init_params(CFG, jax.random.key(3), layout)
    prompts = jax.random.randint(jax.random.key(4), (4, 5), 0, CFG.vocab_size)
    ours = jaxblock.generate(CFG, params, prompts, 8, layout=layout)
    ref = jaxblock.generate(CFG, jax.device_put(params, jax.devices()[0]), prompts, 8)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_mesh_errors():
    with pytest.raises(ValueError, match="needs 6 devices, have 8"):
        make_mesh({"data": 2, "fsdp": 3, "tensor": 1})
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        make_mesh({"data": -1, "fsdp": -1})
    assert dict(make_mesh({"data": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert jnp.zeros(()).shape == ()
