"""GSM8K-style evaluation: exact match of greedy answers, and eval loss on the references."""

from __future__ import annotations

import jax
import numpy as np
import tqdm

from jaxblock import instruct, local
from jaxblock.config import ModelConfig
from jaxblock.generate import generate


def exact_match(
    cfg: ModelConfig,
    params: dict,
    tokenizer,
    examples: list[dict],
    *,
    batch_size: int = 64,
    prompt_len: int = 64,
    max_new_tokens: int = 32,
    desc: str = "exact match",
) -> dict:
    """Greedy, batched, KV-cache decoding; the answer is the number after 'The answer is', else the last number.

    Returns {'exact_match': fraction, 'n', 'records': one per example (question, output, answer, gold, correct)}.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records = []
    for start in tqdm.trange(0, len(examples), batch_size, desc=desc, leave=False):
        chunk = examples[start : start + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)  # a fixed batch shape: one executable
        tokens, mask = instruct.encode_prompts(tokenizer, chunk, prompt_len)
        out = np.asarray(
            generate(cfg, params, tokens, max_new_tokens, prompt_mask=mask, eos_token_id=eos, pad_token_id=pad)
        )
        for e, row in zip(chunk[:n], out[:n], strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True)
            answer = instruct.extract_answer(text)
            ok = answer is not None and e["answer"] is not None and abs(answer - float(e["answer"])) < 1e-6
            records.append(
                {"question": e["instruction"], "output": text, "answer": answer, "gold": e["answer"], "correct": ok}
            )
    correct = sum(r["correct"] for r in records)
    return {"exact_match": correct / max(len(examples), 1), "n": len(examples), "records": records}


def eval_loss(cfg: ModelConfig, params: dict, tokenizer, examples: list[dict], *, seq_len: int, batch_size: int = 64):
    """Mean next-token loss over the reference responses' tokens (prompt tokens are not scored)."""
    data = instruct.tokenize(tokenizer, examples, seq_len)
    loss_fn = jax.jit(local.lm_loss(cfg))
    total, weight = 0.0, 0.0
    for start in range(0, len(examples), batch_size):
        batch = {k: v[start : start + batch_size] for k, v in data.items()}
        w = float(batch["loss_mask"][:, 1:].sum())
        total += float(loss_fn(params, batch)) * w
        weight += w
    return total / max(weight, 1.0)
