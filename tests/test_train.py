"""scripts/train.py end to end: workdir contents, resume after a real kill, bad input."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxblock.run import compare, experiment, runtime
from jaxblock.run import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny config, shrunk so that a run takes seconds: random init, synthetic token data.
SMALL = [
    "hf_checkpoint=", "data.source=synthetic",
    "model.vocab_size=256", "model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2",
    "model.head_dim=16", "blocks.layers_per_block=1", "seq_len=32", "batch_size=8", "num_clients=3",
    "local_steps=2", "data.examples_per_client=16", "optimizer.learning_rate=0.003", "blocks.head_block=False",
]  # fmt: skip


def small_config(*extra):
    return config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"), [*SMALL, *extra])


def final_params(workdir):
    """The server params of the latest checkpoint, read with orbax directly (no jaxblock code)."""
    mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta"))
    step = mgr.latest_step()
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mgr.close()
    return step, state["params"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_train_writes_metrics_summary_and_checkpoints(tmp_path):
    workdir = str(tmp_path / "run")
    summary = experiment.train(small_config("rounds=4", "checkpoint.max_to_keep=2"), workdir, progress=False)
    metrics = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    assert summary["blocks"] == 2  # one-layer blocks, head frozen
    assert all({"round", "block", "loss", "seconds"} <= m.keys() and 0 <= m["block"] < 2 for m in metrics)
    assert metrics[-1]["aggregated_round"] == 2  # staleness 1: round 3's deltas wait for the flush
    with open(os.path.join(workdir, "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk["algorithm"] == "parablock" and on_disk["rounds"] == 4 and on_disk["checkpoint_step"] == 4
    assert np.isfinite(summary["final_train_loss"]) and summary["wall_s"] > 0
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [3, 4]  # max_to_keep=2
    step, params = final_params(workdir)
    assert step == 4 and params["layers_0"]["mlp"]["up_proj"].shape == (64, 128)
    # Timeline: one row per client per round; ParaBlock sends round t-1's block during round t, and
    # round 3's in the final flush.
    timeline = read_jsonl(os.path.join(workdir, "timeline.jsonl"))
    assert [(r["round"], r["client"]) for r in timeline] == [(t, c) for t in [0, 1, 2, 3, "flush"] for c in range(3)]
    block_bytes = 2 * 64 * 64 * 4 + 2 * 64 * 32 * 4 + 3 * 64 * 128 * 4 + 2 * 64 * 4  # one layer, float32
    assert all(r["bytes_up"] == (0 if r["round"] == 0 else block_bytes) for r in timeline)
    assert summary["per_client_bytes_up"] == 4 * block_bytes and summary["per_client_compute_s"] > 0
    with open(os.path.join(workdir, "runtime.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_checkpoint_older_than_a_key_resumes_as_its_default(tmp_path):
    """A run saved before a setting existed had its default: equal to it, any other value differs."""
    fed = runtime.fed_config(small_config())
    old_fed = {k: v for k, v in dataclasses.asdict(fed).items() if k not in ("lr_decay", "lr_decay_alpha")}
    workdir = str(tmp_path)  # no config.json: only the federated settings are known
    experiment.check_same_run({"fed": old_fed}, small_config(), workdir)  # no error: the old run had no decay
    with pytest.raises(ValueError, match=r"holds a run with lr_decay=\"none\" \(now \"cosine\"\)"):
        experiment.check_same_run({"fed": old_fed}, small_config("lr_decay=cosine"), workdir)
    # The whole config saved, without a key added since: compared as that key's default.
    saved = small_config().to_dict()
    del saved["comm"]["keep_rounds"], saved["lr_decay"]
    experiment.check_same_run({"config": saved}, small_config(), workdir)
    with pytest.raises(ValueError, match=r"holds a run with lr_decay=\"none\" \(now \"linear\"\):"):
        experiment.check_same_run({"config": saved}, small_config("lr_decay=linear"), workdir)


def test_batch_that_does_not_split_over_the_mesh_is_a_clear_error(tmp_path):
    assert jax.device_count() == 8
    with pytest.raises(ValueError, match=r"batch_size=6 does not split over the 8 data-parallel devices"):
        experiment.train(small_config("batch_size=6"), str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_rerunning_a_finished_run_changes_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    first = experiment.train(small_config("rounds=2"), workdir, progress=False)
    _, params = final_params(workdir)
    again = experiment.train(small_config("rounds=2"), workdir, progress=False)
    _, params_again = final_params(workdir)
    jax.tree.map(np.testing.assert_array_equal, params, params_again)
    assert again["final_train_loss"] == first["final_train_loss"]
    assert len(read_jsonl(os.path.join(workdir, "metrics.jsonl"))) == 2


def test_killed_run_resumes_to_a_bit_identical_model(tmp_path, report):
    """Kill -9 a real train.py process mid-run, rerun the same command, compare with an uninterrupted run."""
    rounds = 20
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config", os.path.join(ROOT, "configs/tiny.py")]
    # Per-client staleness and top-k: the checkpoint holds partly merged rounds, uploads and residuals.
    extra = ["algorithm=parablock", "staleness=[2,1,3]", "compression=topk"]
    cmd += [f"--config.{o}" for o in [*SMALL, f"rounds={rounds}", *extra]]
    cmd += ["--no-progress"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device, as a user would run it
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    # The uninterrupted reference runs at the same time as the run that gets killed.
    reference = subprocess.Popen(
        [*cmd, "--workdir", straight], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    proc = subprocess.Popen([*cmd, "--workdir", killed], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    ckpt = os.path.join(killed, "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline and not (
        os.path.isdir(ckpt) and any(d.isdigit() and int(d) >= 5 for d in os.listdir(ckpt))
    ):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "summary.json")), "killed too late: the run had finished"
    killed_at = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
    assert killed_at < rounds

    resumed = subprocess.run([*cmd, "--workdir", killed], check=True, env=env, capture_output=True, text=True, cwd=ROOT)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    assert f"resuming {killed} from round" in resumed.stdout
    step_a, params_a = final_params(straight)
    step_b, params_b = final_params(killed)
    assert step_a == step_b == rounds
    same = jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params_a, params_b))
    report(f"resume: killed at checkpoint {killed_at}/{rounds}; final model bit-identical: {all(same)}")
    assert all(same)
    a, b = read_jsonl(os.path.join(straight, "metrics.jsonl")), read_jsonl(os.path.join(killed, "metrics.jsonl"))
    assert [(m["round"], m["block"], m["loss"]) for m in a] == [(m["round"], m["block"], m["loss"]) for m in b]


class Stop(Exception):
    pass


def stopped_after_two_checkpoints(monkeypatch, config, workdir) -> list:
    """Runs `config` in `workdir` and stops it right after its 2nd checkpoint is written (as a kill
    then would); returns the rounds it saved."""
    real, saved = experiment.checkpoint.save, []

    def save_then_stop(mgr, *args, **kw):
        real(mgr, *args, **kw)
        saved.append(args[0]["round"])
        if len(saved) == 2:
            mgr.wait_until_finished()
            raise Stop

    monkeypatch.setattr(experiment.checkpoint, "save", save_then_stop)
    with pytest.raises(Stop):
        experiment.train(config, workdir, progress=False)
    monkeypatch.undo()
    return saved


@pytest.mark.parametrize(
    "extra",
    [["algorithm=fedcybgd", "comm.bandwidth_mbps=1"], ["algorithm=fedbuff", "client_slowdown=[1,1,3]", "buffer_size=2"],
     ["algorithm=fedbcd", "compression=topk"]],
    ids=["fedcybgd", "fedbuff", "fedbcd_topk"],
)  # fmt: skip
def test_a_stopped_run_of_each_new_algorithm_resumes_bit_identically(tmp_path, monkeypatch, extra):
    """Stopped right after its 2nd checkpoint (as a kill then would), rerun: the same final model as
    an uninterrupted run, for the state each algorithm adds (FedBuff's updates in flight and clock,
    residuals). ParaBlock with per-client staleness and top-k is killed for real above."""
    config = small_config("rounds=5", *extra)
    summary = experiment.train(config, str(tmp_path / "straight"), progress=False)
    _check_modeled_wall(str(tmp_path / "straight"), summary)
    saved = stopped_after_two_checkpoints(monkeypatch, config, str(tmp_path / "stopped"))
    experiment.train(config, str(tmp_path / "stopped"), progress=False)
    (step_a, a), (step_b, b) = final_params(str(tmp_path / "straight")), final_params(str(tmp_path / "stopped"))
    assert step_a == step_b == 5 and saved == [1, 2]
    jax.tree.map(np.testing.assert_array_equal, a, b)
    straight = read_jsonl(str(tmp_path / "straight" / "metrics.jsonl"))
    resumed = read_jsonl(str(tmp_path / "stopped" / "metrics.jsonl"))
    drop = ("seconds", "client_compute_s", "modeled_rows", "schedule_seconds")
    assert [{k: v for k, v in m.items() if k not in drop} for m in straight] == [
        {k: v for k, v in m.items() if k not in drop} for m in resumed
    ]


def _check_modeled_wall(workdir, summary):
    """summary.json's modelled wall time equals the replay of metrics.jsonl (compare.modeled), and
    for FedCyBGD the sum of the turns (one client works per round, all its communication exposed)."""
    assert compare.modeled(workdir)["modeled_wall_s"] == pytest.approx(summary["modeled_wall_s"], rel=1e-9)
    if summary["algorithm"] == "fedcybgd":
        rows = read_jsonl(os.path.join(workdir, "timeline.jsonl"))
        turns = [r for r in rows if r["compute_s"] > 0]
        assert len(turns) == 5 and all(r["exposed_wait_s"] == r["comm_s"] > 0 for r in turns)
        assert summary["modeled_wall_s"] == pytest.approx(sum(r["compute_s"] + r["comm_s"] for r in turns))
