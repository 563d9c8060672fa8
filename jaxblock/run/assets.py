"""The bundled assets: task data, a tokenizer and a small pretrained base Llama.

`scripts/make_assets.py` calls `build(out_dir)`; every step is seeded, so the files are remade
identically on a CPU. The base model is pretrained here, with jaxblock's own model and train
step, on stories and lists of arithmetic facts (`tasks.pretraining_text`) that never use the
instruction format; `tiny_base/pretraining.json` records how many held-out facts it knows.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from jaxblock import model
from jaxblock.fed import local
from jaxblock.model.config import ModelConfig
from jaxblock.model.hf_io import save_hf
from jaxblock.run import tasks

SPECIAL_TOKENS = ["<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>"]
# BOS first, as in pretraining: the template writes every special token of a prompt (see instruct.prompt_ids).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )


def base_model_config(vocab_size: int, bos: int, eos: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_layers=8, num_heads=4, num_kv_heads=2,
        head_dim=48, max_position_embeddings=512, bos_token_id=bos, eos_token_id=eos,
    )  # fmt: skip


def pack(tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    """Documents `<s> text <|end|>` concatenated and cut into [n, seq_len] rows."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t + tokenizer.eos_token, add_special_tokens=True)["input_ids"]
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)


def pretrain(cfg: ModelConfig, rows: np.ndarray, *, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """Full-parameter AdamW pretraining (cosine schedule) with a progress bar; returns params."""
    params = model.init(cfg, jax.random.key(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr / 10)
    optimizer = optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01)
    loss_fn = local.lm_loss(cfg)
    step = jax.jit(lambda p, s, b: local.train_step(loss_fn, optimizer, p, {}, s, b))
    state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    mask = np.ones((batch_size, rows.shape[1]), np.float32)
    bar = tqdm.trange(steps, desc="pretraining the base model", unit="step")
    for i in bar:
        batch = {"tokens": jnp.asarray(rows[rng.integers(0, len(rows), batch_size)]), "loss_mask": mask}
        params, state, loss = step(params, state, batch)
        if i % 20 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return params


def fact_probe(cfg: ModelConfig, params: dict, tokenizer) -> dict:
    """How much held-out arithmetic a model knows: teacher-forced 'We know 7 plus 5 is 12.' over every
    number tuple of the eval split; a fact counts when every answer token is the argmax. Per source and 'all'."""
    rows, spans, labels = [], [], []
    for source in tasks.SOURCES:
        for numbers in filter(tasks.is_eval_tuple, tasks.tuples(source)):
            stated, c = tasks.fact(source, numbers)
            prefix = tokenizer(f"We know {stated}")["input_ids"]
            full = tokenizer(f"We know {stated} {c}.")["input_ids"]
            rows.append(full)
            spans.append((len(prefix), len(full) - 1))  # answer tokens: full[len(prefix) : -1]
            labels.append(source)
    tokens = np.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    predicted = np.asarray(jnp.argmax(model.forward(cfg, params, jnp.asarray(tokens)), -1))
    known = np.array([np.array_equal(predicted[i, a - 1 : b - 1], tokens[i, a:b]) for i, (a, b) in enumerate(spans)])
    out = {s: float(known[[lab == s for lab in labels]].mean()) for s in tasks.SOURCES}
    return {**out, "all": float(known.mean())}


def build(
    out_dir: str, *, seed: int = 0, pretrain_steps: int = 1500, train_per_source: int = 800, eval_per_source: int = 40
):  # fmt: skip
    """Writes data/{math_train.jsonl, math_eval.jsonl} and tiny_base/ (with pretraining.json) under out_dir."""
    data_dir, model_dir = os.path.join(out_dir, "data"), os.path.join(out_dir, "tiny_base")
    os.makedirs(data_dir, exist_ok=True)
    train = tasks.make_split(train_per_source, eval_split=False, seed=seed)
    evals = tasks.make_split(eval_per_source, eval_split=True, seed=seed)
    text = tasks.pretraining_text(60_000, seed=seed)
    with open(os.path.join(data_dir, "math_train.jsonl"), "w") as f:  # MathInstruct's fields
        for e in train:
            f.write(json.dumps({"source": e["source"], "instruction": e["instruction"], "output": e["output"]}) + "\n")
    with open(os.path.join(data_dir, "math_eval.jsonl"), "w") as f:  # GSM8K's fields: answer ends '#### N'
        for e in evals:
            rationale = e["output"].rsplit(" The answer is", 1)[0]
            f.write(json.dumps({"question": e["instruction"], "answer": f"{rationale}\n#### {e['answer']}"}) + "\n")

    prompts = [f"<|user|>{e['instruction']}<|end|><|assistant|>{e['output']}<|end|>" for e in train[:2000]]
    tokenizer = train_tokenizer(text[:20_000] + prompts)
    cfg = base_model_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    rows = pack(tokenizer, text, 64)
    params = pretrain(cfg, rows, steps=pretrain_steps, batch_size=32, lr=3e-3, seed=seed)
    save_hf(cfg, params, model_dir)
    tokenizer.save_pretrained(model_dir)
    info = {
        "train_examples": len(train), "eval_examples": len(evals), "pretrain_rows": len(rows),
        "pretrain_steps": pretrain_steps, "params": model.count_params(params),
        "held_out_facts_known": fact_probe(cfg, params, tokenizer),
    }  # fmt: skip
    with open(os.path.join(model_dir, "pretraining.json"), "w") as f:  # what the base model knows, for a person
        json.dump(info, f, indent=2)
    return info
