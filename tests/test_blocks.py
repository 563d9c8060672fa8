"""Block partitions: coverage, layer grouping, half-layers, split/merge."""

import jax
import numpy as np
import pytest

from jaxblock import model
from jaxblock.fed import blocks
from jaxblock.model.config import ModelConfig
from jaxblock.run import runtime
from jaxblock.run.config import load_config, model_config

CFG = ModelConfig(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=6, num_heads=4, num_kv_heads=2, head_dim=8
)


@pytest.fixture(scope="module")
def params():
    return model.init(CFG, jax.random.key(0))


def _leaf_paths(tree):
    return {blocks.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_llama3_2_3b_has_14_blocks_of_2_layers():
    config = load_config("configs/llama3_2_3b.py")
    part = runtime.make_partition(config, model_config(config))
    assert part.num_blocks == 14
    assert [b.layers for b in part.blocks] == [(2 * i, 2 * i + 1) for i in range(14)]
    assert {len(b.paths) for b in part.blocks} == {18}  # 2 layers x (7 kernels + 2 norms)
    assert {b.params for b in part.blocks} == {201_338_880}
    assert {b.bytes for b in part.blocks} == {2 * 201_338_880}  # bfloat16
    frozen = [x for x in jax.tree.leaves(part.labels) if x == blocks.FROZEN]
    assert len(frozen) == 2  # tied embeddings + final norm


@pytest.mark.parametrize("layers_per_block, expected", [(1, [(i,) for i in range(6)]), (4, [(0, 1, 2, 3), (4, 5)])])
def test_layers_per_block(params, layers_per_block, expected):
    part = blocks.partition(params, blocks.llm_block_rules(CFG.num_layers, layers_per_block))
    assert [b.layers for b in part.blocks] == expected


def test_partial_splits_each_layer_into_attention_and_mlp(params):
    part = blocks.partition(params, blocks.llm_block_rules(CFG.num_layers, 1, partial=True))
    assert part.num_blocks == 2 * CFG.num_layers
    attn, mlp = part.blocks[4], part.blocks[5]  # layer 2
    assert attn.layers == mlp.layers == (2,)
    assert all(p.startswith(("layers_2/self_attn/", "layers_2/input_layernorm/")) for p in attn.paths)
    assert all(p.startswith(("layers_2/mlp/", "layers_2/post_attention_layernorm/")) for p in mlp.paths)
    assert set(attn.paths) | set(mlp.paths) == _leaf_paths({"layers_2": params["layers_2"]})
    with pytest.raises(ValueError, match="set blocks.layers_per_block=1"):
        blocks.llm_block_rules(CFG.num_layers, 2, partial=True)


def test_embeddings_and_head_are_frozen_unless_asked(params):
    frozen_default = blocks.partition(params, blocks.llm_block_rules(CFG.num_layers, 2))
    assert frozen_default.labels["embed_tokens"] == blocks.FROZEN
    assert frozen_default.labels["lm_head"] == blocks.FROZEN and frozen_default.labels["norm"]["scale"] == blocks.FROZEN
    part = blocks.partition(params, blocks.llm_block_rules(CFG.num_layers, 2, embed_block=True, head_block=True))
    assert [b.name for b in part.blocks] == ["embeddings", "layers 0-1", "layers 2-3", "layers 4-5", "head"]
    assert set(part.blocks[-1].paths) == {"norm/scale", "lm_head"}
    assert not any(x == blocks.FROZEN for x in jax.tree.leaves(part.labels))


def test_every_leaf_must_be_covered(params):
    with pytest.raises(ValueError, match="leaf 'layers_5/input_layernorm/scale' is covered by no rule"):
        blocks.partition(params, [(r"layers_[0-4]/.*", "some"), ("embed_tokens|lm_head|norm/scale", None)])
    with pytest.raises(ValueError, match="block 'ghost' matches no leaf"):
        blocks.partition(params, [("nothing", "ghost"), (".*", "all")])


def test_split_and_merge_round_trip(params):
    part = blocks.partition(params, blocks.llm_block_rules(CFG.num_layers, 2))
    for b in range(part.num_blocks):
        block, frozen = part.split(params, b)
        assert _leaf_paths(block) == set(part.blocks[b].paths)
        assert not _leaf_paths(block) & _leaf_paths(frozen)
        jax.tree.map(np.testing.assert_array_equal, blocks.merge(block, frozen), params)
        assert sum(bool(m) for m in jax.tree.leaves(part.mask(b))) == len(part.blocks[b].paths)
    with pytest.raises(ValueError, match="block 3: the partition has blocks 0..2"):
        part.split(params, 3)
    with pytest.raises(ValueError, match="in both trees"):
        blocks.merge(params, params)


def test_full_partition_is_one_block(params):
    part = blocks.full_partition(params)
    block, frozen = part.split(params, 0)
    assert part.num_blocks == 1 and frozen == {} and block.keys() == params.keys()
    assert part.blocks[0].params == model.count_params(params)
