"""Configuration: the frozen `ModelConfig`, HF `config.json` in and out, and config files.

Run configs are Python files whose `get_config()` returns an `ml_collections.ConfigDict`
(big_vision style). At the module boundary they become frozen dataclasses (`ModelConfig`), which
are hashable and so can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Dimensions and numerics of a Llama 3.x / Qwen2.x decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "llama"  # 'llama' or 'qwen2': decides the HF config class written by save_hf
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # 'default', 'linear' or 'llama3'
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 2048
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; softmax, norms and logits are always float32
    # LoRA scale numerator: an adapter of rank r adds (x @ A) @ B * lora_alpha / r (model._with_lora). Not
    # part of a checkpoint's architecture: the run's `lora.alpha` sets it (model_config).
    lora_alpha: float = 0.0
    # Rematerialise each decoder layer in backward (the run's `memory.remat`): same numbers, less memory.
    remat: bool = False

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)}: must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim}: RoPE needs an even head dim")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: choose one of {sorted(_DTYPES)}")
        if self.model_type not in ("llama", "qwen2"):
            raise ValueError(f"model.model_type={self.model_type!r}: supported are 'llama' and 'qwen2'")
        # The HF config classes: Qwen2 has q/k/v biases and no o bias; Llama one flag for all four.
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ValueError("model.model_type='qwen2' requires model.qkv_bias=True and model.o_bias=False")
        if self.model_type == "llama" and self.qkv_bias != self.o_bias:
            raise ValueError("model.model_type='llama' has one attention_bias flag: qkv_bias and o_bias must agree")
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"model.rope_type={self.rope_type!r}: supported are default, linear, llama3")

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def param_jnp_dtype(self):
        return _DTYPES[self.param_dtype]

    @classmethod
    def from_dict(cls, d) -> ModelConfig:
        """From a ConfigDict/dict holding exactly this dataclass's fields (unknown keys are an error)."""
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"model config: unknown keys {unknown} (known: {sorted(fields)})")
        return cls(**d)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------- HF config.json


def from_hf_config(hf: dict[str, Any], *, param_dtype: str = "float32", dtype: str = "float32") -> ModelConfig:
    """ModelConfig from a transformers `config.json` dict.

    Reads both the current layout (`rope_parameters` holding `rope_theta`) and the one on the hub for
    Llama 3.x (`rope_scaling` beside a top-level `rope_theta`).
    """
    model_type = hf.get("model_type")
    if model_type not in ("llama", "qwen2"):
        raise ValueError(f"config.json model_type={model_type!r}: jaxblock supports 'llama' and 'qwen2'")
    if hf.get("mlp_bias"):
        raise ValueError("config.json mlp_bias=true: not supported (no Llama 3.x or Qwen2.x checkpoint uses it)")
    if hf.get("use_sliding_window"):
        raise ValueError("config.json use_sliding_window=true: sliding-window attention is not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    heads = hf["num_attention_heads"]
    llama_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        model_type=model_type,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        qkv_bias=True if model_type == "qwen2" else llama_bias,
        o_bias=False if model_type == "qwen2" else llama_bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=_first(hf.get("bos_token_id")),
        eos_token_id=_first(hf.get("eos_token_id")),
        param_dtype=param_dtype,
        dtype=dtype,
    )


def _first(x):
    return x[0] if isinstance(x, list) and x else x


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers config kwargs for `cfg` (current `rope_parameters` layout)."""
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
        )
    out = dict(
        model_type=cfg.model_type,
        # What transformers' save_pretrained writes too: servers (vLLM, `transformers serve`) pick the class by it.
        architectures=[{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.model_type]],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        torch_dtype=cfg.param_dtype,
    )
    if cfg.model_type == "llama":
        out["attention_bias"] = cfg.qkv_bias
    return out
