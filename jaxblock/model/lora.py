"""LoRA adapters as plain params beside the kernels they adapt, and their PEFT file format.

An adapter of projection `kernel` in layer i is two leaves in the kernel's own module dict:

    layers_{i}/self_attn/q_proj_lora_a   [d_in, r]   A, PEFT's init (uniform +-1/sqrt(d_in))
    layers_{i}/self_attn/q_proj_lora_b   [r, d_out]  B, zero: a fresh adapter changes nothing

with d_in/d_out the kernel's flattened input/output (q_proj: D -> N*H, o_proj: N*H -> D, in the
order HF's `[out, in]` weight flattens heads). `model.py` adds `(x @ A) @ B * lora_alpha / r` to the
projection; W + BA is formed only by `merge` (export, FLoRA's server). Adapters are float32 whatever
the model's param dtype, as PEFT keeps them (`autocast_adapter_dtype`).

Example:
    params = lora.add(cfg, params, lora.LoraConfig(rank=8), jax.random.key(0))
    cfg = cfg.replace(lora_alpha=16.0)
    logits = model.forward(cfg, params, tokens)          # == base model's while B == 0
    merged = lora.merge(cfg, params)                     # plain params, W += BA * alpha / r
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxblock.model import trees
from jaxblock.model.config import ModelConfig

# Projection name -> (module, logical axis of d_in, logical axis of d_out).
TARGETS = {
    "q_proj": ("self_attn", "embed", "heads"),
    "k_proj": ("self_attn", "embed", "kv_heads"),
    "v_proj": ("self_attn", "embed", "kv_heads"),
    "o_proj": ("self_attn", "heads", "embed"),
    "gate_proj": ("mlp", "embed", "mlp"),
    "up_proj": ("mlp", "embed", "mlp"),
    "down_proj": ("mlp", "mlp", "embed"),
}
_ADAPTER = re.compile(r"(?:^|/)(\w+)_lora_([ab])$")
ADAPTERS = r".*_lora_[ab]"  # a fed.blocks.partition rule matching every adapter leaf


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The run's `lora` section. The paper uses rank 32 for FedIT, FFA-LoRA and FLoRA."""

    rank: int = 32
    alpha: float = 64.0  # scale = alpha / rank, as PEFT's lora_alpha
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # PEFT's default for Llama
    init_seed: int = 0  # A's init: the seed every client shares (FFA-LoRA's frozen A)
    client_ranks: tuple[int, ...] = ()  # FLoRA: one rank per client (empty: `rank` for all)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank}: must be >= 1")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha}: must be > 0")
        if not self.targets:
            raise ValueError("lora.targets is empty: name at least one of " + ", ".join(TARGETS))
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"lora.targets: unknown {unknown}; choose from {', '.join(TARGETS)}")
        if any(r < 1 for r in self.client_ranks):
            raise ValueError(f"lora.client_ranks={list(self.client_ranks)}: every rank must be >= 1")

    def rank_of(self, client: int) -> int:
        return self.client_ranks[client] if self.client_ranks else self.rank


def dims(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(d_in, d_out) of a target projection, heads flattened."""
    d, n, k, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return {
        "q_proj": (d, n * h),
        "k_proj": (d, k * h),
        "v_proj": (d, k * h),
        "o_proj": (n * h, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }[target]


def init(cfg: ModelConfig, lc: LoraConfig, key: jax.Array, rank: int | None = None) -> dict:
    """Fresh adapters for every layer and target: A uniform in +-1/sqrt(d_in) (PEFT's
    kaiming_uniform(a=sqrt(5)) of its [r, d_in] weight), B zero. Same key, same A on every client."""
    rank = lc.rank if rank is None else rank
    out: dict = {}
    for i in range(cfg.num_layers):
        for j, target in enumerate(lc.targets):
            module, _, _ = TARGETS[target]
            d_in, d_out = dims(cfg, target)
            bound = 1.0 / np.sqrt(d_in)
            k = jax.random.fold_in(key, i * len(TARGETS) + j)  # j: the target's place in lora.targets
            a = jax.random.uniform(k, (d_in, rank), jnp.float32, -bound, bound)
            leaves = out.setdefault(f"layers_{i}", {}).setdefault(module, {})
            leaves[f"{target}_lora_a"] = a
            leaves[f"{target}_lora_b"] = jnp.zeros((rank, d_out), jnp.float32)
    return out


def add(cfg: ModelConfig, params: dict, lc: LoraConfig, key: jax.Array, rank: int | None = None) -> dict:
    """params with fresh adapters beside their kernels (the params' own leaves are not copied)."""
    return trees.merge(params, init(cfg, lc, key, rank))


def logical_axes(cfg: ModelConfig, lc: LoraConfig) -> dict:
    """PartitionSpecs of the adapter leaves: A shares its kernel's input axis, B its output axis."""
    from jax.sharding import PartitionSpec as P

    shapes = jax.eval_shape(lambda: init(cfg, lc, jax.random.key(0)))

    def spec(path, _):
        target, which = _ADAPTER.search(_path(path)).groups()
        _, axis_in, axis_out = TARGETS[target]
        return P(axis_in, None) if which == "a" else P(None, axis_out)

    return jax.tree_util.tree_map_with_path(spec, shapes)


def is_adapter(path: str) -> bool:
    return _ADAPTER.search(path) is not None


def split(params: dict) -> tuple[dict, dict]:
    """(base params, adapters): two nested dicts with disjoint leaves."""
    return _filter(params, lambda p: not is_adapter(p)), _filter(params, is_adapter)


def has_adapters(params: dict) -> bool:
    return bool(split(params)[1])


def merge(cfg: ModelConfig, params: dict) -> dict:
    """Plain params: every adapted kernel W += (A @ B) * lora_alpha / r (in float32, then W's dtype)."""
    base, adapters = split(params)
    return add_products(base, adapters, cfg.lora_alpha / _rank(adapters))


def add_products(base: dict, adapters: dict, scale: float = 1.0) -> dict:
    """base with W += A @ B * scale for each adapter (A, B) beside kernel W, in float32 then W's dtype."""
    out = dict(base)  # `_set` copies each dict on a kernel's path: the caller's tree is untouched
    for path, a in _leaves(adapters):
        m = _ADAPTER.search(path)
        if m.group(2) != "a":
            continue
        prefix, target = path[: m.start(1)], m.group(1)
        b = _get(adapters, f"{prefix}{target}_lora_b")
        kernel_path = f"{prefix}{target}"
        w = _get(out, kernel_path)
        update = (a.astype(jnp.float32) @ b.astype(jnp.float32)) * scale  # [d_in, d_out]
        # [d_in, d_out] -> the kernel's shape ([D,N,H], [N,H,D] or [D,F]): heads flatten row-major
        new = (w.astype(jnp.float32) + update.reshape(w.shape)).astype(w.dtype)
        _set(out, kernel_path, jax.device_put(new, w.sharding) if isinstance(w, jax.Array) else new)
    return out


def stack(adapters: list[dict], weights, scales) -> dict:
    """FLoRA's stacking: A_k scaled by p_k s_k concatenated on the rank axis, B_k likewise; the
    product of the stacked pair is exactly sum_k p_k s_k A_k B_k (ranks may differ)."""

    def cat(path, *leaves):
        if path[-1].key.endswith("_lora_a"):
            return jnp.concatenate([x * (w * s) for x, w, s in zip(leaves, weights, scales, strict=True)], axis=1)
        return jnp.concatenate(leaves, axis=0)

    return jax.tree_util.tree_map_with_path(cat, *adapters)


def _rank(adapters: dict) -> int:
    ranks = {a.shape[-1] for p, a in _leaves(adapters) if p.endswith("_lora_a")}
    if len(ranks) != 1:
        raise ValueError(f"adapters of ranks {sorted(ranks)}: expected one rank")
    return ranks.pop()


# ----------------------------------------------------------------------------- PEFT files

_PEFT_PREFIX = "base_model.model.model"


def save_peft(cfg: ModelConfig, params: dict, out_dir: str, base_model_name_or_path: str = "") -> None:
    """An adapter directory `peft.PeftModel.from_pretrained(base, out_dir)` loads:
    adapter_config.json and adapter_model.safetensors (lora_A [r, d_in], lora_B [d_out, r])."""
    from safetensors.numpy import save_file

    _, adapters = split(params)
    if not adapters:
        raise ValueError("save_peft: the params carry no LoRA adapters (export the merged model instead)")
    rank = _rank(adapters)
    tensors, targets = {}, set()
    for path, x in _leaves(adapters):
        layer, module, leaf = path.split("/")
        target, which = _ADAPTER.search(leaf).groups()
        targets.add(target)
        i = int(layer.removeprefix("layers_"))
        name = f"{_PEFT_PREFIX}.layers.{i}.{module}.{target}.lora_{which.upper()}.weight"
        tensors[name] = np.ascontiguousarray(np.asarray(x, np.float32).T)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": cfg.lora_alpha,
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2)


# ----------------------------------------------------------------------------- tree helpers


_path = trees.path_str


def _leaves(tree: dict) -> list[tuple[str, jax.Array]]:
    return [(_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _filter(tree: dict, keep, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        p = f"{prefix}{k}"
        if isinstance(v, dict):
            sub = _filter(v, keep, p + "/")
            if sub:
                out[k] = sub
        elif keep(p):
            out[k] = v
    return out


def _get(tree: dict, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for part in parents:
        tree[part] = dict(tree[part])
        tree = tree[part]
    tree[leaf] = value
