"""Evaluation from orbax checkpoints and HF export, on a short run of the bundled tiny config."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import jaxblock
from jaxblock.run import config as config_lib
from jaxblock.run import evaluate, experiment, instruct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["rounds=2", "num_clients=3", "local_steps=2", "batch_size=8", "data.sample=300", "data.min_client_size=8",
         "eval.num_examples=24", "eval.batch_size=16", "eval.max_new_tokens=16", "checkpoint.max_to_keep=3"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"), SHORT)
    experiment.train(config, workdir, progress=False)
    return workdir


def test_eval_reports_exact_match_and_loss_for_base_and_finetuned(run_dir, capsys):
    result = experiment.evaluate_run(run_dir)
    out = capsys.readouterr().out
    assert "base: exact match" in out and "finetuned: exact match" in out
    with open(os.path.join(run_dir, "eval.json")) as f:
        on_disk = json.load(f)
    assert on_disk["step"] == 2 and on_disk["n"] == 24
    for name in ("base", "finetuned"):
        assert 0.0 <= on_disk[name]["exact_match"] <= 1.0 and np.isfinite(on_disk[name]["eval_loss"])
        assert on_disk[name]["samples"][0]["gold"] is not None
    # Two rounds of training change the model: the reference responses get likelier.
    assert result["finetuned"]["eval_loss"] < result["base"]["eval_loss"]


def test_eval_at_an_earlier_step_and_bad_workdirs(run_dir, tmp_path):
    early = experiment.evaluate_run(run_dir, step=1, base=False)
    assert early["step"] == 1 and "base" not in early
    with pytest.raises(ValueError, match=r"--step 7: no such checkpoint step \(have \[1, 2\]\)"):
        experiment.evaluate_run(run_dir, step=7)
    with pytest.raises(ValueError, match="no config.json"):
        experiment.evaluate_run(str(tmp_path))


def test_export_loads_and_generates_in_transformers(run_dir, tmp_path, report):
    out = str(tmp_path / "hf")
    assert experiment.export_hf(run_dir, out) == 2
    _, cfg, params, _ = experiment.restore_model(run_dir)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Ana has 3 pens and gets 4 more. How many pens does Ana have now?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        diff = np.abs(hf(ids).logits.numpy() - np.asarray(jaxblock.forward(cfg, params, ids.numpy()))).max()
        generated = hf.generate(ids, max_new_tokens=12, do_sample=False)
    report(f"export_hf: transformers on the exported fine-tuned model vs jaxblock, max |logits diff| = {diff:.1e}")
    assert diff <= 1e-4
    text = tok.decode(generated[0, ids.shape[1] :])
    assert len(text) > 0


def test_export_refuses_to_overwrite_and_never_writes_into_the_base_model_or_the_run(run_dir, tmp_path):
    config = experiment.read_config(run_dir)
    base = config.hf_checkpoint
    before = {name: os.path.getmtime(os.path.join(base, name)) for name in os.listdir(base)}
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"^--out {full} is a non-empty directory: choose another, or pass --force"):
        experiment.export_hf(run_dir, str(full))
    assert os.listdir(full) == ["notes.txt"]
    for out, what in ((base, "the base model's directory"), (run_dir, "the run's workdir")):
        with pytest.raises(ValueError, match=rf"^--out {out} is {what}: export elsewhere$"):
            experiment.export_hf(run_dir, out, force=True)
    assert {name: os.path.getmtime(os.path.join(base, name)) for name in os.listdir(base)} == before
    steps = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    for out in (os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "checkpoints", "x")):  # orbax's
        with pytest.raises(
            ValueError, match=rf"^--out {out} is inside the run's checkpoints directory: export elsewhere$"
        ):
            experiment.export_hf(run_dir, out, force=True)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == steps  # nothing written there


def test_eval_and_export_without_checkpoints_create_nothing(run_dir, tmp_path):
    workdir = tmp_path / "empty"
    workdir.mkdir()
    shutil.copy(os.path.join(run_dir, "config.json"), workdir)
    for call in (
        lambda: experiment.evaluate_run(str(workdir)),
        lambda: experiment.export_hf(str(workdir), str(tmp_path / "o")),
    ):
        with pytest.raises(ValueError, match=r"no checkpoints yet \(train it first with scripts/train.py\)$"):
            call()
    assert os.listdir(workdir) == ["config.json"] and not (tmp_path / "o").exists()


def test_a_moved_or_changed_base_model_is_named_and_base_points_at_a_copy(run_dir, tmp_path):
    config = experiment.read_config(run_dir)
    moved = tmp_path / "run"  # a copy of the run whose base model directory has "moved"
    shutil.copytree(run_dir, moved)
    with open(moved / "base_model.json") as f:
        recorded = json.load(f)
    recorded["path"] = str(tmp_path / "gone")
    with open(moved / "base_model.json", "w") as f:
        json.dump(recorded, f)
    with pytest.raises(
        ValueError, match=rf"^the run's base model {tmp_path}/gone is gone \(recorded in .*\): put it back"
    ):
        experiment.restore_model(str(moved))
    copy = tmp_path / "base_copy"
    shutil.copytree(config.hf_checkpoint, copy)
    assert experiment.restore_model(str(moved), base_dir=str(copy))[3] == 2  # same files elsewhere: fine
    with open(copy / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match=rf"^base model {copy}: tokenizer.json has changed since the run started"):
        experiment.restore_model(str(moved), base_dir=str(copy))


def test_loss_by_token_accounts_for_the_whole_eval_loss(run_dir, capsys):
    config, cfg, params, _ = experiment.restore_model(run_dir)
    tokenizer = experiment.load_tokenizer(config)
    examples = instruct.load_examples(config.eval.source, config.eval.path or None, split="test")[:24]
    kw = {"seq_len": config.seq_len, "batch_size": 16}
    rows = evaluate.loss_by_token(cfg, params, tokenizer, examples, top=100_000, **kw)
    scored = int(instruct.tokenize(tokenizer, examples, config.seq_len)["loss_mask"][:, 1:].sum())
    assert sum(r["count"] for r in rows) == scored and len({r["id"] for r in rows}) == len(rows)
    mean = sum(r["count"] * r["mean_loss"] for r in rows) / scored
    assert mean == pytest.approx(evaluate.eval_loss(cfg, params, tokenizer, examples, **kw), rel=1e-5)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert [r["share"] for r in rows] == sorted((r["share"] for r in rows), reverse=True)
    # Through evaluate_run: the top rows land in eval.json and are printed.
    result = experiment.evaluate_run(run_dir, base=False, loss_by_token=True)
    top = result["finetuned"]["loss_by_token"]
    assert len(top) == 10 and top[0]["token"] == rows[0]["token"]
    assert "the tokens that carry the eval loss" in capsys.readouterr().out
