"""Experiment trackers (jaxblock/run/tracking.py): the TensorBoard event file read back holds every
figure of metrics.jsonl and timeline.jsonl (each client's loss, the evaluations during training), the
config without secrets and the runtime plot; an unknown backend is one line, exit 2, nothing written."""

import glob
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2, plugin_hparams_pb2
from tensorboardX.record_writer import masked_crc32c
from test_train import ROOT, read_jsonl, small_config

from jaxblock.run import experiment, tracking

# Evaluation every round (eval.every): the bundled tokenizer (512 tokens) decodes 4 of the bundled problems.
EVAL = ["eval.every=1", "model.vocab_size=512", f"data.tokenizer={os.path.join(ROOT, 'assets', 'tiny_base')}",
        "eval.during_training_examples=4", "eval.batch_size=4", "eval.max_new_tokens=8"]  # fmt: skip


def read_events(path):
    """The Event protos of a TFRecord file (length, its CRC, the record, its CRC), every CRC checked."""
    with open(path, "rb") as f:
        data = f.read()
    events, i = [], 0
    while i < len(data):
        header = data[i : i + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[i + 8 : i + 12])[0] == masked_crc32c(header)
        record = data[i + 12 : i + 12 + n]
        assert struct.unpack("<I", data[i + 12 + n : i + 16 + n])[0] == masked_crc32c(record)
        events.append(event_pb2.Event.FromString(record))
        i += 16 + n
    return events


def jsonl_value(tag, step, metrics, timeline, rounds, summary=None):
    """The value metrics.jsonl or timeline.jsonl holds for a tracker tag at a step (the tag's own reading:
    KEY, KEY/client_<i>, KEY/<name>, KEY/count, timeline/FIELD/client_<i>; the flush's timeline at `rounds`,
    and the final model's evaluation, summary.json's `final_eval`, as eval/<figure>)."""
    parts = tag.split("/")
    if parts[0] == "eval" and step == rounds:
        return summary["final_eval"][parts[1]]
    if parts[0] == "timeline":
        field, client = parts[1], int(parts[2].removeprefix("client_"))
        want = "flush" if step == rounds else step
        (row,) = [r for r in timeline if r["round"] == want and r["client"] == client]
        return row[field]
    (row,) = [m for m in metrics if m["round"] == step]
    value = row[parts[0]]
    if len(parts) == 1:
        return value
    if parts[1] == "count":
        return len(value)
    if isinstance(value, dict):
        return value[parts[1].removeprefix("client_")]
    return value[row["clients"].index(int(parts[1].removeprefix("client_")))]


def test_tensorboard_holds_every_value_of_metrics_jsonl(tmp_path):
    workdir = str(tmp_path / "run")
    config = small_config("rounds=2", "tracking.backends=['jsonl', 'tensorboard']", "comm.keys=/secret/dir", *EVAL)
    summary = experiment.train(config, workdir, progress=False)
    metrics = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    timeline = read_jsonl(os.path.join(workdir, "timeline.jsonl"))
    (path,) = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    events = read_events(path)
    scalars, images, plugins = {}, {}, {}
    for e in events:
        for v in e.summary.value:
            if v.HasField("simple_value"):
                assert (v.tag, e.step) not in scalars, f"{v.tag} twice at step {e.step}"
                scalars[v.tag, e.step] = v.simple_value
            elif v.HasField("image"):
                images[v.tag, e.step] = v.image
            elif v.metadata.plugin_data.plugin_name:
                plugins[v.tag] = v.metadata.plugin_data
    # Every scalar is the JSONL's value (TensorBoard keeps float32), ...
    for (tag, step), value in scalars.items():
        assert value == np.float32(jsonl_value(tag, step, metrics, timeline, rounds=2, summary=summary)), (tag, step)
    # ... and every number of every row is there: the server's, each client's, each timeline row's.
    for m in metrics:
        t = m["round"]
        for key in ("loss", "loss_first_step", "loss_last_step", "lr_factor", "seconds", "bytes_down", "block"):
            assert (key, t) in scalars, key
        for c in m["clients"]:
            for key in ("bytes_up", "params_up", "client_compute_s"):
                assert (f"{key}/client_{c}", t) in scalars
        # each client's own loss (its mean over the local steps), as the row holds it; their mean is `loss`
        assert [scalars[f"client_loss/client_{c}", t] for c in m["clients"]] == list(np.float32(m["client_loss"]))
        assert np.mean(m["client_loss"]) == pytest.approx(m["loss"], rel=1e-6) and len(set(m["client_loss"])) == 3
        # eval.every=1: the server model's evaluation, with the modelled wall time so far
        for key in ("exact_match", "loss", "n", "modeled_wall_s"):
            assert scalars[f"eval/{key}", t] == np.float32(m["eval"][key])
        assert ("rejected/count", t) in scalars and ("clients/count", t) in scalars
    assert ("aggregated_round", 1) in scalars and ("aggregated_round", 0) not in scalars  # None: not a number
    assert scalars["eval/loss", 2] == np.float32(summary["final_eval"]["loss"])  # the model after the flush
    for r in timeline:
        step = 2 if r["round"] == "flush" else r["round"]
        for field in ("compute_s", "comm_s", "exposed_wait_s", "bytes_up", "bytes_down"):
            assert (f"timeline/{field}/client_{r['client']}", step) in scalars
    print(f"event file {os.path.getsize(path)} bytes, {len(scalars)} scalars equal to the JSONL's")
    # The config as hyperparameters (HParams plugin), without the key directory; the runtime plot.
    start = plugin_hparams_pb2.HParamsPluginData.FromString(plugins["_hparams_/session_start_info"].content)
    hparams = start.session_start_info.hparams
    assert hparams["rounds"].number_value == 2 and hparams["algorithm"].string_value == "parablock"
    assert hparams["optimizer.learning_rate"].number_value == 0.003 and "data.tokenizer" in hparams
    assert "comm.keys" not in hparams and not any("/secret/dir" in str(v) for v in hparams.values())
    (image,) = images.values()
    assert list(images) == [("runtime", 2)] and image.encoded_image_string.startswith(b"\x89PNG")
    with open(os.path.join(workdir, "runtime.png"), "rb") as f:
        from PIL import Image

        assert (image.width, image.height) == Image.open(f).size


def test_the_config_goes_in_without_secrets():
    config = {
        "rounds": 3,
        "data": {"tokenizer": "assets/tok", "path": ""},
        "eval": {"max_new_tokens": 24},
        "comm": {
            "keys": "keys/server",
            "store": json.dumps(
                {
                    "driver": "s3",
                    "bucket": "runs",
                    "endpoint": "http://127.0.0.1:9000",
                    "aws_credentials": {"type": "environment"},
                    "secret_access_key": "abc",
                }
            ),
        },  # fmt: skip
        "tracking": {"backends": ["jsonl"], "mlflow_uri": "https://me:pa55@mlflow.example/"},
        "wandb_api_key": "k",
        "access_token": "t",
        "password": "p",
    }
    flat = tracking.hyperparameters(config)
    assert flat == {
        "rounds": 3,
        "data.tokenizer": "assets/tok",
        "data.path": "",
        "eval.max_new_tokens": 24,
        "comm.store": '{"bucket": "runs", "driver": "s3", "endpoint": "http://127.0.0.1:9000"}',
        "tracking.backends": '["jsonl"]',
        "tracking.mlflow_uri": "https://mlflow.example/",
    }


def test_the_deployment_logs_left_out_updates_by_reason(tmp_path):
    """log_merge (the server's per-round log) hands its row to the tracker, with the left-out counts by reason."""

    class Recorder(tracking.Tracker):
        def __init__(self):
            self.logged = []

        def log(self, step, scalars):
            self.logged.append((step, scalars))

    recorder = Recorder()
    row = {"round": 3, "merged": [[3, [0, 2]]], "epsilon": 1.5,
           "left_out": [[3, 1, "late: no upload in 600 s"], [2, 4, "norm: 9.1 > 5"], [3, 5, "late: gone"]]}  # fmt: skip
    experiment.log_merge(str(tmp_path / "metrics.jsonl"), row, tracker=recorder)
    (written,) = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert written["left_out_by_reason"] == {"late": 2, "norm": 1}
    assert recorder.logged == [
        (3, {"merged/count": 1.0, "epsilon": 1.5, "left_out/count": 3.0,
             "left_out_by_reason/late": 2.0, "left_out_by_reason/norm": 1.0}),
    ]  # fmt: skip


def test_an_unknown_backend_is_one_line_exit_2(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
           "--config.tracking.backends=['jsonl', 'tensorbored']", "--workdir", str(workdir), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert proc.stderr.strip() == (
        "error: config.tracking.backends: unknown backend 'tensorbored' (choose from jsonl, tensorboard, wandb, mlflow)"
    )
    assert not workdir.exists()


def test_wandb_offline_and_mlflow_local_store(tmp_path):
    """The optional backends (extras jaxblock[wandb], jaxblock[mlflow]; skipped when not installed): a W&B
    offline run and an MLflow run in a local store get the rows, the config and the image."""
    pytest.importorskip("wandb")
    mlflow_tracking = pytest.importorskip("mlflow.tracking")
    config = small_config("tracking.backends=['jsonl', 'wandb', 'mlflow']")
    tracking.check(config)
    os.environ.setdefault("WANDB_SILENT", "true")
    tracker = tracking.make(config.tracking.backends, str(tmp_path), config, name="t")
    assert [t.name for t in tracker.trackers] == ["wandb", "mlflow"]
    rows = [{"round": t, "clients": [0, 2], "loss": 2.5 - t, "bytes_up": [10, 20], "client_compute_s": {0: 0.5, 2: 0.25}}
            for t in range(2)]  # fmt: skip
    for row in rows:
        tracker.log(row["round"], tracking.round_scalars(row))
    png = tmp_path / "runtime.png"
    from PIL import Image

    Image.new("RGB", (8, 4)).save(png)
    tracker.image("runtime", str(png), 2)
    tracker.close()
    assert tracker.trackers and [t.name for t in tracker.trackers] == ["wandb", "mlflow"]  # none failed
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "images" / "runtime_*.png"))
    client = mlflow_tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("jaxblock").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["rounds"] == str(config.rounds)
    assert "comm.keys" not in run.data.params
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(0, 2.5), (1, 1.5)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "bytes_up/client_2")] == [20, 20]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/runtime.png"]
