"""Wiring shared by the scripts: a Layout from a run config, sharded init, model loading."""

from __future__ import annotations

import argparse
import sys

import jax
import ml_collections

from jaxblock import model
from jaxblock.config import ModelConfig, load_config, model_config, split_config_args
from jaxblock.hf_io import load_hf
from jaxblock.sharding import Layout, make_mesh, rules_from_config


def make_layout(config: ml_collections.ConfigDict, devices=None) -> Layout:
    """The mesh (`config.mesh`) and logical-axis rules (`config.rules`) of a run config."""
    return Layout(make_mesh(config.mesh.to_dict(), devices), rules_from_config(config.rules))


def init_params(cfg: ModelConfig, rng: jax.Array, layout: Layout | None = None) -> dict:
    """Random params, created directly in their shardings (no full copy on any one device)."""
    if layout is None:
        return jax.jit(model.init, static_argnums=0)(cfg, rng)
    shardings = layout.tree_shardings(model.logical_axes(cfg))
    return jax.jit(model.init, static_argnums=0, out_shardings=shardings)(cfg, rng)


def load_model(config: ml_collections.ConfigDict, layout: Layout | None = None) -> tuple[ModelConfig, dict]:
    """The run's model: `config.hf_checkpoint` if set (its config.json wins), else a seeded random init."""
    cfg = model_config(config)
    if config.hf_checkpoint:
        return load_hf(config.hf_checkpoint, param_dtype=cfg.param_dtype, dtype=cfg.dtype, layout=layout)
    return cfg, init_params(cfg, jax.random.key(config.seed), layout)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """Parses `--config FILE [--config.key=value ...]` plus the parser's own flags.

    Returns (run config, argparse namespace). A bad file, key or value exits with a one-line error.
    """
    path, overrides, rest = split_config_args(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    if path is None:
        parser.error("--config FILE is required (e.g. --config configs/tiny.py)")
    try:
        config = load_config(path, overrides)
        model_config(config)  # validate the model section now, not deep inside a jit
    except ValueError as e:
        parser.error(str(e))
    return config, args
