"""Evaluation while training (`eval.every`): the server model's exact match and eval loss land in the
round's metrics.jsonl row with the modelled wall time so far, training goes on bit for bit as without
it, a resumed run keeps evaluating, and scripts/bench_runs.py --accuracy-plot draws exact match
against modelled wall time from those rows."""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from test_train import ROOT, final_params, read_jsonl, small_config, stopped_after_two_checkpoints

from jaxblock.run import compare, evaluate, experiment, plots
from jaxblock.run import config as config_lib

# The tiny shapes of test_train, with the bundled tokenizer (512 tokens) and 8 of the bundled problems.
EVAL = ["rounds=3", "model.vocab_size=512", f"data.tokenizer={os.path.join(ROOT, 'assets', 'tiny_base')}",
        "eval.num_examples=8", "eval.batch_size=8", "eval.max_new_tokens=8"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{'plain': a run without evaluations, 'evaluated': the same run with eval.every=1, stopped after
    its 2nd checkpoint (round 1) and resumed}."""
    root = tmp_path_factory.mktemp("runs")
    plain, evaluated = str(root / "plain"), str(root / "evaluated")
    experiment.train(small_config(*EVAL), plain, progress=False)
    config = small_config(*EVAL, "eval.every=1")
    monkeypatch = pytest.MonkeyPatch()
    assert stopped_after_two_checkpoints(monkeypatch, config, evaluated) == [1, 2]
    before = read_jsonl(os.path.join(evaluated, "metrics.jsonl"))
    assert [m["round"] for m in before if "eval" in m] == [0, 1]  # written before the stop
    experiment.train(config, evaluated, progress=False)
    return {"plain": plain, "evaluated": evaluated}


def test_evaluating_every_round_leaves_training_bit_identical_and_survives_a_resume(runs):
    (step_a, a), (step_b, b) = final_params(runs["plain"]), final_params(runs["evaluated"])
    assert step_a == step_b == 3
    jax.tree.map(np.testing.assert_array_equal, a, b)
    plain = read_jsonl(os.path.join(runs["plain"], "metrics.jsonl"))
    rows = read_jsonl(os.path.join(runs["evaluated"], "metrics.jsonl"))
    same = ("round", "block", "clients", "loss", "client_loss", "bytes_up")
    assert [{k: m[k] for k in same} for m in plain] == [{k: m[k] for k in same} for m in rows]
    assert not any("eval" in m for m in plain)
    # Every round evaluated, the resumed process's round 2 too, on the 8 problems; the wall time grows.
    assert [m["round"] for m in rows if "eval" in m] == [0, 1, 2]
    evals = [m["eval"] for m in rows]
    assert all(e["n"] == 8 and 0 <= e["exact_match"] <= 1 and np.isfinite(e["loss"]) for e in evals)
    walls = [e["modeled_wall_s"] for e in evals]
    assert 0 < walls[0] < walls[1] < walls[2]
    # ParaBlock's flush merges round 2's deltas: the final model is scored too, at the whole run's wall time.
    with open(os.path.join(runs["evaluated"], "summary.json")) as f:
        summary = json.load(f)
    final = summary["final_eval"]
    assert final["modeled_wall_s"] == summary["modeled_wall_s"] >= walls[2]
    assert "final_eval" not in json.loads(Path(runs["plain"], "summary.json").read_text())
    # ... and the figure is the final checkpoint's, as scripts/eval.py would compute it.
    config = experiment.read_config(runs["evaluated"])
    tokenizer = experiment.load_tokenizer(config)
    examples = experiment.eval_examples(config, 8)
    loss = evaluate.eval_loss(config_lib.model_config(config), b, tokenizer, examples, seq_len=config.seq_len)
    assert final["loss"] == pytest.approx(loss, rel=1e-5) and final["loss"] != evals[2]["loss"]
    # bench_runs' curve replays the same wall times from metrics.jsonl.
    curve = compare.eval_curve(runs["evaluated"])
    assert [(p["round"], p["modeled_wall_s"], p["exact_match"]) for p in curve] == [
        *((m["round"], m["eval"]["modeled_wall_s"], m["eval"]["exact_match"]) for m in rows),
        (None, final["modeled_wall_s"], final["exact_match"]),
    ]
    assert compare.eval_curve(runs["plain"]) == []


def _bench_runs():
    spec = importlib.util.spec_from_file_location("bench_runs", os.path.join(ROOT, "scripts", "bench_runs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_draws_exact_match_against_modelled_wall_time(runs, tmp_path, monkeypatch, capsys):
    # A second run: the evaluated one's files, as if trained over a 0.5 MB/s link (its own links replayed).
    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("metrics.jsonl", "summary.json"):
        shutil.copy(os.path.join(runs["evaluated"], name), slow / name)
    config = json.loads(Path(runs["evaluated"], "config.json").read_text())
    config["comm"]["bandwidth_mbps"] = 0.5
    (slow / "config.json").write_text(json.dumps(config))
    drawn, draw = [], plots.accuracy_curves
    monkeypatch.setattr(plots, "accuracy_curves", lambda curves, *a: (drawn.append(curves), draw(curves, *a)))
    out = tmp_path / "em.png"
    argv = ["bench_runs.py", "--runs", f"pb={runs['evaluated']}", f"slow={slow}", "--accuracy-plot", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    _bench_runs().main()
    assert f"accuracy plot: {out}" in capsys.readouterr().out
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(out) > 5000
    (pb, slower) = drawn[0]
    assert (pb["label"], slower["label"]) == ("pb (parablock)", "slow (parablock)")
    assert [em for _, em in pb["points"]] == [em for _, em in slower["points"]] and len(pb["points"]) == 4
    # Each run over its own link: the same after round 0 (ParaBlock uploads nothing before round 1), then slower.
    walls = [(p, s) for (p, _), (s, _) in zip(pb["points"], slower["points"], strict=True)]
    assert walls[0][0] == walls[0][1] and all(s > p for p, s in walls[1:])

    # A run without evaluations: one line, exit 2, nothing drawn.
    missing = tmp_path / "none.png"
    monkeypatch.setattr("sys.argv", ["bench_runs.py", "--runs", f"pb={runs['evaluated']}",
                                     f"plain={runs['plain']}", "--accuracy-plot", str(missing)])  # fmt: skip
    with pytest.raises(SystemExit) as e:
        _bench_runs().main()
    assert e.value.code == 2 and not missing.exists()
    assert capsys.readouterr().err.strip() == (
        f"error: --accuracy-plot: run plain ({runs['plain']}) has no evaluations in its metrics.jsonl "
        "(train it with --config.eval.every=N)"
    )


def test_eval_every_is_a_setting_checked_before_anything_is_written(tmp_path):
    config = config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"), ["eval.every=2"])
    assert config.eval.every == 2 and config.eval.during_training_examples == 0
    with pytest.raises(ValueError, match=r"^config.eval.every=-1: must be an integer >= 0$"):
        config_lib.validate(small_config("eval.every=-1"))
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as e:  # synthetic data, no tokenizer to decode answers with
        experiment.train(small_config("eval.every=1"), str(workdir), progress=False)
    assert str(e.value) == (
        "eval.every=1: data.tokenizer is empty and there is no hf_checkpoint to take a tokenizer from"
    )
    assert not workdir.exists()
