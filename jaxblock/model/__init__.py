"""The LLM library: the decoder, its config, HF I/O, LoRA, generation, shardings. Imports nothing federated."""

from jaxblock.model.decoder import (
    Cache,
    Transformer,
    count_params,
    dense,
    forward,
    forward_cached,
    head_of,
    hidden,
    init,
    init_cache,
    logical_axes,
    logits_of,
    rope_inv_freq,
)

__all__ = [
    "Cache",
    "Transformer",
    "count_params",
    "dense",
    "forward",
    "forward_cached",
    "head_of",
    "hidden",
    "init",
    "init_cache",
    "logical_axes",
    "logits_of",
    "rope_inv_freq",
]
