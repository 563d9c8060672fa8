"""Tiny random transformers checkpoints, made with `save_pretrained`, for parity tests.

Norm weights and biases are perturbed away from their 1/0 initial values so that a mapping
error in them shows up in the logits.
"""

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

KINDS = ("llama", "llama3_tied", "qwen2")


def hf_config(kind: str):
    common = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if kind == "llama":  # default RoPE; head_dim differs from hidden / heads (24 vs 16)
        return LlamaConfig(**common, head_dim=24, max_position_embeddings=8192, rope_theta=10000.0)
    if kind == "llama3_tied":  # Llama 3.1/3.2 frequency scaling, tied embeddings
        rope = dict(
            rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=8192,
        )  # fmt: skip
        return LlamaConfig(**common, rope_parameters=rope, max_position_embeddings=131072, tie_word_embeddings=True)
    if kind == "qwen2":  # q/k/v biases
        return Qwen2Config(**common, max_position_embeddings=8192, rope_theta=1000000.0, tie_word_embeddings=False)
    raise ValueError(kind)


def make_hf_model(kind: str, out_dir: str, seed: int = 0):
    """Saves a random `kind` model to out_dir; returns the torch model (eval mode, float32)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return model


def hf_logits(model, tokens, position_ids=None):
    with torch.no_grad():
        kw = {} if position_ids is None else {"position_ids": torch.tensor(np.array(position_ids))}
        return model(torch.as_tensor(tokens), **kw).logits.numpy()


def hf_greedy(model, prompts, new_tokens, mask=None):
    """transformers' greedy `generate`, EOS disabled (plain argmax decoding, as ours without eos)."""
    model.generation_config.eos_token_id = None
    mask = np.ones(prompts.shape, bool) if mask is None else mask
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(prompts),
            attention_mask=torch.as_tensor(mask.astype(np.int64)),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, prompts.shape[1] :].numpy()
