"""Wiring shared by the scripts: a Layout from a run config, sharded init, model loading."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import ml_collections

from jaxblock import model
from jaxblock.fed import algorithms, blocks, transforms
from jaxblock.fed.local import OptimizerConfig
from jaxblock.fed.loop import FedConfig
from jaxblock.fed.validate import Policy
from jaxblock.model import hf_io, lora
from jaxblock.model.config import ModelConfig
from jaxblock.model.hf_io import load_hf
from jaxblock.model.sharding import Layout, make_mesh, rules_from_config
from jaxblock.run.config import load_config, model_config, split_config_args, validate


def make_layout(config: ml_collections.ConfigDict, devices=None) -> Layout:
    """The mesh (`config.mesh`) and logical-axis rules (`config.rules`) of a run config."""
    return Layout(make_mesh(config.mesh.to_dict(), devices), rules_from_config(config.rules))


CACHE_MIN_COMPILE_S = 0.2  # quicker compiles are not worth a file: axpy, weighted sums, ...
CACHE_MAX_BYTES = 4 << 30  # the cache evicts its least recently used executables beyond this


def cache_dir(setting: str) -> str | None:
    """The persistent compilation cache's directory for `compilation_cache_dir`: '' = the user cache,
    ($XDG_CACHE_HOME or ~/.cache)/jaxblock/xla; 'off' = None (no cache); else the path itself."""
    if setting == "off":
        return None
    if setting:
        return os.path.expanduser(setting)
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxblock", "xla")


def setup_jax(config: ml_collections.ConfigDict) -> None:
    """Process-wide JAX settings from the run config: the persistent compilation cache, so that a
    resumed or repeated run, its evaluation, and every other run of the same shapes load their
    executables instead of compiling them again (the cache key is the program, the compiler
    options and the devices: it never serves a stale executable)."""
    path = cache_dir(config.get("compilation_cache_dir", ""))
    if path is None:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)


def make_partition(config: ml_collections.ConfigDict, cfg: ModelConfig) -> blocks.Partition:
    """What the run's algorithm trains, as blocks, from param shapes alone (no weights loaded): the
    layer blocks of `config.blocks` for ParaBlock/FedBCD, one block of everything for Fed full FT,
    the adapters for the LoRA methods."""
    algo = make_algorithm(config, cfg)
    base = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
    return algo.partition(jax.eval_shape(algo.server_params, base), layer_partition(config, cfg, base))


def layer_partition(config: ml_collections.ConfigDict, cfg: ModelConfig, params=None) -> blocks.Partition:
    """The decoder's layer blocks of `config.blocks` (blocks.llm_block_rules) over `params` (the
    model's arrays or shapes; default: its shapes)."""
    params = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0))) if params is None else params
    return blocks.partition(params, blocks.llm_block_rules(cfg.num_layers, **config.blocks.to_dict()))


def server_shapes(config: ml_collections.ConfigDict, cfg: ModelConfig) -> dict:
    """ShapeDtypeStructs of the run's server model (the base model, plus adapters for FedIT/FFA-LoRA)."""
    algo = make_algorithm(config, cfg)
    return jax.eval_shape(lambda: algo.server_params(model.init(cfg, jax.random.key(0))))


def fed_config(config: ml_collections.ConfigDict) -> FedConfig:
    """The federated algorithm's settings, from the run config's top-level keys (a key that a run
    written before it existed lacks takes its default, as `check_same_run` assumes)."""
    keys = (*algorithms.SHARED, *algorithms.OWN_KEYS, *transforms.SETTINGS)
    return algorithms.configure(**{k: config[k] for k in keys if k in config})


def policy(config: ml_collections.ConfigDict) -> Policy:
    """Which uploads are accepted (`comm.min_clients`, `comm.max_*`, `comm.on_bad_update`); a run
    written before these keys existed takes the defaults."""
    names = [f.name for f in dataclasses.fields(Policy)]
    return Policy(**{n: config.comm[n] for n in names if n in config.comm})


def lora_config(config: ml_collections.ConfigDict) -> lora.LoraConfig:
    if "lora" not in config:  # a run written before the LoRA methods existed
        return lora.LoraConfig()
    d = config.lora.to_dict()
    return lora.LoraConfig(**{**d, "targets": tuple(d["targets"]), "client_ranks": tuple(d["client_ranks"])})


def make_algorithm(config: ml_collections.ConfigDict, cfg: ModelConfig) -> algorithms.Algorithm:
    """The run's algorithm (`config.algorithm`), bound to its model and `lora` section."""
    return algorithms.make(fed_config(config), cfg, lora_config(config))


def logical_axes(config: ml_collections.ConfigDict, cfg: ModelConfig) -> dict:
    """Logical PartitionSpecs of every leaf a run's models have: the decoder's, and the adapters'
    of a LoRA method (any rank: the rank axis is never sharded)."""
    axes = model.logical_axes(cfg)
    if algorithms.REGISTRY[config.algorithm].uses_lora:
        axes = blocks.merge(axes, lora.logical_axes(cfg, lora_config(config)))
    return axes


def optimizer_config(config: ml_collections.ConfigDict) -> OptimizerConfig:
    return OptimizerConfig(**config.optimizer.to_dict())


def init_params(cfg: ModelConfig, rng: jax.Array, layout: Layout | None = None) -> dict:
    """Random params, created directly in their shardings (no full copy on any one device)."""
    if layout is None:
        return jax.jit(model.init, static_argnums=0)(cfg, rng)
    shardings = layout.tree_shardings(model.logical_axes(cfg))
    return jax.jit(model.init, static_argnums=0, out_shardings=shardings)(cfg, rng)


def load_model(config: ml_collections.ConfigDict, layout: Layout | None = None) -> tuple[ModelConfig, dict]:
    """The run's model: `config.hf_checkpoint` if set, else a seeded random init from `config.model`.

    With a checkpoint, its config.json defines the model: `config.model` must say the same (only
    the dtypes are the run's choice), so that a `--config.model.*` override is never silently
    ignored and the run's config.json records the model it trained.
    """
    cfg = model_config(config)
    if not config.hf_checkpoint:
        return cfg, init_params(cfg, jax.random.key(config.seed), layout)
    # config.json first: a disagreeing model section is refused before any weight is read.
    path = hf_io.resolve(config.hf_checkpoint)
    loaded = hf_io.read_config(path, cfg.param_dtype, cfg.dtype).replace(lora_alpha=cfg.lora_alpha, remat=cfg.remat)
    diff = [
        f"model.{f.name}={getattr(cfg, f.name)!r} (checkpoint: {getattr(loaded, f.name)!r})"
        for f in dataclasses.fields(ModelConfig)
        if getattr(cfg, f.name) != getattr(loaded, f.name)
    ]
    if diff:
        raise ValueError(
            f"config {', '.join(diff)} disagrees with hf_checkpoint {config.hf_checkpoint}, whose config.json "
            f"defines the model: drop the override, or set --config.hf_checkpoint= to train from a random init"
        )
    loaded_cfg, params = load_hf(path, param_dtype=cfg.param_dtype, dtype=cfg.dtype, layout=layout)
    return loaded_cfg.replace(lora_alpha=cfg.lora_alpha, remat=cfg.remat), params


def check_dir_arg(path: str | None, flag: str) -> None:
    """ValueError, one line, if a directory argument names an existing file (before anything is built)."""
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a directory")


def config_path(argv: list[str] | None = None) -> str | None:
    """The `--config FILE` of argv (default: sys.argv)."""
    return split_config_args(sys.argv[1:] if argv is None else argv)[0]


class _DefaultsShown(argparse.HelpFormatter):
    """Every option's default in its help, where there is one to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        return text + " (default: %(default)s)" if shown and "%(default)" not in text else text


def add_config_help(parser: argparse.ArgumentParser) -> None:
    """Shows `--config FILE` and `--config.KEY=VALUE` in --help (they are parsed apart, by
    `split_config_args`), and every option's default."""
    if "--config" in parser._option_string_actions:  # a parser parsed before (tests reuse one)
        return
    parser.formatter_class = _DefaultsShown
    group = parser.add_argument_group("run config (parsed before the options above)")
    group.add_argument(
        "--config", metavar="FILE", help="a config file whose get_config() gives the run, e.g. configs/tiny.py"
    )
    group.add_argument(
        "--config.KEY", metavar="VALUE", dest="config_override", default=argparse.SUPPRESS,
        help="set any key of the config, e.g. --config.algorithm=fedbcd --config.rounds=20 "
        f"--config.comm.store=file:///tmp/store (algorithms: {', '.join(algorithms.NAMES)}; keys: docs/configs.md)",
    )  # fmt: skip


def load_checked(path: str, overrides=()) -> ml_collections.ConfigDict:
    """The config file with its overrides, every section validated now (a one-line ValueError), not
    deep inside a jit or rounds into the run: what every command and the Flower apps start from."""
    config = load_config(path, overrides)
    validate(config)
    optimizer_config(config)
    fed_config(config)
    make_partition(config, model_config(config))
    return config


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """Parses `--config FILE [--config.key=value ...]` plus the parser's own flags.

    Returns (run config, argparse namespace). A bad file, key or value exits with a one-line error.
    """
    add_config_help(parser)
    path, overrides, rest = split_config_args(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    if path is None:
        parser.exit(2, f"{parser.prog}: error: --config FILE is required (e.g. --config configs/tiny.py)\n")
    try:
        config = load_checked(path, overrides)
    except ValueError as e:  # one line, as README promises (parser.error would print the usage first)
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return config, args
