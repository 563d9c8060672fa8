"""Greedy decoding with a KV cache: one prefill, then a `lax.scan` of single-token steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxblock import model
from jaxblock.model.config import ModelConfig
from jaxblock.model.sharding import Layout


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_token_id", "pad_token_id", "layout"))
def _generate(cfg, params, prompts, prompt_mask, max_new_tokens, eos_token_id, pad_token_id, layout):
    b, p = prompts.shape
    valid = jnp.concatenate([prompt_mask, jnp.ones((b, max_new_tokens), bool)], axis=1)  # [B,S]
    cache = model.init_cache(cfg, b, p + max_new_tokens, valid)
    # Left padding: a row's first real token gets position 0, as transformers does from the mask.
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)  # [B,P]
    logits, cache = model.forward_cached(cfg, params, prompts, positions, cache, layout)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [B]
    next_pos = positions[:, -1] + 1  # [B]

    def step(carry, _):
        cache, token, pos, done = carry
        logits, cache = model.forward_cached(cfg, params, token[:, None], pos[:, None], cache, layout)
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        new = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        new = jnp.where(done, pad_token_id, new)
        return (cache, new, pos + 1, done), new

    done = jnp.zeros((b,), bool)
    _, rest = jax.lax.scan(step, (cache, first, next_pos, done), None, length=max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)  # [B, max_new_tokens]


def generate(
    cfg: ModelConfig,
    params: dict,
    prompts: jax.Array,
    max_new_tokens: int,
    *,
    prompt_mask: jax.Array | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    layout: Layout | None = None,
) -> jax.Array:
    """Greedy decoding.

    Args:
      prompts: [B,P] int32, left-padded when rows differ in length.
      max_new_tokens: tokens to generate per row.
      prompt_mask: [B,P] bool, False on left padding (default: all True).
      eos_token_id: after a row emits it, the row continues with `pad_token_id`.
    Returns:
      [B, max_new_tokens] int32 new tokens.

    Example:
      new = jaxblock.generate(cfg, params, jnp.array([[1, 5, 9]]), 20)
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.ndim != 2:
        raise ValueError(f"prompts has shape {prompts.shape}: expected [batch, length]")
    mask = jnp.ones(prompts.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
    return _generate(cfg, params, prompts, mask, max_new_tokens, eos_token_id, pad_token_id, layout)
