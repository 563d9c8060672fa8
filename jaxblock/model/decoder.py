"""A Llama 3.x / Qwen2.x decoder in Flax Linen, numerically matching transformers.

Dimension legend (used in einsum strings and shape comments):
  B batch, T query length, S key length (the cache), D model width, N query heads,
  K key/value heads, G = N // K query heads per kv head, H head dim, F MLP width, V vocab.

Params are a plain nested dict whose names map one-to-one to the HF checkpoint
(see `hf_io.py`): `embed_tokens`, `layers_{i}/{self_attn,mlp,...}`, `norm`, `lm_head`.
Layers are unrolled so that a block of layers is a set of whole top-level subtrees.
Every kernel carries logical axis names; `sharding.py` maps them to mesh axes.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxblock.model.config import ModelConfig
from jaxblock.model.sharding import Layout, constrain

Array = jax.Array
# A KV cache: {'layers_{i}': {'k': [B,S,K,H], 'v': [B,S,K,H]}, 'valid': [B,S] bool, 'index': int32[]}.
Cache = dict[str, Any]

_init = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, shape, axes, init=_init):
    """A param created with logical axis names, in the config's param dtype."""
    cfg: ModelConfig = module.cfg
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.param_jnp_dtype)


@jax.custom_vjp
def dense(x: Array, w: Array) -> Array:
    """x [..., d_in] @ w [d_in, d_out]: every projection of the model, with its backward pass written
    out so that XLA:CPU runs it fast.

    The weight gradient contracts over every leading axis of x and of the output's gradient g.
    Autodiff's transpose of the dot has XLA:CPU transpose g inside the elementwise op that produced
    it (the SiLU's backward, say): a loop reading several inputs with a stride of a whole row per
    element, 6.5 ms of a 100 ms step for one [512, 1024] gradient. Here g is made a plain array
    first (an optimization barrier, on the CPU only: GPU matmuls take transposed operands as they
    are) and the two gradients are plain dots: the MLP's forward and backward go from 13.9 to 5.3 ms
    (BENCHMARKS.md "issue 17"), equal up to float rounding. As with autodiff, only the gradients
    that are needed are computed: a frozen w gets none, an input that no trained weight depends
    on gets none (symbolic zeros).
    """
    return x @ w


def _dense_fwd(x, w):
    # Which inputs carry a gradient, kept in the residuals' structure (() yes, None no): static.
    needed = tuple(() if arg.perturbed else None for arg in (x, w))
    return x.value @ w.value, (x.value, w.value, needed)


def _dense_bwd(residuals, g):
    x, w, (x_needed, w_needed) = residuals
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None
    if jax.default_backend() == "cpu":
        g = jax.lax.optimization_barrier(g)
    lead = tuple(range(x.ndim - 1))
    dx = None if x_needed is None else g @ w.T
    dw = None if w_needed is None else jnp.tensordot(x, g, axes=(lead, lead))
    return dx, dw


dense.defvjp(_dense_fwd, _dense_bwd, symbolic_zeros=True)


def _with_lora(module: nn.Module, kernel: str, x: Array, y: Array) -> Array:
    """y = x @ W plus `kernel`'s LoRA term `(x @ A) @ B * lora_alpha / r`, if the params carry one.

    x [B,T,d_in] (flattened heads), y [B,T,...] the base projection (d_out = its trailing dims).
    `lora.py` puts `{kernel}_lora_a` [d_in,r] and `{kernel}_lora_b` [r,d_out] beside the kernel.
    W + BA is never formed, so training an adapter never computes a gradient of W's size; the rank
    comes from A's shape, so clients may differ in it (FLoRA).
    """
    name = f"{kernel}_lora_a"
    if not module.has_variable("params", name):
        return y
    cfg: ModelConfig = module.cfg
    if cfg.lora_alpha <= 0:
        raise ValueError(f"params carry LoRA adapter {name!r} but ModelConfig.lora_alpha={cfg.lora_alpha}")
    a = module.get_variable("params", name)  # [d_in, r]
    b = module.get_variable("params", f"{kernel}_lora_b")  # [r, d_out]
    dt = cfg.jnp_dtype
    low = (x.astype(dt) @ a.astype(dt)) @ b.astype(dt)  # [B,T,r] -> [B,T,d_out]
    return y + (low * (cfg.lora_alpha / a.shape[-1])).reshape(y.shape)


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2], including Llama 3.1's `llama3` scaling (as transformers computes)."""
    h = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float32) / h))
    if cfg.rope_type == "default":
        return inv_freq
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        old_len = cfg.rope_original_max_position_embeddings
        low_wavelen = old_len / cfg.rope_low_freq_factor
        high_wavelen = old_len / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (old_len / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_type={cfg.rope_type!r}: supported are default, linear, llama3")


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotates x [B,T,*,H] by positions [B,T], in the rotate-half layout HF checkpoints use."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B,T,H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B,T,1,H]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        # transformers casts back to the input dtype before scaling; so do we, for parity.
        return scale.astype(self.cfg.jnp_dtype) * x32.astype(self.cfg.jnp_dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array, cache: dict | None, index):
        cfg = self.cfg
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = cfg.jnp_dtype
        wq = _param(self, "q_proj", (d, n, h), ("embed", "heads", "head_dim"))
        wk = _param(self, "k_proj", (d, k, h), ("embed", "kv_heads", "head_dim"))
        wv = _param(self, "v_proj", (d, k, h), ("embed", "kv_heads", "head_dim"))
        wo = _param(self, "o_proj", (n, h, d), ("heads", "head_dim", "embed"))
        x = x.astype(dt)
        b, t = x.shape[:2]
        q = _with_lora(self, "q_proj", x, dense(x, wq.astype(dt).reshape(d, n * h)).reshape(b, t, n, h))
        key = _with_lora(self, "k_proj", x, dense(x, wk.astype(dt).reshape(d, k * h)).reshape(b, t, k, h))
        val = _with_lora(self, "v_proj", x, dense(x, wv.astype(dt).reshape(d, k * h)).reshape(b, t, k, h))
        if cfg.qkv_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", (n, h), ("heads", "head_dim"), zeros).astype(dt)
            key = key + _param(self, "k_bias", (k, h), ("kv_heads", "head_dim"), zeros).astype(dt)
            val = val + _param(self, "v_bias", (k, h), ("kv_heads", "head_dim"), zeros).astype(dt)

        inv_freq = rope_inv_freq(cfg)
        q = apply_rope(q, positions, inv_freq)
        key = apply_rope(key, positions, inv_freq)

        if cache is not None:  # write this step's keys/values at `index`, attend over the cache
            key = jax.lax.dynamic_update_slice_in_dim(cache["k"], key.astype(cache["k"].dtype), index, 1)
            val = jax.lax.dynamic_update_slice_in_dim(cache["v"], val.astype(cache["v"].dtype), index, 1)
            cache = {"k": key, "v": val}

        q = q.reshape(b, t, k, n // k, h)  # [B,T,K,G,H]: grouped-query attention without repeating kv
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, key.astype(dt)).astype(jnp.float32)
        scores = scores / math.sqrt(h)
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, val.astype(dt)).reshape(b, t, n, h)
        out = out.reshape(b, t, n * h)
        out = _with_lora(self, "o_proj", out, dense(out, wo.astype(dt).reshape(n * h, d)))
        if cfg.o_bias:
            out = out + _param(self, "o_bias", (d,), ("embed",), nn.initializers.zeros).astype(dt)
        return out, cache


class MLP(nn.Module):
    cfg: ModelConfig
    layout: Layout | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        d, f, dt = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_dtype
        gate = _param(self, "gate_proj", (d, f), ("embed", "mlp"))
        up = _param(self, "up_proj", (d, f), ("embed", "mlp"))
        down = _param(self, "down_proj", (f, d), ("mlp", "embed"))
        x = x.astype(dt)
        hidden = nn.silu(_with_lora(self, "gate_proj", x, dense(x, gate.astype(dt))))  # [B,T,F]
        hidden = hidden * _with_lora(self, "up_proj", x, dense(x, up.astype(dt)))
        hidden = constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"), self.layout)
        return _with_lora(self, "down_proj", hidden, dense(hidden, down.astype(dt)))


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    layout: Layout | None = None

    @nn.compact
    def __call__(self, x, positions, mask, cache, index):
        attn_out, cache = Attention(self.cfg, name="self_attn")(
            RMSNorm(self.cfg, name="input_layernorm")(x), positions, mask, cache, index
        )
        x = x + attn_out
        x = x + MLP(self.cfg, self.layout, name="mlp")(RMSNorm(self.cfg, name="post_attention_layernorm")(x))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed"), self.layout), cache


def head_of(cfg: ModelConfig, params: dict) -> Array:
    """The LM head's matrix: the embedding [V,D] if tied, else `lm_head` [D,V]."""
    return params["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]


def logits_of(cfg: ModelConfig, head: Array, x: Array, layout: Layout | None = None) -> Array:
    """The LM head: final hidden states x [B,T,D] -> logits [B,T,V] float32, `head` from `head_of`.
    The model's last step, and the chunked loss's (local.py) on a slice of positions."""
    dt = cfg.jnp_dtype
    logits = dense(x, (head.T if cfg.tie_word_embeddings else head).astype(dt))
    logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"), layout)
    return logits.astype(jnp.float32)


class Transformer(nn.Module):
    """Causal decoder. `__call__(tokens[B,T], positions[B,T], cache) -> (logits[B,T,V] fp32, cache)`;
    with `hidden_only`, the final normed hidden states [B,T,D] in place of the logits."""

    cfg: ModelConfig
    layout: Layout | None = None

    @nn.compact
    def __call__(
        self, tokens: Array, positions: Array | None = None, cache: Cache | None = None, hidden_only: bool = False
    ):
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        embedding = _param(self, "embed_tokens", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        x = jnp.take(embedding, tokens, axis=0).astype(cfg.jnp_dtype)  # [B,T,D]
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"), self.layout)

        if cache is None:
            index = 0
            mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None]  # [1,T,S=T]
        else:
            # Slots [index, index+T) receive this call's tokens; a query sees valid slots up to itself.
            index = cache["index"]
            s = cache["valid"].shape[1]
            slot = jnp.arange(s)[None, :]  # [1,S]
            query_slot = index + jnp.arange(t)[:, None]  # [T,1]
            mask = (slot <= query_slot)[None] & cache["valid"][:, None, :]  # [B,T,S]

        new_cache = None if cache is None else {"valid": cache["valid"], "index": index + t}
        # Training with cfg.remat: each layer keeps only its input for backward and recomputes the rest.
        layer = nn.remat(DecoderLayer) if cfg.remat and cache is None else DecoderLayer
        for i in range(cfg.num_layers):
            name = f"layers_{i}"
            x, layer_cache = layer(cfg, self.layout, name=name)(
                x, positions, mask, None if cache is None else cache[name], index
            )
            if cache is not None:
                new_cache[name] = layer_cache

        x = RMSNorm(cfg, name="norm")(x)
        if cfg.tie_word_embeddings:
            head = embedding
        else:
            head = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
        if hidden_only:
            return x, new_cache
        return logits_of(cfg, head, x, self.layout), new_cache


# ----------------------------------------------------------------------------- functional API


def init(cfg: ModelConfig, rng: Array) -> dict:
    """Random params as a plain nested dict (no logical-axis boxes)."""
    return nn.unbox(_boxed_init(cfg, rng))


def _boxed_init(cfg: ModelConfig, rng: Array) -> dict:
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(cfg).init(rng, tokens)["params"]


def logical_axes(cfg: ModelConfig) -> dict:
    """The params tree with a logical-axis `PartitionSpec` at every leaf (no memory is allocated)."""
    boxed = jax.eval_shape(lambda: _boxed_init(cfg, jax.random.key(0)))
    return nn.get_partition_spec(boxed)


def forward(
    cfg: ModelConfig, params: dict, tokens: Array, positions: Array | None = None, layout: Layout | None = None
) -> Array:
    """Causal forward: tokens [B,T] int32 -> logits [B,T,V] float32.

    Example:
        cfg, params = jaxblock.load_hf("path/to/checkpoint")
        logits = jaxblock.forward(cfg, params, jnp.array([[1, 2, 3]]))  # [1,3,V]
    """
    logits, _ = Transformer(cfg, layout).apply({"params": params}, tokens, positions)
    return logits


def hidden(cfg: ModelConfig, params: dict, tokens: Array, layout: Layout | None = None) -> Array:
    """The final normed hidden states [B,T,D] (the LM head's input: `logits_of`)."""
    x, _ = Transformer(cfg, layout).apply({"params": params}, tokens, None, None, True)
    return x


def init_cache(cfg: ModelConfig, batch: int, length: int, valid: Array | None = None) -> Cache:
    """An empty KV cache of `length` slots; `valid[B,length]` marks slots that may be attended to."""
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    cache: Cache = {
        f"layers_{i}": {"k": jnp.zeros(shape, cfg.jnp_dtype), "v": jnp.zeros(shape, cfg.jnp_dtype)}
        for i in range(cfg.num_layers)
    }
    cache["valid"] = jnp.ones((batch, length), bool) if valid is None else valid
    cache["index"] = jnp.zeros((), jnp.int32)
    return cache


def forward_cached(
    cfg: ModelConfig, params: dict, tokens: Array, positions: Array, cache: Cache, layout: Layout | None = None
):
    """Forward over tokens [B,T] placed at the cache's write index; returns (logits, cache)."""
    return Transformer(cfg, layout).apply({"params": params}, tokens, positions, cache)


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
