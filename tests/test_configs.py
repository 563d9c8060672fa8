"""Every shipped config loads; full-size models have the published sizes; overrides are strict."""

import argparse
import glob
import json
import os

import jax
import pytest

from jaxblock import model
from jaxblock.model import config as model_config_lib
from jaxblock.run import config as config_lib
from jaxblock.run import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
# Published sizes: Llama 3.2 3B 3.21B, Llama 3 8B 8.03B, Qwen2.5 1.5B 1.54B; each config's hub model.
PUBLISHED = {"llama3_2_3b": 3.21e9, "llama3_8b": 8.03e9, "qwen2_5_1_5b": 1.54e9}
HUB_MODEL = {"llama3_2_3b": "llama3_2_3b", "llama3_8b": "llama3_8b", "qwen2_5_1_5b": "qwen2_5_1_5b",
             "llama3_2_3b_alpaca": "llama3_2_3b", "llama3_8b_alpaca": "llama3_8b"}  # fmt: skip


def _name(path):
    return os.path.basename(path)[:-3]


def test_the_expected_configs_ship():
    assert {"tiny", *HUB_MODEL} <= {_name(p) for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_config_loads_and_has_the_published_size(path, report):
    config = config_lib.load_config(path)
    cfg = config_lib.model_config(config)
    shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))  # no memory allocated
    n = model.count_params(shapes)
    name = _name(path)
    if name in HUB_MODEL:
        published = PUBLISHED[HUB_MODEL[name]]
        report(f"params {name}: {n / 1e9:.4f}B vs published {published / 1e9:.2f}B")
        assert abs(n - published) / published <= 0.005
    else:
        assert 1e6 <= n <= 2e7, f"{name}: {n} params is not a small CPU model"
    runtime.make_layout(config, jax.devices()[:1])  # the mesh and rules of the config are valid


@pytest.mark.parametrize("name", sorted(HUB_MODEL))
def test_config_dims_equal_the_real_config_json(name):
    """The hub config.json (old `rope_scaling` layout) parses to exactly the shipped model section."""
    with open(os.path.join(ROOT, "tests", "data", "hf_configs", f"{HUB_MODEL[name]}.json")) as f:
        hf = json.load(f)
    config = config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
    ours = config_lib.model_config(config)
    # lora_alpha is the run's LoRA scale (config.lora.alpha), not part of the architecture
    assert model_config_lib.from_hf_config(hf, param_dtype=ours.param_dtype, dtype=ours.dtype) == ours.replace(
        lora_alpha=0.0
    )


def test_overrides_are_typed_and_nested():
    path = os.path.join(ROOT, "configs", "tiny.py")
    config = config_lib.load_config(
        path, ["model.num_layers=2", "model.rope_theta=20000", "model.dtype=bfloat16", "seed=7", "mesh.data=1"]
    )
    assert config.model.num_layers == 2 and config.seed == 7 and config.mesh.data == 1
    assert config.model.rope_theta == 20000.0 and isinstance(config.model.rope_theta, float)
    assert config_lib.model_config(config).dtype == "bfloat16"
    assert config_lib.load_config(path).model.num_layers == 8  # the file itself is untouched


def test_per_client_settings_take_one_value_or_a_list_in_any_order():
    """staleness and the link settings are one value or one per client; a later override may switch."""
    path = os.path.join(ROOT, "configs", "tiny.py")
    slow = "[100,100,100,100,100,100,100,100,100,20]"
    config = config_lib.load_config(path, ["comm.bandwidth_mbps=100", f"comm.bandwidth_mbps={slow}", "staleness=[1,3]"])
    assert config.comm.bandwidth_mbps == eval(slow) and config.staleness == [1, 3]
    config = config_lib.load_config(path, [f"comm.bandwidth_mbps={slow}", "comm.bandwidth_mbps=50MBps", "staleness=2"])
    assert config.comm.bandwidth_mbps == "50MBps" and config.staleness == 2
    with pytest.raises(ValueError, match=r"config.staleness=\[1, -1\]: must be an integer >= 0 or a non-empty list"):
        config_lib.validate(config_lib.load_config(path, ["staleness=[1,2]", "staleness=[1,-1]"]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_layer=2", r"--config.model.num_layer: unknown config key \(known here: .*num_layers"),
        ("optimiser.lr=1", r"--config.optimiser.lr: unknown config key 'optimiser'"),
        ("optimizer.lr=1", r"--config.optimizer.lr: unknown config key \(known here: .*learning_rate"),
        ("model.num_layers=two", r"--config.model.num_layers=two: expected int, got str"),
        ("model.num_layers", r"expected --config.KEY=VALUE"),
    ],
)
def test_bad_override_is_a_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"), [override])


def test_cli_errors_are_one_line(capsys):
    parser = argparse.ArgumentParser()
    tiny = os.path.join(ROOT, "configs", "tiny.py")
    cases = {
        ("--config", tiny, "--config.model.nope=1"): "unknown config key",
        ("--config", "configs/missing.py"): "no such file",
        ("--config", tiny, "--config.model.num_kv_heads=3"): "not a multiple of model.num_kv_heads=3",
        (): "--config FILE is required",
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            runtime.parse_args(parser, list(argv))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "".join(err)
    config, _ = runtime.parse_args(parser, ["--config", tiny, "--config.model.num_layers", "3"])
    assert config.model.num_layers == 3


# The paper's settings per shipped hub config (Section 6.1, Table 1, Table 6, Table 11: ParaBlock's learning
# rate in the experiment's column): (experiment, hub checkpoint, blocks, rounds, learning rate).
PAPER = {
    "llama3_2_3b": ("math", "meta-llama/Llama-3.2-3B", 14, 28, 3e-5),
    "llama3_8b": ("math", "meta-llama/Meta-Llama-3-8B", 16, 32, 3e-6),
    "qwen2_5_1_5b": ("math", "Qwen/Qwen2.5-1.5B-Instruct", 14, 28, 1e-5),  # not in Table 11
    "llama3_2_3b_alpaca": ("alpaca", "meta-llama/Llama-3.2-3B", 14, 28, 1e-6),
    "llama3_8b_alpaca": ("alpaca", "meta-llama/Meta-Llama-3-8B", 16, 32, 1e-5),
}
# Each experiment's data (source, path, sample, partition, Dirichlet alpha) and eval (source, path):
# 50,000 of MathInstruct by Dirichlet(0.6) over `source`, GSM8K; all of Alpaca-GPT4 by Dirichlet(0.1)
# over text clusters, MT-Bench.
EXPERIMENT = {
    "math": (("mathinstruct", "", 50_000, "dirichlet", 0.6), ("gsm8k", "")),
    "alpaca": (("alpaca_gpt4", "", 0, "dirichlet", 0.1), ("mt_bench", "")),
}


def test_every_hub_config_is_checked_against_the_paper():
    assert set(PAPER) == set(HUB_MODEL)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_hub_configs_train_and_evaluate_on_the_papers_experiments(name):
    """Data, partition, eval, clients, blocks, rounds, optimizer and seed as the paper's Section 6.1."""
    config = config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
    experiment, repo, num_blocks, rounds, lr = PAPER[name]
    data, evaluation = EXPERIMENT[experiment]
    d = config.data
    assert (d.source, d.path, d.sample, d.partition, d.alpha) == data
    assert (config.eval.source, config.eval.path, config.eval.num_examples, config.eval.every) == (*evaluation, 0, 0)
    assert config.hf_checkpoint == repo and config.seed == 42
    assert (config.algorithm, config.schedule, config.num_clients, config.rounds) == ("parablock", "random", 10, rounds)
    assert (config.batch_size, config.optimizer.name, config.optimizer.learning_rate) == (4, "adamw", lr)
    assert (config.optimizer.b1, config.optimizer.b2, config.optimizer.eps) == (0.9, 0.999, 1e-6)
    partition = runtime.make_partition(config, config_lib.model_config(config))
    assert partition.num_blocks == num_blocks
    assert not config.blocks.embed_block and not config.blocks.head_block  # the paper's frozen embeddings / head
    config_lib.validate(config)
    with open(os.path.join(ROOT, "configs", f"{name}.py")) as f:
        title = f.read().split('"""')[1].splitlines()[0]
    assert {"math": " on MathInstruct, ", "alpaca": " on Alpaca-GPT4, "}[experiment] in title  # names its experiment
