"""Instruction data: hub-schema loaders on local files, formatting, masks, partitions, bundled assets."""

import json
import os
import re

import numpy as np
import pytest

from jaxblock.run import instruct, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tiny_base"))


def test_alpaca_gpt4_schema(tmp_path):
    rows = [  # vicgalle/alpaca-gpt4's columns: instruction, input, output, text
        {"instruction": f"Give {k} tips for {topic}.", "input": "" if k % 2 else "Be brief.", "output": f"Tip {k}.", "text": "..."}
        for k in range(12) for topic in ("sleep", "cooking python code", "travel")
    ]  # fmt: skip
    examples = instruct.load_examples("alpaca_gpt4", write_jsonl(tmp_path / "a.jsonl", rows))
    assert len(examples) == 36
    assert examples[3]["input"] == "" and examples[0]["input"] == "Be brief."  # k = 1, k = 0
    assert {type(e["label"]) for e in examples} == {int} and 1 < len({e["label"] for e in examples}) <= 8


def test_mathinstruct_schema_and_sampling(tmp_path):
    rows = [{"source": f"data/CoT/src{k % 3}.json", "instruction": f"What is {k} + 1?", "output": f"{k} + 1 = {k + 1}. The answer is {k + 1}."} for k in range(50)]  # fmt: skip
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    examples = instruct.load_examples("mathinstruct", path, sample=20, seed=3)
    assert len(examples) == 20 and examples == instruct.load_examples("mathinstruct", path, sample=20, seed=3)
    assert examples != instruct.load_examples("mathinstruct", path, sample=20, seed=4)
    assert {e["label"] for e in examples} <= {"data/CoT/src0.json", "data/CoT/src1.json", "data/CoT/src2.json"}
    assert all(e["answer"] == float(e["instruction"].split()[2]) + 1 for e in examples)


def test_gsm8k_schema(tmp_path):
    rows = [{"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
             "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"}]  # fmt: skip
    (e,) = instruct.load_examples("gsm8k", write_jsonl(tmp_path / "g.jsonl", rows), split="test")
    assert e["answer"] == 72.0 and e["output"].endswith("The answer is 72.")


GOOD = {"source": "addition", "instruction": "What is 2 + 1?", "output": "2 plus 1 is 3. The answer is 3."}
BAD_FILES = {  # test id: (dataset, file name, file text, the error after "data file PATH")
    "no_such_file": ("gsm8k", "missing.jsonl", None, ": no such file"),
    "empty": ("mathinstruct", "a.jsonl", "", ": empty (no examples)"),
    "blank_lines_only": ("mathinstruct", "a.jsonl", "\n  \n\n", ": empty (no examples)"),
    "malformed_line": (
        "mathinstruct", "a.jsonl", json.dumps(GOOD) + '\n{"source": "addition" "instruction": "x", "output": "y"}\n',
        ", line 2: not valid JSON (Expecting ',' delimiter at column 23)",
    ),
    "output_null_after_blank_line": (  # line numbers count blank lines: they are what an editor shows
        "mathinstruct", "a.jsonl", json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "output": None}) + "\n",
        ", line 3: field 'output' is null, expected a string",
    ),
    "output_int": (
        "mathinstruct", "a.jsonl", json.dumps({**GOOD, "output": 3}), ", line 1: field 'output' is 3 (int), expected a string"
    ),
    "source_int": (
        "mathinstruct", "a.jsonl", json.dumps({**GOOD, "source": 2}), ", line 1: field 'source' is 2 (int), expected a string"
    ),
    "output_missing": (
        "mathinstruct", "a.jsonl", json.dumps(GOOD) + "\n" + json.dumps({"source": "a", "instruction": "b"}),
        ", line 2: missing field 'output' (has: instruction, source)",
    ),
    "answer_missing": ("gsm8k", "g.jsonl", '{"question": "q"}', ", line 1: missing field 'answer' (has: question)"),
    "line_is_a_list": ("mathinstruct", "a.jsonl", json.dumps([GOOD]), ", line 1: expected a JSON object, got list"),
    "alpaca_input_int": (
        "alpaca_gpt4", "a.jsonl", '{"instruction": "i", "input": 5, "output": "o"}',
        ", line 1: field 'input' is 5 (int), expected a string or null",
    ),
    "array_item_null_output": (
        "mathinstruct", "a.json", json.dumps([GOOD, {**GOOD, "output": None}], indent=1),
        ", item 2: field 'output' is null, expected a string",
    ),
    "array_item_not_an_object": ("mathinstruct", "a.json", "[\n" + json.dumps(GOOD) + ',\n"x"\n]', ", item 2: expected a JSON object, got str"),
    "array_malformed": (
        "mathinstruct", "a.json", "[\n" + json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n]",
        ", line 3: not valid JSON (Expecting ',' delimiter at column 1)",
    ),
    "array_empty": ("mathinstruct", "a.json", " [ ]\n", ": empty (no examples)"),
}  # fmt: skip


@pytest.mark.parametrize("name, file, text, error", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_data_file_is_one_line_naming_file_line_and_problem(tmp_path, name, file, text, error):
    path = tmp_path / file
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError) as e:
        instruct.load_examples(name, str(path))
    assert type(e.value) is ValueError  # not json.JSONDecodeError, KeyError, ...
    assert str(e.value) == f"data file {path}{error}" and "\n" not in str(e.value)
    assert e.value.__context__ is None or e.value.__suppress_context__  # no chained traceback above it


def test_bad_hub_row_names_the_dataset_and_row(monkeypatch):
    rows = [{"question": "q", "answer": "a #### 1"}, {"question": "q", "answer": None}]
    monkeypatch.setattr(instruct, "_hub_rows", lambda name, split, path_key: rows)
    with pytest.raises(ValueError) as e:
        instruct.load_examples("gsm8k", split="test")
    assert str(e.value) == "gsm8k data (openai/gsm8k, test split), row 1: field 'answer' is null, expected a string"
    monkeypatch.setattr(instruct, "_hub_rows", lambda name, split, path_key: [])
    with pytest.raises(
        ValueError, match=r"^mathinstruct data \(TIGER-Lab/MathInstruct, train split\): empty \(no examples\)$"
    ):
        instruct.load_examples("mathinstruct")


def test_jsonl_and_json_array_load_the_same_examples(tmp_path):
    rows = [{"instruction": f"Name {k} colours.", "output": f"Red x{k}."} for k in range(6)]
    rows[1]["input"], rows[2]["input"], rows[3]["input"] = "Be brief.", None, ""  # input missing, text, null, empty
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\r\n".join(json.dumps(r) for r in rows) + "\r\n\n")  # CRLF and a trailing blank line
    array = tmp_path / "a.json"
    array.write_text("\ufeff" + json.dumps(rows, indent=2))  # with the BOM some editors write
    lines_in_json = write_jsonl(tmp_path / "lines.json", rows)  # JSON lines in a .json file, as datasets read
    examples = instruct.load_examples("alpaca_gpt4", str(jsonl))
    assert [(e["instruction"], e["input"], e["output"]) for e in examples] == [
        (r["instruction"], r.get("input") or "", r["output"]) for r in rows
    ]
    assert examples == instruct.load_examples("alpaca_gpt4", str(array))
    assert examples == instruct.load_examples("alpaca_gpt4", lines_in_json)


@pytest.mark.parametrize(
    "text, answer",
    [("3 + 4 = 7. The answer is 7.", 7.0), ("so 12 were left", 12.0), ("The answer is 1,250 apples", 1250.0),
     ("The answer is 5. Then 9", 5.0), ("no number", None), ("-3 degrees", -3.0)],
)  # fmt: skip
def test_extract_answer(text, answer):
    assert instruct.extract_answer(text) == answer


def test_tokenize_masks_exactly_the_response(tokenizer):
    e = {"instruction": "Ana has 3 pens and gets 4 more. How many pens does Ana have now?", "input": "",
         "output": "3 + 4 = 7. The answer is 7."}  # fmt: skip
    arrays = instruct.tokenize(tokenizer, [e, e], 64)
    assert arrays["tokens"].shape == arrays["loss_mask"].shape == (2, 64)
    masked = arrays["tokens"][0][arrays["loss_mask"][0] > 0]
    assert tokenizer.decode(masked) == e["output"] + "<|end|>"
    prompt = tokenizer.decode(arrays["tokens"][0][: np.argmax(arrays["loss_mask"][0])])
    assert prompt == "<s><|user|>" + e["instruction"] + "<|end|><|assistant|>"
    with pytest.raises(ValueError, match="its prompt is .* tokens, seq_len=8"):
        instruct.tokenize(tokenizer, [e], 8)
    tokens, mask = instruct.encode_prompts(tokenizer, [e, {**e, "instruction": "Hi?"}], 40)
    assert mask[0].sum() > mask[1].sum() and not mask[1, 0] and mask[1, -1]  # left-padded


@pytest.mark.parametrize("chat", [True, False])
def test_tokenize_in_one_batch_gives_each_example_s_own_ids(tokenizer, chat):
    """tokenize and encode_prompts encode all prompts (and responses) at once: each example's ids are
    apply_chat_template's (with the chat template) or the Alpaca prompt's with special tokens (a base
    model's), and its response encoded on its own."""
    tok = tokenizer if chat else _without_template(tokenizer)
    examples = instruct.load_examples("mathinstruct", os.path.join(ASSETS, "data", "math_train.jsonl"))[:40]
    arrays = instruct.tokenize(tok, examples, 256)
    prompts, prompt_mask = instruct.encode_prompts(tok, examples, 96)
    for i, e in enumerate(examples):
        if chat:
            out = tok.apply_chat_template(instruct._messages(e), add_generation_prompt=True, return_dict=True)
            prompt = list(out["input_ids"])
        else:
            prompt = tok(instruct.prompt_text(tok, e), add_special_tokens=True)["input_ids"]
        assert instruct.prompt_ids(tok, e) == prompt
        ids = prompt + tok(instruct.response_text(tok, e), add_special_tokens=False)["input_ids"]
        assert arrays["tokens"][i, : len(ids)].tolist() == ids[:256]
        assert arrays["loss_mask"][i].sum() == min(len(ids), 256) - len(prompt)
        assert prompts[i][prompt_mask[i]].tolist() == prompt[-96:]


def _without_template(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


def test_exported_chat_template_gives_the_ids_jaxblock_trains_and_evaluates_on(tokenizer, tmp_path):
    """A transformers user's prompt, apply_chat_template(add_generation_prompt=True) on the tokenizer as
    export_hf saves it, is token for token what training and eval/generation use: BOS once, first.
    The whole training sequence is the template's rendering of the question and its answer."""
    from transformers import AutoTokenizer

    from jaxblock.run import assets

    tokenizer.save_pretrained(str(tmp_path))  # as experiment.export_hf does
    exported = AutoTokenizer.from_pretrained(str(tmp_path))
    evals = instruct.load_examples("gsm8k", os.path.join(ASSETS, "data", "math_eval.jsonl"), split="test")[::25]
    batch = instruct.tokenize(tokenizer, evals, 64)
    tokens, mask = instruct.encode_prompts(tokenizer, evals, 40)
    for i, e in enumerate(evals):
        user = [{"role": "user", "content": e["instruction"]}]
        ids = exported.apply_chat_template(user, add_generation_prompt=True)["input_ids"]
        start, end = np.flatnonzero(batch["loss_mask"][i])[[0, -1]]
        assert batch["tokens"][i, :start].tolist() == ids  # training's prompt part
        assert tokens[i, mask[i]].tolist() == ids  # eval's and generate's prompt
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1, ids  # as pretraining
        whole = exported.apply_chat_template(user + [{"role": "assistant", "content": e["output"]}])["input_ids"]
        assert batch["tokens"][i, : end + 1].tolist() == whole
    with open(os.path.join(ASSETS, "tiny_base", "chat_template.jinja")) as f:
        assert f.read() == assets.CHAT_TEMPLATE  # the bundled file is what make_assets.py writes


def test_conversation_ids_continue_the_prompt_turn_after_turn(tokenizer):
    """MT-Bench's second turn: the template over both turns; one turn is exactly `prompt_ids`, with or
    without a chat template (the Alpaca form writes each reply with EOS, as training does)."""
    first = {"instruction": "What is 2 + 1?"}
    turns = [{"role": "user", "content": "What is 2 + 1?"}, {"role": "assistant", "content": "It is 3."},
             {"role": "user", "content": "And 3 + 1?"}]  # fmt: skip
    ids = instruct.conversation_ids(tokenizer, turns)
    assert instruct.conversation_ids(tokenizer, turns[:1]) == instruct.prompt_ids(tokenizer, first)
    assert ids == tokenizer.apply_chat_template(turns, add_generation_prompt=True)["input_ids"]
    assert tokenizer.decode(ids).endswith("<|user|>And 3 + 1?<|end|><|assistant|>")
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tiny_base"))
    plain.chat_template = None  # a base model's tokenizer
    alpaca = plain.decode(instruct.conversation_ids(plain, turns))
    assert instruct.conversation_ids(plain, turns[:1]) == instruct.prompt_ids(plain, first)
    assert alpaca.endswith("### Response:\nIt is 3.<|end|>\n\n### Instruction:\nAnd 3 + 1?\n\n### Response:\n"), alpaca


def test_alpaca_template_for_base_models():
    class NoTemplate:
        chat_template = None

    text = instruct.prompt_text(NoTemplate(), {"instruction": "Sum 2 and 3.", "input": "Use digits."})
    assert (
        text.startswith("Below is an instruction")
        and "### Input:\nUse digits." in text
        and text.endswith("### Response:\n")
    )


def test_dirichlet_partition():
    labels = [s for s in tasks.SOURCES for _ in range(100)]
    parts = instruct.dirichlet_partition(labels, 10, 0.6, seed=0, min_size=8)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(500)) and min(len(p) for p in parts) >= 8
    assert parts == instruct.dirichlet_partition(labels, 10, 0.6, seed=0, min_size=8)
    shares = np.array([[sum(labels[i] == s for i in p) / len(p) for s in tasks.SOURCES] for p in parts])
    assert shares.max(axis=1).mean() > 0.4  # non-IID: clients are dominated by a few sources
    iid = instruct.iid_partition(500, 10, seed=0)
    assert sorted(i for p in iid for i in p) == list(range(500)) and {len(p) for p in iid} == {50}
    table = instruct.partition_table(labels, parts).splitlines()
    assert len(table) == 11 and "addition" in table[0] and table[1].split()[-1] == str(len(parts[0]))
    with pytest.raises(ValueError, match="cannot give 10 clients 60 each"):
        instruct.dirichlet_partition(labels, 10, 0.6, min_size=60)


def test_partitions_never_leave_a_client_empty():
    with pytest.raises(ValueError) as e:
        instruct.iid_partition(3, 4)
    assert str(e.value) == (
        "3 examples cannot give each of 4 clients one example (partition=iid): use fewer clients or more data"
    )
    assert [len(p) for p in instruct.iid_partition(4, 4)] == [1, 1, 1, 1]
    labels = ["a"] * 6 + ["b"] * 6
    for seed in range(10):  # min_size=0 counts as 1: before, seeds 0-3, 5, 6 and 9 left a client empty
        parts = instruct.dirichlet_partition(labels, 4, 0.3, seed=seed, min_size=0)
        assert min(len(p) for p in parts) >= 1 and sorted(i for p in parts for i in p) == list(range(12))
    with pytest.raises(ValueError, match="^2 examples cannot give 3 clients 1 each$"):
        instruct.dirichlet_partition(["a", "b"], 3, 1.0, min_size=0)
    with pytest.raises(ValueError) as e:  # one label, one example a client, alpha ~0: one client takes all
        instruct.dirichlet_partition(["a"] * 4, 4, 0.001, min_size=0)
    assert re.fullmatch(
        r"no Dirichlet\(0\.001\) draw of 1000 gave every client 1 example \(the last left clients? [0-3](, [0-3])* short\): "
        r"raise data\.alpha or use fewer clients",
        str(e.value),
    ), str(e.value)


def test_bundled_data_is_what_the_generator_makes():
    """scripts/make_assets.py remakes assets/data exactly; eval number tuples never occur in training."""
    with open(os.path.join(ASSETS, "data", "math_train.jsonl")) as f:
        train = [json.loads(line) for line in f]
    made = tasks.make_split(800, eval_split=False, seed=0)
    assert train == [{"source": e["source"], "instruction": e["instruction"], "output": e["output"]} for e in made]
    evals = instruct.load_examples("gsm8k", os.path.join(ASSETS, "data", "math_eval.jsonl"), split="test")
    assert len(evals) == 200 and len({e["instruction"] for e in evals}) > 150
    made_eval = tasks.make_split(40, eval_split=True, seed=0)
    assert [e["answer"] for e in evals] == [float(e["answer"]) for e in made_eval]

    def numbers(e):
        return tuple(int(x) for x in re.findall(r"\d+", e["instruction"]))

    assert all(tasks.is_eval_tuple(numbers(e)) for e in made_eval)
    rng = np.random.default_rng(0)  # tasks.tuples (the fact probe's list) covers exactly what _numbers draws
    for source in tasks.SOURCES:
        assert {tasks._numbers(source, rng) for _ in range(20_000)} == set(tasks.tuples(source)), source
    assert not any(tasks.is_eval_tuple(numbers(e)) for e in made)


def test_bundled_base_model_was_pretrained(tokenizer, report):
    """The base model knows the pretraining text far better than a random init, knows most held-out
    arithmetic facts (what fine-tuning must carry over), and its tokenizer chats."""
    import jax

    import jaxblock
    from jaxblock import model
    from jaxblock.fed import local
    from jaxblock.run import assets

    cfg, params = jaxblock.load_hf(os.path.join(ASSETS, "tiny_base"))
    assert cfg.vocab_size == len(tokenizer) and tokenizer.chat_template
    rows = assets.pack(tokenizer, tasks.pretraining_text(200, seed=99), 64)[:16]
    batch = {"tokens": rows, "loss_mask": np.ones(rows.shape, np.float32)}
    loss = float(local.lm_loss(cfg)(params, batch))
    random_loss = float(local.lm_loss(cfg)(model.init(cfg, jax.random.key(1)), batch))
    assert loss < 0.5 * random_loss, (loss, random_loss)
    known = assets.fact_probe(cfg, params, tokenizer)
    report(
        f"bundled base model: held-out facts known {known['all']:.1%} "
        + str({k: round(v, 2) for k, v in known.items()})
    )
    assert known["all"] >= 0.6, known
    assert assets.fact_probe(cfg, model.init(cfg, jax.random.key(1)), tokenizer)["all"] < 0.05


def test_tiny_config_fits_every_bundled_example(tokenizer):
    """configs/tiny.py's seq_len cuts no response and its eval lengths cut no prompt or answer."""
    from jaxblock.run import config as config_lib

    config = config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"))
    examples = instruct.load_examples("mathinstruct", config.data.path)
    batch = instruct.tokenize(tokenizer, examples, config.seq_len)
    last = batch["loss_mask"].shape[1] - 1 - np.argmax(batch["loss_mask"][:, ::-1], axis=1)
    assert (batch["tokens"][np.arange(len(examples)), last] == tokenizer.eos_token_id).all()  # response complete
    evals = instruct.load_examples("gsm8k", config.eval.path, split="test")
    prompts = [len(instruct.prompt_ids(tokenizer, e)) for e in evals]
    responses = [
        len(tokenizer(instruct.response_text(tokenizer, e), add_special_tokens=False)["input_ids"]) for e in evals
    ]
    assert max(prompts) <= config.eval.prompt_len and max(responses) <= config.eval.max_new_tokens


def test_rationale_tokens_match_the_pretraining_text(tokenizer):
    """The response states its arithmetic with the very tokens the base model learnt the fact in
    (' 7 plus 5 is 12'), not a variant (a response starting '7' would use a different token), within seq_len."""
    skip = len(tokenizer("We know", add_special_tokens=False)["input_ids"])  # words tokenize independently
    for e in tasks.make_split(5, eval_split=False, seed=0):
        assert not e["instruction"][0].isdigit()  # a message-initial '81' is not the ' 81' to copy
        numbers = tuple(int(x) for x in re.findall(r"\d+", e["instruction"]))
        stated, answer = tasks.fact(e["source"], numbers)
        example = {"instruction": e["instruction"], "input": "", "output": e["output"]}
        batch = instruct.tokenize(tokenizer, [example], seq_len=64)  # what training sees
        response = batch["tokens"][0][batch["loss_mask"][0] > 0].tolist()
        for part in f"{stated} {answer}".split(", and "):  # two_step states two facts
            known = tokenizer(f"We know {part}", add_special_tokens=False)["input_ids"][skip:]
            assert any(response[i : i + len(known)] == known for i in range(len(response))), (e, part)


def test_run_tokenizer_is_what_autotokenizer_loads(tokenizer, tmp_path):
    """experiment.load_tokenizer skips AutoTokenizer's import for a generic local tokenizer: the same
    class, ids, chat template and special tokens; any other class still goes through AutoTokenizer."""
    from jaxblock.run import config as config_lib
    from jaxblock.run import experiment

    config = config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"))
    fast = experiment.load_tokenizer(config)
    assert type(fast) is type(tokenizer)
    chat = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]
    for t in ("Natalia sold 48 clips.", "  spaces\tand\nlines ", "<|user|>x<|end|>"):
        assert fast(t)["input_ids"] == tokenizer(t)["input_ids"]
    assert fast.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)
    assert fast.all_special_tokens == tokenizer.all_special_tokens and fast.eos_token_id == tokenizer.eos_token_id
    # A tokenizer of a model's own class is not taken for the generic one.
    other = tmp_path / "other"
    tokenizer.save_pretrained(other)
    conf = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**conf, "tokenizer_class": "Qwen2Tokenizer"}))
    assert experiment._tokenizer_class(str(other)) == "Qwen2Tokenizer"
    assert experiment._tokenizer_class(str(tmp_path / "absent")) is None
