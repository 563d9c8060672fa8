"""GSM8K-style evaluation: exact match of greedy answers, and eval loss on the references."""

from __future__ import annotations

import collections
import functools

import jax
import numpy as np
import tqdm

from jaxblock import model
from jaxblock.fed import local
from jaxblock.model.config import ModelConfig
from jaxblock.model.generate import generate
from jaxblock.run import instruct


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
    progress: bool = True,
) -> dict:
    """Greedy, batched, KV-cache decoding; the answer is the number after 'The answer is', else the last number.

    Returns {'exact_match': fraction, 'n', 'records': one per example (question, output, answer, gold, correct)}.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records = []
    for start in tqdm.trange(0, len(examples), batch_size, desc=desc, leave=False, disable=not progress):
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
    loss_fn = _jitted_loss(cfg)
    total, weight = 0.0, 0.0
    for start in range(0, len(examples), batch_size):
        batch = {k: v[start : start + batch_size] for k, v in data.items()}
        w = float(batch["loss_mask"][:, 1:].sum())
        total += float(loss_fn(params, batch)) * w
        weight += w
    return total / max(weight, 1.0)


@functools.cache
def _jitted_loss(cfg: ModelConfig):
    """One jitted loss per model config: an evaluation every few rounds compiles it once."""
    return jax.jit(local.lm_loss(cfg))


def loss_by_token(
    cfg: ModelConfig,
    params: dict,
    tokenizer,
    examples: list[dict],
    *,
    seq_len: int,
    batch_size: int = 64,
    top: int = 10,
) -> list[dict]:
    """Which reference tokens carry the eval loss: the `top` token ids by their share of the summed
    loss, each {'id', 'token' (its text), 'count', 'mean_loss', 'share'}. A loss spread evenly over a
    response differs from one concentrated on a few fixed words of its template (which greedy
    decoding may still get right)."""
    data = instruct.tokenize(tokenizer, examples, seq_len)
    nll_fn = jax.jit(lambda p, tokens: local.token_nll(model.forward(cfg, p, tokens), tokens))
    losses = collections.defaultdict(list)
    for start in range(0, len(examples), batch_size):
        tokens = data["tokens"][start : start + batch_size]
        nll = np.asarray(nll_fn(params, tokens))
        mask = data["loss_mask"][start : start + batch_size, 1:] > 0
        for row, col in zip(*np.nonzero(mask), strict=True):
            losses[int(tokens[row, col + 1])].append(float(nll[row, col]))
    total = sum(sum(v) for v in losses.values()) or 1.0
    rows = [
        {
            "id": t,
            "token": tokenizer.decode([t]),
            "count": len(v),
            "mean_loss": float(np.mean(v)),
            "share": sum(v) / total,
        }
        for t, v in losses.items()
    ]
    return sorted(rows, key=lambda r: -r["share"])[:top]
