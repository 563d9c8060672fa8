"""MT-Bench: answers from a run's orbax checkpoint, graded by a real `transformers serve` judge (the
bundled tiny model exported to HF format) end to end, killed and resumed; the judge client's retries
and one-line errors against a scripted in-process server; FastChat's files, prompts and score parsing.

The tiny judge's grades mean nothing (it rarely writes `[[N]]` at all): the path is what is tested.
"""

import hashlib
import http.server
import json
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import jax.numpy as jnp
import numpy as np
import pytest

import jaxblock
from jaxblock.model import hf_io
from jaxblock.run import config as config_lib
from jaxblock.run import experiment, instruct, mt_bench
from jaxblock.run.chat_api import ChatClient, ChatError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BASE = os.path.join(ROOT, "assets", "tiny_base")
SHORT = ["rounds=1", "num_clients=2", "local_steps=1", "batch_size=8", "data.sample=200", "checkpoint.max_to_keep=1"]
# A humanities question (sampled at 0.1), a writing one (0.7) and a reasoning one (greedy, graded against
# GPT-4's reference): the three kinds of question, with the judge prompts that are shortest for the tiny model.
QUESTIONS = "159,85,104"
ANSWER_FLAGS = ["--questions", QUESTIONS, "--no-base", "--max-new-tokens", "16", "--batch-size", "4"]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """`transformers serve` on a free loopback port with the bundled base model, exported by save_hf:
    (base URL, model name). Started first: it boots while the run trains."""
    out = str(tmp_path_factory.mktemp("judge_hf"))
    cfg, params = hf_io.load_hf(TINY_BASE)
    hf_io.save_hf(cfg, params, out)
    experiment.load_tokenizer(config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"))).save_pretrained(out)
    port = _free_port()
    log = open(os.path.join(out, "serve.log"), "w")  # noqa: SIM115 - open for the server's lifetime
    cmd = [os.path.join(os.path.dirname(sys.executable), "transformers"), "serve", out, "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
    yield f"http://127.0.0.1:{port}/v1", out, server
    server.terminate()
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=15)
    log.close()


def _wait_until_up(judge, timeout_s=90.0):
    url, out, server = judge
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, _read(os.path.join(out, "serve.log"))[-2000:]
        try:
            with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=2) as r:
                if r.status == 200:
                    return url, out
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"transformers serve did not come up in {timeout_s} s")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, judge):
    workdir = str(tmp_path_factory.mktemp("run"))
    experiment.train(config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"), SHORT), workdir, progress=False)
    return workdir


def _eval(workdir, *args, timeout=180):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "eval.py"), "--workdir", workdir, "--bench", "mt_bench", *args]
    return cmd, dict(capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env())


def test_end_to_end_against_transformers_serve_killed_and_resumed(run_dir, judge, report):
    """scripts/eval.py answers three questions from the checkpoint and has the real server judge them;
    killed after its first judgment, the rerun asks only the judgments still missing and regenerates
    no answer. Every judgment was asked with FastChat's prompt for its category and turn, and scored
    as parse_score reads the reply (the tiny judge's replies mostly have no score: counted and listed)."""
    url, model = _wait_until_up(judge)
    out = os.path.join(run_dir, "mt_bench")
    flags = [
        *ANSWER_FLAGS,
        "--judge-url",
        url,
        "--judge-model",
        model,
        "--judge-max-tokens",
        "48",
        "--judge-key-env",
        "",
    ]
    cmd, kw = _eval(run_dir, *flags)
    start = time.monotonic()
    with open(os.path.join(run_dir, "first.log"), "w") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=kw["cwd"], env=kw["env"])
        judgments = os.path.join(out, "model_judgment", re.sub(r"[^A-Za-z0-9._-]+", "_", model) + "_single.jsonl")
        while first.poll() is None and time.monotonic() - start < 150:
            if os.path.exists(judgments) and _read(judgments).count("\n") >= 1:
                first.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, _read(os.path.join(run_dir, "first.log"))[-2000:]
    answers_path = os.path.join(out, "model_answer", f"{os.path.basename(run_dir)}_step1.jsonl")
    with open(answers_path, "rb") as f:
        answers_before = f.read()
    with open(judgments, "rb") as f:
        judged_before = f.read()
    judged_before = judged_before[: judged_before.rfind(b"\n") + 1]  # a line cut by the kill is not a judgment
    k = judged_before.count(b"\n")
    assert 1 <= k < 6, f"the kill came after {k} of 6 judgments"

    second = subprocess.run(cmd, **kw)
    elapsed = time.monotonic() - start
    assert second.returncode == 0, second.stderr[-3000:]
    with open(answers_path, "rb") as f:
        assert f.read() == answers_before  # no answer regenerated
    with open(judgments, "rb") as f:
        judged_after = f.read()
    assert judged_after.startswith(judged_before)  # the first run's judgments kept as they were
    summary = json.loads(_read(os.path.join(out, "mt_bench.json")))
    assert summary["judged"] == 6 - k and summary["requests"] == 6 - k + 1  # the missing ones, and the check
    assert summary["failed"] == []

    bench = mt_bench.load_bench()
    questions = {q["question_id"]: q for q in bench.questions}
    answers = {r["question_id"]: r for r in mt_bench.read_records(answers_path)}
    assert sorted(answers) == [85, 104, 159]
    for a in answers.values():  # FastChat's answer format
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert len(a["choices"]) == 1 and len(a["choices"][0]["turns"]) == 2
    records = mt_bench.read_records(judgments)
    assert sorted((r["question_id"], r["turn"]) for r in records) == [(q, t) for q in (85, 104, 159) for t in (1, 2)]
    for r in records:
        name, messages = mt_bench.judge_messages(bench, questions[r["question_id"]], answers[r["question_id"]]["choices"][0]["turns"], r["turn"])  # fmt: skip
        assert r["judge"] == [model, name] and r["user_prompt"] == messages[1]["content"]
        assert r["score"] == mt_bench.parse_score(r["judgment"]) and r["model"] == f"{os.path.basename(run_dir)}_step1"
    prompts = {(r["question_id"], r["turn"]): r["judge"][1] for r in records}
    assert prompts[104, 1] == "single-math-v1" and prompts[104, 2] == "single-math-v1-multi-turn"  # with the reference
    assert prompts[85, 1] == prompts[159, 1] == "single-v1" and prompts[85, 2] == "single-v1-multi-turn"
    result = summary["models"][f"{os.path.basename(run_dir)}_step1"]
    unscored = sum(r["score"] == -1 for r in records)
    assert result["unscored"] == unscored == len(result["no_score"]) and result["scored"] == 6 - unscored
    assert "overall" in second.stdout and "judged by" in second.stdout
    table = second.stdout[second.stdout.index("judged by") :]
    report(f"MT-Bench tiny run vs the tiny judge (transformers serve), 3 questions: killed after {k} of 6 "
           f"judgments, resumed with {summary['requests']} requests; {unscored} of 6 replies had no score; "
           f"{elapsed:.1f} s for both runs")  # fmt: skip
    rows = table.splitlines()[1:]
    rows = rows[: next(i for i, line in enumerate(rows) if line.strip().startswith("overall")) + 1]
    report("MT-Bench tiny table: " + " | ".join(line.strip() for line in rows))


def test_answers_resume_and_equal_an_uninterrupted_run(run_dir, tmp_path):
    """Answers appended question by question: a run stopped after one question and resumed gives the
    answers of a run that never stopped (each question and turn has its own key), a cut last line is
    dropped and redone; greedy categories do not depend on the seed, sampled ones do."""
    config, cfg, params, step = experiment.restore_model(run_dir)
    tokenizer = experiment.load_tokenizer(config)
    qs = mt_bench.select(mt_bench.load_bench().questions, (85, 104))
    options = mt_bench.Options(max_new_tokens=16, batch_size=4)
    whole, parts = str(tmp_path / "whole.jsonl"), str(tmp_path / "parts.jsonl")
    assert mt_bench.answer_questions(cfg, params, tokenizer, qs, whole, "m", options, progress=False)["generated"] == 2
    mt_bench.answer_questions(cfg, params, tokenizer, qs[:1], parts, "m", options, progress=False)
    with open(parts, "a") as f:
        f.write('{"question_id": 104, "answer_id"')  # a line cut by a kill
    assert mt_bench.answer_questions(cfg, params, tokenizer, qs, parts, "m", options, progress=False)["generated"] == 1
    turns = {p: [r["choices"][0]["turns"] for r in mt_bench.read_records(p)] for p in (whole, parts)}
    assert turns[whole] == turns[parts] and len(turns[parts]) == 2
    assert all(t for pair in turns[whole] for t in pair)  # the tiny model answers something to each turn

    other = str(tmp_path / "seed1.jsonl")
    options = mt_bench.Options(max_new_tokens=16, batch_size=4, seed=1)
    mt_bench.answer_questions(cfg, params, tokenizer, qs, other, "m", options, progress=False)
    seeded = [r["choices"][0]["turns"] for r in mt_bench.read_records(other)]
    assert seeded[1] == turns[whole][1]  # 104, reasoning: greedy (temperature 0.0)
    assert seeded[0] != turns[whole][0]  # 85, writing: sampled at 0.7

    # The greedy turn 1 is what plain greedy decoding of the chat template's prompt gives.
    ids = instruct.conversation_ids(tokenizer, [{"role": "user", "content": qs[1]["turns"][0]}])
    new = np.asarray(jaxblock.generate(cfg, params, jnp.asarray([ids]), 16, eos_token_id=tokenizer.eos_token_id))[0]
    end = next((i for i, t in enumerate(new.tolist()) if t == tokenizer.eos_token_id), len(new))
    assert tokenizer.decode(new[:end], skip_special_tokens=True).strip() == turns[whole][1][0]


# ----------------------------------------------------------------------------- the judge client, scripted


class Scripted(http.server.BaseHTTPRequestHandler):
    """Answers each POST with the next (status, body, headers) of `script`, else a chat completion
    whose content is `reply(request)`; records every request body."""

    script: list = []
    seen: list = []
    reply = staticmethod(lambda request: "Fine. Rating: [[7]]")

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"body": body, "auth": self.headers.get("Authorization")})
        status, payload, headers = type(self).script.pop(0) if type(self).script else (200, None, {})
        if payload is None:
            payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": type(self).reply(body)}}]})  # fmt: skip
        data = payload.encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake():
    Scripted.script, Scripted.seen = [], []
    Scripted.reply = staticmethod(lambda request: "Fine. Rating: [[7]]")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", Scripted
    server.shutdown()
    server.server_close()


def test_client_request_format_retries_and_one_line_errors(fake):
    url, handler = fake
    client = ChatClient(url, "judge-x", api_key="sk-test", key_name="$MY_KEY", backoff_s=0.01, retries=3)
    handler.script = [(503, "busy", {}), (429, "slow down", {"Retry-After": "0"})]
    reply = client.complete([{"role": "user", "content": "hi"}], max_tokens=9)
    assert (reply.text, reply.attempts) == ("Fine. Rating: [[7]]", 3)
    assert handler.seen[-1] == {"body": {"model": "judge-x", "messages": [{"role": "user", "content": "hi"}],
                                         "temperature": 0.0, "max_tokens": 9}, "auth": "Bearer sk-test"}  # fmt: skip
    handler.script = [(401, '{"error": "bad key"}', {})]
    with pytest.raises(ChatError, match=r"HTTP 401 .*\(is \$MY_KEY set and valid\?\)") as e:
        client.complete([{"role": "user", "content": "hi"}])
    assert e.value.attempts == 1 and len(str(e.value).splitlines()) == 1  # not retried: the same key fails again
    keyless = ChatClient(url, "judge-x", key_name="$MY_KEY")
    handler.script = [(401, "no key", {})]
    with pytest.raises(ChatError, match=r"\(\$MY_KEY is not set\)"):
        keyless.complete([{"role": "user", "content": "hi"}])
    assert handler.seen[-1]["auth"] is None
    handler.script = [(500, "down", {})] * 3
    with pytest.raises(ChatError, match=r"HTTP 500 .* after 3 tries$") as e:
        client.complete([{"role": "user", "content": "hi"}], retries=2)
    assert e.value.attempts == 3
    handler.script = [(200, "<html>not json</html>", {})]
    with pytest.raises(ChatError, match="the reply is not a chat completion"):
        client.complete([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match=r"^--judge-url 127.0.0.1:8000: expected an http:// or https:// URL$"):
        ChatClient("127.0.0.1:8000", "judge-x")
    with pytest.raises(ValueError, match=r"need a timeout > 0, retries >= 0"):
        ChatClient(url, "judge-x", retries=-1)
    closed = ChatClient(f"http://127.0.0.1:{_free_port()}/v1", "judge-x", retries=1, backoff_s=0.01)
    with pytest.raises(ChatError, match=r"no reply \(.*Connection refused.*\) after 2 tries") as e:
        closed.complete([{"role": "user", "content": "hi"}])
    assert e.value.status is None


@pytest.mark.parametrize(
    "judgment, score",
    [("Good. Rating: [[7]]", 7), ("Rating: [[8.5]] and later [[2]]", 8.5), ("Rating: [9]", 9), ("[[11]]", -1),
     ("I cannot rate this.", -1), ("Rating: [[0]]", -1), ("", -1)],
)  # fmt: skip
def test_parse_score_as_fastchat_and_within_1_to_10(judgment, score):
    assert mt_bench.parse_score(judgment) == score


def _answers(model="m", qids=(81, 104)):
    return {model: {q: mt_bench.answer_record(q, model, [f"answer {q}.1", f"answer {q}.2"]) for q in qids}}


def test_judging_lists_replies_without_score_skips_failures_and_resumes(fake, tmp_path):
    """A reply without [[N]] is a judgment scored -1 (counted, listed); a request the server refuses
    (HTTP 400) is listed and not written, and the rerun asks it and nothing else."""
    url, handler = fake
    bench = mt_bench.load_bench()
    qs = mt_bench.select(bench.questions, (81, 104))
    path = str(tmp_path / "judge-x_single.jsonl")
    client = ChatClient(url, "judge-x", backoff_s=0.01)
    handler.reply = staticmethod(lambda r: "no score here" if "answer 81.2" in r["messages"][1]["content"] else "[[6]]")
    handler.script = [(200, None, {}), (400, '{"error": "context too long"}', {})]
    logged = []
    stats = mt_bench.judge_answers(
        client, bench, qs, _answers(), path, mt_bench.Options(), progress=False, log=logged.append
    )
    assert stats["judged"] == 3 and stats["requests"] == 4 and len(stats["failed"]) == 1
    assert stats["failed"][0]["turn"] == 2 and stats["failed"][0]["question_id"] == 81  # the second request
    assert "not judged" in logged[0] and "HTTP 400" in logged[0]
    # FastChat's messages: single-v1's system prompt and filled template; single-math-v1-multi-turn's, with the reference
    first = handler.seen[0]["body"]
    assert first["messages"][0] == {"role": "system", "content": bench.prompts["single-v1"]["system_prompt"]}
    assert first["messages"][1]["content"].endswith(
        "[The Start of Assistant's Answer]\nanswer 81.1\n[The End of Assistant's Answer]"
    )
    assert (first["temperature"], first["max_tokens"]) == (0.0, 2048)
    last = [s["body"] for s in handler.seen if "answer 104.2" in s["body"]["messages"][1]["content"]][0]
    assert bench.references[104][1] in last["messages"][1]["content"]
    assert last["messages"][0]["content"] == bench.prompts["single-math-v1-multi-turn"]["system_prompt"]

    handler.seen.clear()
    stats = mt_bench.judge_answers(client, bench, qs, _answers(), path, mt_bench.Options(), progress=False)
    assert stats == {"judged": 1, "requests": 1, "failed": []} and len(handler.seen) == 1
    records = mt_bench.read_records(path)
    assert len(records) == 4 and sorted(r["score"] for r in records) == [-1, 6, 6, 6]
    result = mt_bench.scores(qs, records, "m", "judge-x")
    assert (result["mean"], result["scored"], result["unscored"]) == (6.0, 3, 1)
    assert result["categories"]["writing"] == {"turn1": 6.0, "turn2": None, "mean": 6.0, "scored": 1, "unscored": 1}
    assert result["no_score"] == [{"question_id": 81, "turn": 2, "judgment": "no score here"}]
    assert "overall" in mt_bench.format_table("m", result)


def test_a_judge_that_fails_every_request_stops_the_run_in_one_line(fake, tmp_path):
    url, handler = fake
    bench = mt_bench.load_bench()
    handler.script = [(503, "down", {})] * 100
    client = ChatClient(url, "judge-x", retries=1, backoff_s=0.0)
    path = str(tmp_path / "j.jsonl")
    with pytest.raises(
        ValueError, match=r"^judge: 3 judgments failed in a row \(last: .*HTTP 503.*\); rerun to resume$"
    ):
        mt_bench.judge_answers(client, bench, mt_bench.select(bench.questions, (81, 104)), _answers(), path,
                               mt_bench.Options(), progress=False, log=lambda line: None)  # fmt: skip
    assert mt_bench.read_records(path) == []


def test_bad_input_is_one_line_before_any_answer(run_dir, fake, tmp_path, monkeypatch, capsys):
    """A wrong workdir, question id or step, or a judge that refuses the key or cannot be reached: one
    line (exit 2 from the script), and no answer generated (the judge is asked before the model loads)."""
    url, handler = fake
    handler.script = [(401, "invalid key", {})]
    out = str(tmp_path / "out")
    monkeypatch.delenv("JAXBLOCK_TEST_NO_SUCH_KEY", raising=False)
    argv = ["eval.py", "--workdir", run_dir, "--bench", "mt_bench", *ANSWER_FLAGS, "--out", out, "--judge-url", url,
            "--judge-model", "judge-x", "--judge-key-env", "JAXBLOCK_TEST_NO_SUCH_KEY"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, "scripts", "eval.py"), run_name="__main__")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert (
        err[0].startswith("error: judge: ")
        and "HTTP 401" in err[0]
        and "($JAXBLOCK_TEST_NO_SUCH_KEY is not set)" in err[0]
    )
    assert handler.seen[0]["body"]["max_tokens"] == 1  # the check, and nothing after it
    assert not os.path.exists(os.path.join(out, "model_answer", f"{os.path.basename(run_dir)}_step1.jsonl"))
    closed = ChatClient(f"http://127.0.0.1:{_free_port()}/v1", "judge-x", retries=0)
    with pytest.raises(ValueError, match=r"^judge: .*no reply \(.*\) after 1 try$"):
        mt_bench.evaluate_run(run_dir, closed, mt_bench.Options(out_dir=out), base=False, log=lambda line: None)
    with pytest.raises(ValueError, match=r"no config.json \(not a jaxblock run directory\)"):
        mt_bench.evaluate_run(str(tmp_path), None, mt_bench.Options(out_dir=out))
    with pytest.raises(ValueError, match=r"^--questions 7: no such MT-Bench question \(ids 81-160\)$"):
        mt_bench.evaluate_run(run_dir, None, mt_bench.Options(question_ids=(81, 7), out_dir=out))
    with pytest.raises(ValueError, match=r"^--step 9: no such checkpoint step \(have \[1\]\)$"):
        mt_bench.evaluate_run(run_dir, None, mt_bench.Options(out_dir=out), step=9)
    assert not os.path.exists(os.path.join(out, "model_answer", f"{os.path.basename(run_dir)}_step1.jsonl"))


def test_the_bundled_bench_is_fastchats():
    """80 questions, 10 in each of 8 categories; GPT-4 references for exactly the 30 math, reasoning and
    coding questions; the four single-answer judge prompts; the files' hashes as their README says."""
    bench = mt_bench.load_bench()
    counts = {}
    for q in bench.questions:
        counts[q["category"]] = counts.get(q["category"], 0) + 1
        assert len(q["turns"]) == 2
    assert counts == {
        c: 10 for c in ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
    }
    need = {q["question_id"] for q in bench.questions if q["category"] in mt_bench.NEED_REF}
    assert set(bench.references) == need and len(need) == 30
    assert set(mt_bench.TEMPERATURE) == set(counts)
    with open(os.path.join(mt_bench.ASSETS, "README.md")) as f:
        readme = f.read()
    for name in ("question.jsonl", "reference_answer/gpt-4.jsonl", "judge_prompts.jsonl"):
        with open(os.path.join(mt_bench.ASSETS, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() in readme, name


def test_a_run_scored_by_mt_bench_refuses_exact_match_and_evaluation_during_training(run_dir, tmp_path):
    """eval.source=mt_bench (the Alpaca configs): exact match and eval.every are one line each, naming
    what to do instead; --bench gsm8k still scores such a run on GSM8K (the hub's)."""
    config = config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"), ["eval.source=mt_bench", "eval.every=5"])
    with pytest.raises(ValueError, match=r"^eval.every=5: eval.source=mt_bench needs a judge .*: set eval.every=0$"):
        experiment.training_evaluator(config, config_lib.model_config(config))
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    saved["eval"]["source"] = "mt_bench"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(
        ValueError,
        match=r"^eval.source=mt_bench: exact match needs gsm8k \(MT-Bench: scripts/eval.py --bench mt_bench\)$",
    ):
        experiment.evaluate_run(str(tmp_path))
