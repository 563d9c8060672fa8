"""MT-Bench (Zheng et al. 2023) for a run: FastChat's 80 two-turn questions answered from the run's
orbax checkpoint, each turn graded 1-10 by a judge model behind any OpenAI-compatible endpoint. The
paper's Table 1 (its Alpaca-GPT4 columns) reports the mean of these grades, judged by GPT-4o.

As FastChat's llm_judge does it (`gen_model_answer.py`, `gen_judgment.py --mode single`, `common.py`,
`show_result.py`; the files and commit are in assets/mt_bench/README.md):
- the questions, GPT-4's reference answers and the judge prompts are FastChat's files;
- one answer per question at the category's temperature (TEMPERATURE; 0.0 is greedy); the second
  turn is asked with the first question and answer in the conversation;
- each turn is graded alone: turn 1 with `single-v1`, turn 2 with `single-v1-multi-turn`, or their
  `single-math-v1` versions, which show the reference answer, for math, reasoning and coding; a system
  and a user message built as FastChat builds them, at temperature 0 and max_tokens 2048;
- the score is the number in the judgment's first `[[N]]`, else its first `[N]`; a judgment without
  one scores -1 and is left out of the means; a category's and the overall mean are over both turns;
- answers go to `model_answer/<model_id>.jsonl` and judgments to `model_judgment/<judge>_single.jsonl`,
  with FastChat's fields, so that FastChat's own tools (show_result.py, qa_browser.py) read them.
Ours:
- answers come from jaxblock's decoder with the run's chat template (the Alpaca template when the
  tokenizer has none, as in training); sampling is plain temperature sampling, seeded per question and
  turn (transformers' `generate`, which FastChat calls, also applies top_k=50 and the model's
  generation_config); a conversation longer than the model's positions less `max_new_tokens` keeps
  its newest tokens, and such prompts are counted;
- a score outside 1-10 counts as no score (a GPT-4-class judge never gives one);
- every answer and judgment is appended to its file as soon as it exists (a line cut by a kill is
  dropped on the next start), and a rerun asks only what is missing: it never regenerates an answered
  question nor re-judges a judged turn. A judgment the judge fails to give (an HTTP error after the
  retries) is listed, not written, so that a rerun asks again.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxblock.model.generate import generate
from jaxblock.run import base_model, checkpoint, experiment, instruct, runtime
from jaxblock.run.chat_api import ChatClient, ChatError

ASSETS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "assets", "mt_bench"
)
# FastChat's common.temperature_config (8 of its 9 categories; arena-hard-200 is not MT-Bench's);
# a category not listed gets 0.7, as in gen_model_answer.py.
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}  # fmt: skip
DEFAULT_TEMPERATURE = 0.7
NEED_REF = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS: graded against the reference answer
JUDGE_PROMPTS = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")
JUDGE_MAX_TOKENS = 2048  # FastChat's for an OpenAI judge
# No more failed judgments in a row than this: a judge that fails every request stops the run (each
# failure has already waited out its retries) rather than failing the other 150.
MAX_FAILURES_IN_A_ROW = 3
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")  # FastChat's one_score_pattern
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")  # and its backup


@dataclasses.dataclass(frozen=True)
class Bench:
    questions: list[dict]  # {question_id, category, turns: [str, str]}, in question.jsonl's order
    references: dict[int, list[str]]  # question id -> GPT-4's answers to its turns (math, reasoning, coding)
    prompts: dict[str, dict]  # judge prompt name -> {system_prompt, prompt_template, ...}


@dataclasses.dataclass(frozen=True)
class Options:
    """What to answer and how; every field has its command-line flag in scripts/eval.py."""

    out_dir: str = ""  # "" = WORKDIR/mt_bench
    question_ids: tuple[int, ...] = ()  # () = all 80
    limit: int = 0  # only the first `limit` of them (0 = no limit)
    max_new_tokens: int = 1024  # per turn, as FastChat's default
    batch_size: int = 16  # questions decoded at once
    seed: int = 0
    model_id: str = ""  # "" = <workdir name>_step<N>; the base model's gets _base
    judge_max_tokens: int = JUDGE_MAX_TOKENS
    judge_parallel: int = 1  # judge requests in flight
    bench_dir: str = ASSETS

    def __post_init__(self):
        for flag, value, low in (("--limit", self.limit, 0), ("--max-new-tokens", self.max_new_tokens, 1),
                                 ("--batch-size", self.batch_size, 1), ("--judge-max-tokens", self.judge_max_tokens, 1),
                                 ("--judge-parallel", self.judge_parallel, 1)):  # fmt: skip
            if value < low:
                raise ValueError(f"{flag} {value}: must be >= {low}")


# ----------------------------------------------------------------------------- the bench files


def load_bench(directory: str = ASSETS) -> Bench:
    """FastChat's question.jsonl, reference_answer/gpt-4.jsonl and judge_prompts.jsonl from `directory`."""
    paths = {name: os.path.join(directory, name) for name in
             ("question.jsonl", os.path.join("reference_answer", "gpt-4.jsonl"), "judge_prompts.jsonl")}  # fmt: skip
    for path in paths.values():
        if not os.path.isfile(path):
            raise ValueError(f"MT-Bench file {path}: no such file (the bundled ones are in {ASSETS})")
    questions, refs, prompts = (read_records(p, repair=False) for p in paths.values())
    references = {r["question_id"]: r["choices"][0]["turns"] for r in refs}
    prompts = {p["name"]: p for p in prompts}
    missing = [n for n in JUDGE_PROMPTS if n not in prompts]
    if missing:
        raise ValueError(f"{paths['judge_prompts.jsonl']}: no judge prompt {', '.join(missing)}")
    for q in questions:
        if q["category"] in NEED_REF and len(references.get(q["question_id"], ())) < len(q["turns"]):
            raise ValueError(f"MT-Bench question {q['question_id']} ({q['category']}): no reference answer")
    return Bench(questions, references, prompts)


def select(questions: list[dict], ids: tuple[int, ...] = (), limit: int = 0) -> list[dict]:
    """The questions with these ids (all if none), in the bench's order; the first `limit` of them."""
    known = {q["question_id"] for q in questions}
    unknown = sorted(set(ids) - known)
    if unknown:
        raise ValueError(f"--questions {','.join(map(str, unknown))}: no such MT-Bench question "
                         f"(ids {min(known)}-{max(known)})")  # fmt: skip
    chosen = [q for q in questions if not ids or q["question_id"] in set(ids)]
    return chosen[:limit] if limit else chosen


# ----------------------------------------------------------------------------- JSONL records


def read_records(path: str, *, repair: bool = True) -> list[dict]:
    """The JSON objects of a JSONL file ([] if there is none).

    With `repair` (a file this module appends to), a last line without its newline was cut by a kill
    mid-write: it is not a record, and is cut off the file, so that the next append starts a line of
    its own. Any other bad line is a one-line ValueError naming the file and line.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1] if repair else data + b"\n"
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    records = []
    for n, line in enumerate(complete.decode("utf-8").split("\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}, line {n}: not valid JSON ({e.msg}): move the file away to start it anew"
            ) from None
    return records


def append_record(path: str, record: dict) -> None:
    """Appends one JSON line, on disk before returning: a kill loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- answers


def stop_ids(tokenizer, eos_token_id: int | None) -> tuple[int, ...]:
    """Tokens that end an answer: the tokenizer's and the model's EOS, and the end-of-turn token of the
    chat templates of Llama 3 (`<|eot_id|>`) and Qwen2.5 (`<|im_end|>`) when the tokenizer has one
    (FastChat's llama-3 template stops at both 128001 and 128009 too)."""
    ids = {i for i in (tokenizer.eos_token_id, eos_token_id) if i is not None}
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in ("<|eot_id|>", "<|im_end|>") if t in vocab}
    return tuple(sorted(ids))


def _decode_turn(cfg, params, tokenizer, rows: list[list[int]], temps: list[float], keys: list, max_new_tokens: int,
                 stops: tuple[int, ...], batch_size: int) -> list[str]:  # fmt: skip
    """One turn's answers to `rows` (prompt ids, each shorter than the positions left)."""
    n = len(rows)
    rows = rows + [rows[-1]] * (batch_size - n)  # a fixed batch shape: one executable per length
    width = min(cfg.max_position_embeddings - max_new_tokens, 128 * math.ceil(max(map(len, rows)) / 128))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((batch_size, width), pad, np.int32)  # [B,P] left-padded
    mask = np.zeros((batch_size, width), bool)
    for i, ids in enumerate(rows):
        tokens[i, width - len(ids) :] = ids
        mask[i, width - len(ids) :] = True
    temps = jnp.asarray(temps + [0.0] * (batch_size - n), jnp.float32)
    keys = jnp.stack(keys + [keys[-1]] * (batch_size - n))
    out = np.asarray(generate(cfg, params, tokens, max_new_tokens, prompt_mask=mask, eos_token_id=stops,
                              pad_token_id=pad, temperature=temps, rng=keys))  # fmt: skip
    texts = []
    for row in out[:n].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return texts


def answer_questions(cfg, params, tokenizer, questions: list[dict], path: str, model_id: str, options: Options,
                     *, progress: bool = True) -> dict:  # fmt: skip
    """Answers the questions that `path` does not hold yet, both turns, and appends each answer.

    Returns {'generated': answers written now, 'truncated': prompts that lost their oldest tokens}.
    """
    done = {r["question_id"] for r in read_records(path)}
    todo = [q for q in questions if q["question_id"] not in done]
    room = cfg.max_position_embeddings - options.max_new_tokens
    if room < 1:
        raise ValueError(f"--max-new-tokens {options.max_new_tokens} leaves no room for a prompt in the "
                         f"model's {cfg.max_position_embeddings} positions")  # fmt: skip
    stops = stop_ids(tokenizer, cfg.eos_token_id)
    root = jax.random.key(options.seed)
    truncated = 0
    chunks = range(0, len(todo), options.batch_size)
    for start in tqdm.tqdm(chunks, desc=f"{model_id}: answers", leave=False, disable=not progress):
        batch = todo[start : start + options.batch_size]
        temps = [TEMPERATURE.get(q["category"], DEFAULT_TEMPERATURE) for q in batch]
        answers: list[list[str]] = [[] for _ in batch]
        for turn in range(max(len(q["turns"]) for q in batch)):
            live = [i for i, q in enumerate(batch) if turn < len(q["turns"])]
            rows = []
            for i in live:
                messages = []
                for question, reply in zip(batch[i]["turns"][:turn], answers[i], strict=True):
                    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
                ids = instruct.conversation_ids(
                    tokenizer, messages + [{"role": "user", "content": batch[i]["turns"][turn]}]
                )
                truncated += len(ids) > room
                rows.append(ids[-room:])
            keys = [jax.random.fold_in(jax.random.fold_in(root, batch[i]["question_id"]), turn) for i in live]
            texts = _decode_turn(cfg, params, tokenizer, rows, [temps[i] for i in live], keys,
                                 options.max_new_tokens, stops, options.batch_size)  # fmt: skip
            for i, text in zip(live, texts, strict=True):
                answers[i].append(text)
        for q, turns in zip(batch, answers, strict=True):
            append_record(path, answer_record(q["question_id"], model_id, turns))
    return {"generated": len(todo), "truncated": truncated}


def answer_record(question_id: int, model_id: str, turns: list[str]) -> dict:
    """One line of FastChat's model_answer/<model_id>.jsonl."""
    return {"question_id": question_id, "answer_id": uuid.uuid4().hex, "model_id": model_id,
            "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()}  # fmt: skip


# ----------------------------------------------------------------------------- judging


def judge_messages(bench: Bench, question: dict, turns: list[str], turn: int) -> tuple[str, list[dict]]:
    """(judge prompt name, [system, user] messages) grading `turn` (1 or 2) of the answer `turns`,
    as FastChat's run_judge_single builds them."""
    ref = question["category"] in NEED_REF
    name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    prompt = bench.prompts[name]
    kw = {}
    if ref:
        kw["ref_answer_1"] = bench.references[question["question_id"]][0]
        if turn == 2:
            kw["ref_answer_2"] = bench.references[question["question_id"]][1]
    q = question["turns"]
    if turn == 2:
        user = prompt["prompt_template"].format(
            question_1=q[0], question_2=q[1], answer_1=turns[0], answer_2=turns[1], **kw
        )
    else:
        user = prompt["prompt_template"].format(question=q[0], answer=turns[0], **kw)
    return name, [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]


def parse_score(judgment: str) -> int | float:
    """The grade in a judgment: the first `[[N]]`, else the first `[N]` (FastChat's patterns); -1 if
    there is none or it is outside 1-10."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    if match is None:
        return -1
    score = ast.literal_eval(match.group(1))
    return score if 1 <= score <= 10 else -1


def judge_answers(client: ChatClient, bench: Bench, questions: list[dict], answers: dict[str, dict[int, dict]],
                  path: str, options: Options, *, progress: bool = True, log=print) -> dict:  # fmt: skip
    """Grades every turn of every answer that `path` holds no judgment of, appending each judgment.

    answers: model id -> question id -> its answer record. Returns {'judged': judgments written now,
    'requests': HTTP requests made, 'failed': [{question_id, model, turn, error}]}. Raises a one-line
    ValueError when the judge cannot be asked at all (no connection, the key or the model refused),
    or fails MAX_FAILURES_IN_A_ROW judgments in a row; what was judged until then is on disk.
    """
    done = {(r["question_id"], r["model"], r["turn"]) for r in read_records(path) if r["judge"][0] == client.model}
    todo = [(q, model, turn) for model in answers for q in questions for turn in range(1, len(q["turns"]) + 1)
            if (q["question_id"], model, turn) not in done]  # fmt: skip

    def ask(match):
        q, model, turn = match
        name, messages = judge_messages(bench, q, answers[model][q["question_id"]]["choices"][0]["turns"], turn)
        return name, messages, client.complete(messages, temperature=0.0, max_tokens=options.judge_max_tokens)

    stats = {"judged": 0, "requests": 0, "failed": []}
    in_a_row = 0
    with concurrent.futures.ThreadPoolExecutor(max(options.judge_parallel, 1)) as pool:
        futures = {pool.submit(ask, m): m for m in todo}
        try:
            for future in tqdm.tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="judge",
                                    leave=False, disable=not progress):  # fmt: skip
                q, model, turn = futures[future]
                try:
                    name, messages, reply = future.result()
                except ChatError as e:
                    stats["requests"] += e.attempts
                    if e.status in (None, 401, 403, 404):  # every other request would fail the same way
                        raise ValueError(f"judge: {e}") from None
                    in_a_row += 1
                    stats["failed"].append(
                        {"question_id": q["question_id"], "model": model, "turn": turn, "error": str(e)}
                    )
                    log(f"judge: question {q['question_id']} turn {turn} of {model} not judged: {e}")
                    if in_a_row >= MAX_FAILURES_IN_A_ROW:
                        raise ValueError(
                            f"judge: {in_a_row} judgments failed in a row (last: {e}); rerun to resume"
                        ) from None
                    continue
                in_a_row = 0
                stats["requests"] += reply.attempts
                append_record(
                    path, judgment_record(q["question_id"], model, [client.model, name], messages, reply.text, turn)
                )
                stats["judged"] += 1
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # nothing more is asked; those in flight finish unwritten
            raise
    return stats


def judgment_record(question_id: int, model: str, judge: list[str], messages: list[dict], text: str, turn: int):
    """One line of FastChat's model_judgment/<judge>_single.jsonl."""
    return {"question_id": question_id, "model": model, "judge": judge, "user_prompt": messages[1]["content"],
            "judgment": text, "score": parse_score(text), "turn": turn, "tstamp": time.time()}  # fmt: skip


def check_judge(client: ChatClient) -> int:
    """One tiny request (max_tokens=1) before any answer is generated, so that a wrong URL, key or model
    is one line at once rather than after hours of decoding. Returns the requests it took."""
    try:
        return client.complete(
            [{"role": "user", "content": "Reply with OK."}], max_tokens=1, retries=min(client.retries, 2)
        ).attempts
    except ChatError as e:
        raise ValueError(f"judge: {e}") from None


# ----------------------------------------------------------------------------- scores


def _means(rows: list[dict]) -> dict:
    """The mean grade of turn 1, of turn 2 and of both over the `rows` with a score (None if none has
    one), how many have one and how many not."""
    scored = [r for r in rows if r["score"] != -1]

    def mean(turns):
        grades = [r["score"] for r in scored if r["turn"] in turns]
        return float(np.mean(grades)) if grades else None

    return {"turn1": mean((1,)), "turn2": mean((2,)), "mean": mean((1, 2)), "scored": len(scored),
            "unscored": len(rows) - len(scored)}  # fmt: skip


def scores(questions: list[dict], judgments: list[dict], model_id: str, judge_model: str) -> dict:
    """Per category and overall: the mean grades (FastChat's 'Average' is `mean`, over both turns),
    and the judgments of `model_id` by `judge_model` that have no score, listed."""
    category = {q["question_id"]: q["category"] for q in questions}
    mine = [r for r in judgments
            if r["model"] == model_id and r["judge"][0] == judge_model and r["question_id"] in category]  # fmt: skip
    by_category = {}
    for c in dict.fromkeys(q["category"] for q in questions):  # the bench's order
        rows = [r for r in mine if category[r["question_id"]] == c]
        if rows:
            by_category[c] = _means(rows)
    no_score = [{"question_id": r["question_id"], "turn": r["turn"], "judgment": r["judgment"][:200]}
                for r in mine if r["score"] == -1]  # fmt: skip
    return {"categories": by_category, **_means(mine), "no_score": no_score}


def format_table(model_id: str, result: dict) -> str:
    """A model's scores as a text table: one row per category and the overall row."""

    def cell(x):
        return "-" if x is None else f"{x:.2f}"

    lines = [f"{model_id}", f"  {'category':<12} {'turn 1':>7} {'turn 2':>7} {'mean':>7} {'scored':>7} {'no score':>9}"]
    rows = [*result["categories"].items(), ("overall", result)]
    for name, r in rows:
        lines.append(f"  {name:<12} {cell(r['turn1']):>7} {cell(r['turn2']):>7} {cell(r['mean']):>7} "
                     f"{r['scored']:>7} {r['unscored']:>9}")  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a run


def _step(workdir: str, step: int | None) -> int:
    """The checkpoint step to answer from: `step`, or the run's newest."""
    mgr = checkpoint.manager(workdir, read_only=True)
    try:
        steps = sorted(mgr.all_steps())
    finally:
        mgr.close()
    if not steps:
        raise ValueError(f"--workdir {workdir}: no checkpoints yet (train it first with scripts/train.py)")
    if step is not None and step not in steps:
        raise ValueError(f"--step {step}: no such checkpoint step (have {steps})")
    return steps[-1] if step is None else step


def _check_settings(path: str, settings: dict) -> None:
    """Records the settings of the answers in `path`; refuses to add answers made with other ones."""
    side = path[: -len(".jsonl")] + ".settings.json"  # not *.jsonl: FastChat reads every .jsonl as answers
    if os.path.exists(side) and read_records(path):
        with open(side) as f:
            recorded = json.load(f)
        changed = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
        if changed:
            shown = ", ".join(f"{k}={old} (now {new})" for k, (old, new) in changed.items())
            raise ValueError(f"{path} holds answers made with {shown}: pass another --out or --model-id, "
                             "or the settings it was made with")  # fmt: skip
    with open(side, "w") as f:
        json.dump(settings, f, indent=2)


def evaluate_run(
    workdir: str,
    client: ChatClient | None,
    options: Options = Options(),
    *,
    step: int | None = None,
    base: bool = True,
    base_dir: str | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Answers MT-Bench from the run's checkpoint (and from its base model), has `client` judge the
    answers (None: answers only), prints the score table and writes OUT/mt_bench.json.

    OUT (options.out_dir, default WORKDIR/mt_bench) holds model_answer/ and model_judgment/ as
    FastChat's data/mt_bench does. Every input is checked before the first answer is generated: the
    questions, the workdir and step, the base model, and the judge (one request).
    """
    bench = load_bench(options.bench_dir)
    questions = select(bench.questions, options.question_ids, options.limit)
    config = experiment.read_config(workdir)
    step = _step(workdir, step)
    directory = base_model.verify(workdir, config.hf_checkpoint, base_dir)
    out = options.out_dir or os.path.join(workdir, "mt_bench")
    answer_dir, judgment_dir = os.path.join(out, "model_answer"), os.path.join(out, "model_judgment")
    os.makedirs(answer_dir, exist_ok=True)
    requests = check_judge(client) if client else 0
    name = options.model_id or f"{os.path.basename(os.path.abspath(workdir))}_step{step}"
    models = {name: "finetuned", **({f"{name}_base": "base"} if base else {})}
    summary = {"workdir": workdir, "step": step, "out": out, "questions": len(questions), "models": {}}
    tokenizer = None
    for model_id, weights in models.items():
        path = os.path.join(answer_dir, f"{model_id}.jsonl")
        _check_settings(path, {"weights": weights, "step": step, "max_new_tokens": options.max_new_tokens,
                              "seed": options.seed})  # fmt: skip
        have = {r["question_id"] for r in read_records(path)}
        generated = {"generated": 0, "truncated": 0}
        if any(q["question_id"] not in have for q in questions):  # the model is loaded only to answer
            if weights == "finetuned":
                config, cfg, params, _ = experiment.restore_model(workdir, step, base_dir=base_dir, log=log)
            else:
                config.hf_checkpoint = directory or config.hf_checkpoint
                cfg, params = runtime.load_model(config)
            tokenizer = tokenizer or experiment.load_tokenizer(config)
            generated = answer_questions(cfg, params, tokenizer, questions, path, model_id, options, progress=progress)
            del params
        if generated["truncated"]:
            log(f"{model_id}: {generated['truncated']} prompts were longer than the model's positions less "
                f"--max-new-tokens {options.max_new_tokens}: their oldest tokens were left out")  # fmt: skip
        summary["models"][model_id] = {"weights": weights, "answers": path, **generated}
    if client is None:
        log(f"answers in {answer_dir}; no judge asked (--skip-judge)")
        _write_summary(out, summary)
        return summary
    os.makedirs(judgment_dir, exist_ok=True)
    judgments = os.path.join(judgment_dir, f"{re.sub(r'[^A-Za-z0-9._-]+', '_', client.model)}_single.jsonl")
    answers = {m: {r["question_id"]: r for r in read_records(os.path.join(answer_dir, f"{m}.jsonl"))} for m in models}
    stats = judge_answers(client, bench, questions, answers, judgments, options, progress=progress, log=log)
    stats["requests"] += requests
    records = read_records(judgments)
    log(f"MT-Bench, {len(questions)} questions, judged by {client.model} at {client.endpoint} "
        "(single-answer grading, 1-10; judgments with no score are left out of the means)")  # fmt: skip
    for model_id in models:
        result = scores(questions, records, model_id, client.model)
        summary["models"][model_id].update(result)
        log(format_table(model_id, result))
        if result["no_score"]:
            shown = "; ".join(
                f"q{u['question_id']} turn {u['turn']}: {u['judgment'][:60]!r}" for u in result["no_score"][:5]
            )
            more = f"; and {len(result['no_score']) - 5} more" if len(result["no_score"]) > 5 else ""
            log(f"{model_id}: {len(result['no_score'])} judgments with no score (in mt_bench.json): {shown}{more}")
    summary.update(judge={"url": client.endpoint, "model": client.model, "judgments": judgments}, **stats)
    log(f"judge: {stats['judged']} judgments made now ({stats['requests']} requests, the check and retries "
        f"included), {len(records)} in {judgments}")  # fmt: skip
    if stats["failed"]:
        log(f"judge: {len(stats['failed'])} judgments failed (listed above): rerun the same command to ask again")
    _write_summary(out, summary)
    return summary


def _write_summary(out: str, summary: dict) -> None:
    with open(os.path.join(out, "mt_bench.json"), "w") as f:
        json.dump(summary, f, indent=2)
