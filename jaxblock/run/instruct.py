"""Instruction data: loaders, prompt formatting, fixed-shape tokenization, client partitions.

Loaders return plain example dicts {instruction, input, output, label, answer}:
  alpaca_gpt4   vicgalle/alpaca-gpt4 (instruction, input, output); label = a TF-IDF k-means cluster
  mathinstruct  TIGER-Lab/MathInstruct (source, instruction, output); 50,000 sampled with the seed;
                label = source
  gsm8k         openai/gsm8k, config 'main', test split (question, answer '... #### N'), for eval
Each reads the hub through `datasets`, or a local JSONL file (or .json array) with the same fields;
a bad row is a one-line ValueError naming the file, the line and the problem.
"""

from __future__ import annotations

import inspect
import json
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


# The fields each loader reads, all strings. alpaca_gpt4's input may also be missing or null: most
# Alpaca examples have no input, and files written by other tools leave it out.
FIELDS = {
    "alpaca_gpt4": ("instruction", "output"),
    "mathinstruct": ("source", "instruction", "output"),
    "gsm8k": ("question", "answer"),
}
OPTIONAL = {"alpaca_gpt4": ("input",)}


def _parse(text: str, path: str, first_line: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # `from None`: the decoder's traceback adds nothing to the line and column named here.
        where = f"line {first_line + e.lineno - 1}: not valid JSON ({e.msg} at column {e.colno})"
        raise ValueError(f"data file {path}, {where}") from None


def _file_rows(path: str) -> tuple[str, list[tuple[int, object]]]:
    """A local file's rows as ('line', [(line number, value), ...]), or ('item', ...) for a .json array.

    JSONL is one value a line, blank lines skipped. A .json file holding a JSON array gives its items;
    any other .json file is read as JSONL, as `datasets` did. Not yet checked to be examples.
    """
    if not os.path.isfile(path):
        raise ValueError(f"data file {path}: no such file")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate the BOM some Windows tools write
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.lower().endswith(".json") and text.lstrip().startswith("["):
        items = _parse(text, path, 1)
        return "item", list(enumerate(items, 1))
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines() cuts at.
    lines = enumerate(text.split("\n"), 1)
    return "line", [(n, _parse(line, path, n)) for n, line in lines if line.strip()]


def _hub_rows(name: str, split: str, path_key: str):
    import datasets  # heavy import, only when hub data is loaded

    from jaxblock.model.hf_io import hub_errors

    fix = f"--config.{path_key}=FILE.jsonl (its rows exported where there is network)"
    with hub_errors(f"{path_key.split('.')[0]}.source={name}: dataset", HUB[name], fix):
        if name == "gsm8k":
            return datasets.load_dataset(HUB[name], "main", split=split)
        return datasets.load_dataset(HUB[name], split=split)


def _shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _row_problem(row, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> str | None:
    """Why `row` is not an object with string `fields` (and string-or-null `optional`), or None if it is."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {'null' if row is None else type(row).__name__}"
    missing = [f for f in fields if f not in row]
    if missing:
        names = ", ".join(repr(f) for f in missing)
        has = ", ".join(sorted(map(str, row))) or "no fields"
        return f"missing field{'s' if len(missing) > 1 else ''} {names} (has: {has})"
    for f in fields:
        if not isinstance(row[f], str):
            what = "null" if row[f] is None else f"{_shown(row[f])} ({type(row[f]).__name__})"
            return f"field {f!r} is {what}, expected a string"
    for f in optional:
        if row.get(f) is not None and not isinstance(row[f], str):
            return f"field {f!r} is {_shown(row[f])} ({type(row[f]).__name__}), expected a string or null"
    return None


def _checked(rows, name: str, origin: str, unit: str) -> list[dict]:
    """The rows, each checked to carry `name`'s fields; else a one-line error at the first bad one."""
    fields, optional = FIELDS[name], OPTIONAL.get(name, ())
    out = []
    for n, row in rows:
        problem = _row_problem(row, fields, optional)
        if problem:
            raise ValueError(f"{origin}, {unit} {n}: {problem}")
        out.append(row)
    if not out:
        raise ValueError(f"{origin}: empty (no examples)")
    return out


def _example(name: str, row: dict) -> dict:
    if name == "alpaca_gpt4":
        return {
            "instruction": row["instruction"],
            "input": row.get("input") or "",
            "output": row["output"],
            "label": None,
        }
    if name == "mathinstruct":
        return {"instruction": row["instruction"], "input": "", "output": row["output"], "label": row["source"]}
    rationale, _, final = row["answer"].rpartition("####")
    output = f"{rationale.strip()} The answer is {final.strip()}."
    return {"instruction": row["question"], "input": "", "output": output, "label": None, "answer": parse_number(final)}


def load_examples(
    name: str, path: str | None = None, *, split: str = "train", sample: int = 0, seed: int = 0, path_key="data.path"
):
    """Examples of a named dataset (hub) or a local file with its fields; `sample` draws that many.

    A file's bad row is a one-line ValueError naming the file and its line (item N in a .json array);
    a hub row's names the dataset and the row's index (0-based, as in the hub's viewer). A hub that
    cannot be reached is one line too, whose fix names `path_key` (the setting of a local file).
    """
    if name not in HUB:
        raise ValueError(f"data.name={name!r}: choose one of {', '.join(HUB)}")
    if path:
        unit, rows = _file_rows(path)
        rows = _checked(rows, name, f"data file {path}", unit)
    else:
        hub_rows = enumerate(_hub_rows(name, split, path_key))
        rows = _checked(hub_rows, name, f"{name} data ({HUB[name]}, {split} split)", "row")
    out = [_example(name, r) for r in rows]
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


def _messages(example: dict) -> list[dict]:
    user = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
    return [{"role": "user", "content": user}]


def prompt_text(tokenizer, example: dict) -> str:
    """The prompt through the tokenizer's chat template, or the Alpaca template for base models."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(_messages(example), tokenize=False, add_generation_prompt=True)
    template = ALPACA_PROMPT_WITH_INPUT if example.get("input") else ALPACA_PROMPT
    return template.format(instruction=example["instruction"], input=example.get("input", ""))


def prompt_ids(tokenizer, example: dict) -> list[int]:
    """The prompt's token ids, for training and decoding alike.

    With a chat template: exactly `apply_chat_template(..., add_generation_prompt=True)`'s ids, which
    add no special tokens of their own (the template writes BOS if the model wants one: the bundled
    one does, Llama 3's does, Qwen2.5's has none), so an exported tokenizer used as transformers
    users do gives the ids the model was trained and evaluated on. The Alpaca text gets the
    tokenizer's special tokens (BOS where it adds one).
    """
    return prompts_ids(tokenizer, [example])[0]


def prompts_ids(tokenizer, examples: list[dict]) -> list[list[int]]:
    """`prompt_ids` of every example, encoded as one batch. With a chat template this is what
    apply_chat_template does per conversation: render the template, then encode without special tokens."""
    chat = bool(getattr(tokenizer, "chat_template", None))  # the template writes its own special tokens
    return _encode(tokenizer, [prompt_text(tokenizer, e) for e in examples], special=not chat)


def _encode(tokenizer, texts: list[str], *, special: bool) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]] if texts else []


def conversation_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The ids of a conversation that ends with a user message, ready for the assistant's reply.

    `messages` alternate {'role': 'user' | 'assistant', 'content'}. With a chat template: exactly
    `apply_chat_template(messages, add_generation_prompt=True)`'s ids, as `prompt_ids`. Without one:
    the Alpaca prompt of the first message, then each reply followed by EOS (as training writes a
    response) and the next message as another `### Instruction:` / `### Response:` pair. One user
    message gives `prompt_ids` of that instruction, in both cases.
    """
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(out["input_ids"])
    text = ALPACA_PROMPT.format(instruction=messages[0]["content"])
    for reply, user in zip(messages[1::2], messages[2::2], strict=False):
        text += (
            reply["content"]
            + (tokenizer.eos_token or "")
            + f"\n\n### Instruction:\n{user['content']}\n\n### Response:\n"
        )
    return tokenizer(text, add_special_tokens=True)["input_ids"]


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
    responses = _encode(tokenizer, [response_text(tokenizer, e) for e in examples], special=False)
    for i, (p, r) in enumerate(zip(prompts_ids(tokenizer, examples), responses, strict=True)):
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
    for i, ids in enumerate(prompts_ids(tokenizer, examples)):
        ids = ids[-length:]
        tokens[i, length - len(ids) :] = ids
        mask[i, length - len(ids) :] = True
    return tokens, mask


# ----------------------------------------------------------------------------- partitions


def dirichlet_partition(labels: list, num_clients: int, alpha: float, *, seed: int = 0, min_size: int = 1):
    """Client index lists: for each label, Dirichlet(alpha) proportions over clients (Wang et al. 2020).

    Redraws until every client has at least `min_size` examples; a clear error if that is impossible.
    A `min_size` below 1 counts as 1: a client without data would only fail later, far from the cause.
    """
    min_size = max(min_size, 1)
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
        short = [i for i, p in enumerate(parts) if len(p) < min_size]
        if not short:
            return [sorted(p) for p in parts]
    shown = ", ".join(map(str, short[:8])) + (", ..." if len(short) > 8 else "")
    hint = "raise data.alpha" + (", lower data.min_client_size" if min_size > 1 else "") + " or use fewer clients"
    raise ValueError(
        f"no Dirichlet({alpha}) draw of 1000 gave every client {min_size} example{'s' if min_size > 1 else ''} "
        f"(the last left client{'s' if len(short) > 1 else ''} {shown} short): {hint}"
    )


def iid_partition(n: int, num_clients: int, *, seed: int = 0) -> list[list[int]]:
    """Client index lists: a seeded shuffle of range(n) cut into num_clients parts whose sizes differ by at most 1."""
    if n < num_clients:
        raise ValueError(
            f"{n} examples cannot give each of {num_clients} clients one example (partition=iid): "
            "use fewer clients or more data"
        )
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(chunk.tolist()) for chunk in np.array_split(order, num_clients)]


def flower_partition(name: str, labels: list, num_clients: int, *, alpha: float, seed: int, min_size: int,
                     args: str = "") -> list[list[int]]:  # fmt: skip
    """Client index lists drawn by a flwr-datasets partitioner (`data.partitioner`, e.g.
    'DirichletPartitioner'), as a Flower user partitions a dataset: it partitions a `datasets.Dataset`
    of the examples' labels. The run's settings fill the arguments it takes (num_partitions, seed,
    partition_by='label', alpha, min_partition_size); `args`, a JSON object, adds or replaces any
    (e.g. '{"num_classes_per_partition": 2}' for PathologicalPartitioner)."""
    try:
        import datasets
        from flwr_datasets import partitioner as partitioners
    except ImportError:
        raise ValueError(f"data.partitioner={name}: needs flwr-datasets: pip install 'jaxblock[flower]'") from None
    known = sorted(n for n, c in vars(partitioners).items() if isinstance(c, type)
                   and issubclass(c, partitioners.Partitioner) and c is not partitioners.Partitioner)  # fmt: skip
    if name not in known:
        raise ValueError(f"data.partitioner={name}: not a flwr-datasets partitioner (one of: {', '.join(known)})")
    cls = getattr(partitioners, name)
    try:
        extra = json.loads(args) if args else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"data.partitioner_args={args}: not a JSON object ({e.msg})") from None
    if not isinstance(extra, dict):
        raise ValueError(f"data.partitioner_args={args}: must be a JSON object of {name}'s arguments")
    settings = {"num_partitions": num_clients, "partition_by": "label", "alpha": alpha, "seed": seed,
                "min_partition_size": max(min_size, 1)}  # fmt: skip
    taken = inspect.signature(cls).parameters
    try:
        partitioner = cls(**{k: v for k, v in settings.items() if k in taken}, **extra)
        partitioner.dataset = datasets.Dataset.from_dict({"label": [str(x) for x in labels],
                                                          "index": list(range(len(labels)))})  # fmt: skip
        if partitioner.num_partitions != num_clients:
            raise ValueError(f"it makes {partitioner.num_partitions} partitions for num_clients={num_clients}")
        parts = [sorted(partitioner.load_partition(i)["index"]) for i in range(num_clients)]
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"data.partitioner={name}: {str(e).strip().splitlines()[0]}") from None
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise ValueError(
            f"data.partitioner={name}: clients {empty} got no example (a client without data cannot train)"
        )
    return parts


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
