"""Decoding with a KV cache: one prefill, then a `lax.scan` of single-token steps; greedy, or
temperature sampling per row from seeded keys."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxblock import model
from jaxblock.model.config import ModelConfig
from jaxblock.model.sharding import Layout


def _pick(logits, temperature, keys, t):
    """Next tokens [B] from logits [B,V]: the argmax where a row's temperature is 0 (or with no keys),
    else a draw from softmax(logits / temperature) with the row's key folded with step `t`."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if keys is None:
        return greedy
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)  # [B]
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]  # [B,V]
    drawn = jax.vmap(jax.random.categorical)(step_keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "stop_ids", "pad_token_id", "layout"))
def _generate(cfg, params, prompts, prompt_mask, temperature, keys, max_new_tokens, stop_ids, pad_token_id, layout):
    b, p = prompts.shape
    valid = jnp.concatenate([prompt_mask, jnp.ones((b, max_new_tokens), bool)], axis=1)  # [B,S]
    cache = model.init_cache(cfg, b, p + max_new_tokens, valid)
    # Left padding: a row's first real token gets position 0, as transformers does from the mask.
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)  # [B,P]
    logits, cache = model.forward_cached(cfg, params, prompts, positions, cache, layout)
    first = _pick(logits[:, -1], temperature, keys, 0)  # [B]
    next_pos = positions[:, -1] + 1  # [B]
    stop = jnp.asarray(stop_ids, jnp.int32)

    def step(carry, t):
        cache, token, pos, done = carry
        logits, cache = model.forward_cached(cfg, params, token[:, None], pos[:, None], cache, layout)
        if stop_ids:
            done = done | jnp.isin(token, stop)
        new = jnp.where(done, pad_token_id, _pick(logits[:, -1], temperature, keys, t))
        return (cache, new, pos + 1, done), new

    done = jnp.zeros((b,), bool)
    _, rest = jax.lax.scan(step, (cache, first, next_pos, done), jnp.arange(1, max_new_tokens))
    return jnp.concatenate([first[:, None], rest.T], axis=1)  # [B, max_new_tokens]


def generate(
    cfg: ModelConfig,
    params: dict,
    prompts: jax.Array,
    max_new_tokens: int,
    *,
    prompt_mask: jax.Array | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    layout: Layout | None = None,
    temperature: float | jax.Array = 0.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Greedy decoding, or sampling at a temperature (per row if an array) when `rng` is given.

    Args:
      prompts: [B,P] int32, left-padded when rows differ in length.
      max_new_tokens: tokens to generate per row.
      prompt_mask: [B,P] bool, False on left padding (default: all True).
      eos_token_id: a token id, or several (e.g. EOS and an end-of-turn token): after a row emits
        one, the row continues with `pad_token_id`.
      temperature: a float, or [B] floats; rows at 0 are greedy. Ignored without `rng`.
      rng: a key, or [B] keys (one per row: a row's draws then do not depend on which other rows
        share its batch). Row r's step t draws with fold_in(its key, t).
    Returns:
      [B, max_new_tokens] int32 new tokens.

    Example:
      new = jaxblock.generate(cfg, params, jnp.array([[1, 5, 9]]), 20)   # greedy
      new = jaxblock.generate(cfg, params, jnp.array([[1, 5, 9]]), 20, temperature=0.7, rng=jax.random.key(0))
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.ndim != 2:
        raise ValueError(f"prompts has shape {prompts.shape}: expected [batch, length]")
    b = prompts.shape[0]
    mask = jnp.ones(prompts.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
    if eos_token_id is None:
        stop_ids = ()
    elif isinstance(eos_token_id, int):
        stop_ids = (eos_token_id,)
    else:
        stop_ids = tuple(sorted({int(i) for i in eos_token_id}))
    temps = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,))
    if jnp.any(temps < 0):
        raise ValueError(f"temperature={temperature}: must be >= 0")
    keys = None
    if rng is not None:
        if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):  # a raw uint32 PRNGKey
            rng = jax.random.wrap_key_data(rng)
        keys = jax.random.split(rng, b) if rng.ndim == 0 else rng
        if keys.shape != (b,):
            raise ValueError(f"rng has shape {keys.shape}: expected one key or [batch={b}] keys")
    return _generate(cfg, params, prompts, mask, temps, keys, max_new_tokens, stop_ids, pad_token_id, layout)
