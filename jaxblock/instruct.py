"""Instruction data: loaders, prompt formatting, fixed-shape tokenization, client partitions.

Loaders return plain example dicts {instruction, input, output, label, answer}:
  alpaca_gpt4   vicgalle/alpaca-gpt4 (instruction, input, output); label = a TF-IDF k-means cluster
  mathinstruct  TIGER-Lab/MathInstruct (source, instruction, output); 50,000 sampled with the seed;
                label = source
  gsm8k         openai/gsm8k, config 'main', test split (question, answer '... #### N'), for eval
Each reads the hub through `datasets`, or a local JSON/JSONL file with the same fields.
"""

from __future__ import annotations

import os
import re
import zlib
from collections import Counter

import numpy as np

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
HUB = {"alpaca_gpt4": "vicgalle/alpaca-gpt4", "mathinstruct": "TIGER-Lab/MathInstruct", "gsm8k": "openai/gsm8k"}


def _rows(name: str, path: str | None, split: str):
    """Rows of a hub dataset, or of a local JSON/JSONL file in the hub's schema."""
    import datasets  # heavy import, only when data is loaded

    if path:
        if not os.path.exists(path):
            raise ValueError(f"data file {path}: no such file")
        return datasets.load_dataset("json", data_files=path, split="train")
    if name == "gsm8k":
        return datasets.load_dataset(HUB[name], "main", split=split)
    return datasets.load_dataset(HUB[name], split=split)


def _require(rows, fields: tuple[str, ...], name: str) -> None:
    missing = [f for f in fields if f not in rows.column_names]
    if missing:
        raise ValueError(f"{name} data: missing fields {missing} (has {rows.column_names})")


def load_examples(name: str, path: str | None = None, *, split: str = "train", sample: int = 0, seed: int = 0):
    """Examples of a named dataset (hub) or a local file with its fields; `sample` draws that many."""
    if name not in HUB:
        raise ValueError(f"data.name={name!r}: choose one of {', '.join(HUB)}")
    rows = _rows(name, path, split)
    if name == "alpaca_gpt4":
        _require(rows, ("instruction", "input", "output"), name)
        out = [
            {"instruction": r["instruction"], "input": r["input"] or "", "output": r["output"], "label": None}
            for r in rows
        ]
    elif name == "mathinstruct":
        _require(rows, ("source", "instruction", "output"), name)
        out = [
            {"instruction": r["instruction"], "input": "", "output": r["output"], "label": r["source"]} for r in rows
        ]
    else:
        _require(rows, ("question", "answer"), name)
        out = []
        for r in rows:
            rationale, _, final = r["answer"].rpartition("####")
            answer = parse_number(final)
            output = f"{rationale.strip()} The answer is {final.strip()}."
            out.append({"instruction": r["question"], "input": "", "output": output, "label": None, "answer": answer})
    if sample and sample < len(out):
        idx = np.random.default_rng(seed).choice(len(out), sample, replace=False)
        out = [out[i] for i in sorted(idx)]
    if name == "alpaca_gpt4":
        labels = cluster_labels([e["instruction"] for e in out], k=8, seed=seed)
        for e, label in zip(out, labels, strict=True):
            e["label"] = int(label)
    for e in out:
        e.setdefault("answer", extract_answer(e["output"]))
    return out


# ----------------------------------------------------------------------------- answers


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def parse_number(text: str) -> float | None:
    m = re.search(_NUMBER, text)
    return None if m is None else float(m.group().replace(",", ""))


def extract_answer(text: str) -> float | None:
    """The number after the last 'The answer is', else the last number in the text, else None."""
    m = re.findall(rf"The answer is\s*\$?({_NUMBER})", text)
    if m:
        return float(m[-1].replace(",", ""))
    numbers = re.findall(_NUMBER, text)
    return float(numbers[-1].replace(",", "")) if numbers else None


# ----------------------------------------------------------------------------- formatting


def prompt_text(tokenizer, example: dict) -> str:
    """The prompt through the tokenizer's chat template, or the Alpaca template for base models."""
    user = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    template = ALPACA_PROMPT_WITH_INPUT if example.get("input") else ALPACA_PROMPT
    return template.format(instruction=example["instruction"], input=example.get("input", ""))


def response_text(tokenizer, example: dict) -> str:
    end = getattr(tokenizer, "eos_token", None) or ""
    return example["output"] + end


def tokenize(tokenizer, examples: list[dict], seq_len: int) -> dict[str, np.ndarray]:
    """Fixed-shape arrays: tokens [n, seq_len] int32 (right-padded), loss_mask [n, seq_len] on response tokens.

    Responses that do not fit are truncated; an example whose prompt alone fills seq_len is an error.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((len(examples), seq_len), pad, np.int32)
    mask = np.zeros((len(examples), seq_len), np.float32)
    for i, e in enumerate(examples):
        p = tokenizer(prompt_text(tokenizer, e), add_special_tokens=True)["input_ids"]
        r = tokenizer(response_text(tokenizer, e), add_special_tokens=False)["input_ids"]
        if len(p) >= seq_len:
            raise ValueError(f"example {i}: its prompt is {len(p)} tokens, seq_len={seq_len}: raise seq_len")
        ids = (p + r)[:seq_len]
        tokens[i, : len(ids)] = ids
        mask[i, len(p) : len(ids)] = 1.0
    return {"tokens": tokens, "loss_mask": mask}


def encode_prompts(tokenizer, examples: list[dict], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts [n, length] and their mask, for batched greedy decoding."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((len(examples), length), pad, np.int32)
    mask = np.zeros((len(examples), length), bool)
    for i, e in enumerate(examples):
        ids = tokenizer(prompt_text(tokenizer, e), add_special_tokens=True)["input_ids"][-length:]
        tokens[i, length - len(ids) :] = ids
        mask[i, length - len(ids) :] = True
    return tokens, mask


# ----------------------------------------------------------------------------- partitions


def dirichlet_partition(labels: list, num_clients: int, alpha: float, *, seed: int = 0, min_size: int = 1):
    """Client index lists: for each label, Dirichlet(alpha) proportions over clients (Wang et al. 2020).

    Redraws until every client has at least `min_size` examples; a clear error if that is impossible.
    """
    if len(labels) < num_clients * min_size:
        raise ValueError(f"{len(labels)} examples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    labels = np.asarray([str(x) for x in labels])
    classes = sorted(set(labels))
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client] += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) draw gave every client {min_size} examples: lower data.min_client_size")


def iid_partition(n: int, num_clients: int, *, seed: int = 0) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(chunk.tolist()) for chunk in np.array_split(order, num_clients)]


def partition_table(labels: list, parts: list[list[int]]) -> str:
    """A clients x labels count table, for the run log."""
    classes = sorted({str(x) for x in labels})
    width = max(6, *(len(c) for c in classes))
    lines = ["client " + " ".join(f"{c[:width]:>{width}}" for c in classes) + "  total"]
    for i, part in enumerate(parts):
        counts = Counter(str(labels[j]) for j in part)
        lines.append(f"{i:>6} " + " ".join(f"{counts.get(c, 0):>{width}}" for c in classes) + f"  {len(part):>5}")
    return "\n".join(lines)


def cluster_labels(texts: list[str], k: int = 8, *, seed: int = 0, dims: int = 4096, iters: int = 20) -> np.ndarray:
    """TF-IDF (hashed words) + k-means cluster ids: Alpaca-GPT4's label for the Dirichlet partition."""
    rows = np.zeros((len(texts), dims), np.float32)
    for i, t in enumerate(texts):
        for w in re.findall(r"[a-z0-9]+", t.lower()):
            rows[i, zlib.crc32(w.encode()) % dims] += 1.0
    df = (rows > 0).sum(0)
    x = rows * np.log((1 + len(texts)) / (1 + df) + 1.0)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    rng = np.random.default_rng(seed)
    k = min(k, len(texts))
    centers = x[rng.choice(len(texts), k, replace=False)]
    for _ in range(iters):
        assign = np.argmax(x @ centers.T, axis=1)  # cosine similarity on unit vectors
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c = members.mean(0)
                centers[j] = c / max(np.linalg.norm(c), 1e-8)
    return np.argmax(x @ centers.T, axis=1)
