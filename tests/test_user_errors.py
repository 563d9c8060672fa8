"""A user's mistakes and damaged files: one clear line (exit 2 for the CLI), and nothing saved is changed.

Bad config values, model overrides that a checkpoint would ignore, resuming with other settings,
and damaged checkpoints (resume falls back to the newest step that restores and deletes nothing).
Data files and HF checkpoints have their own cases in test_instruct.py and test_parity.py.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train import ROOT, final_params, small_config

from jaxblock.run import config as config_lib
from jaxblock.run import experiment, runtime

TINY = os.path.join(ROOT, "configs", "tiny.py")


@pytest.mark.parametrize(
    "override, message",
    [
        ("rounds=True", "--config.rounds=True: expected int, got bool"),
        ("blocks.head_block=1", "--config.blocks.head_block=1: expected bool, got int"),
        ("eta=-1", "config.eta=-1.0: must be a finite number > 0"),
        ("eta=nan", "config.eta=nan: must be a finite number > 0"),
        ("comm.timeout_s=-1", "config.comm.timeout_s=-1.0: must be a finite number > 0"),
        ("data.alpha=-1", "config.data.alpha=-1.0: must be a finite number > 0"),
        ("batch_size=0", "config.batch_size=0: must be an integer >= 1"),
        ("checkpoint.interval=0", "config.checkpoint.interval=0: must be an integer >= 1"),
        ("data.min_client_size=0", "config.data.min_client_size=0: must be an integer >= 1"),
        ("participation=1.5", "config.participation=1.5: must be a number in (0, 1]"),
        ("optimizer.learning_rate=inf", "config.optimizer.learning_rate=inf: must be a finite number > 0"),
        ("data.partition=random", "config.data.partition='random': must be one of 'dirichlet', 'iid'"),
        # The options of issue 13, and the combinations that would silently ignore a setting.
        ("staleness=[1,2]", "staleness lists 2 values for num_clients=10"),
        ("staleness=[1,1,1,1,1,1,1,1,1,0]", "ParaBlock needs staleness >= 1 (0 is FedBCD)"),
        (
            "algorithm=fedbcd --config.staleness=[1,1,1,1,1,1,1,1,1,3]",
            "staleness=[1, 1, 1, 1, 1, 1, 1, 1, 1, 3]: a setting of parablock, which algorithm='fedbcd' does not use",
        ),
        ("compression=zip", "config.compression='zip': must be one of 'none', 'topk'"),
        ("topk_ratio=0", "config.topk_ratio=0.0: must be a number in (0, 1]"),
        (
            "algorithm=fedit --config.compression=topk",
            "compression='topk': update transforms are for parablock and fedbcd, not fedit",
        ),
        ("algorithm=fedcybgd --config.participation=0.5", "FedCyBGD's clients take turns, one per round"),
        (
            "algorithm=fedcybgd --config.num_clients=4",
            "num_clients=4 < 5 blocks (raise blocks.layers_per_block or num_clients)",
        ),
        ("algorithm=fedbuff --config.wire_dtype=bfloat16", "FedBuff runs with wire_dtype='float32'"),
        ("algorithm=fedbuff --config.client_slowdown=[1,2]", "client_slowdown lists 2 values for num_clients=10"),
        ("client_slowdown=[1,-2]", "config.client_slowdown=[1, -2]: must be a list, each value a finite number > 0"),
    ],
)
def test_bad_value_is_one_line_naming_key_and_range(override, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        runtime.parse_args(argparse.ArgumentParser(), ["--config", TINY, *f"--config.{override}".split()])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(message), err  # one line: no usage before it


def test_train_py_refuses_before_writing_anything(tmp_path):
    """The real script: exit 2, one line, and the workdir is never created."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config", TINY, "--config.batch_size=0"]
    proc = subprocess.run([*cmd, "--workdir", str(workdir)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("config.batch_size=0: must be an integer >= 1")
    assert "Traceback" not in proc.stderr and not workdir.exists()


def test_a_model_override_that_the_checkpoint_would_ignore_is_refused(tmp_path):
    config = config_lib.load_config(TINY, ["model.num_layers=2", "model.hidden_size=64", "batch_size=8"])
    with pytest.raises(ValueError) as e:
        experiment.train(config, str(tmp_path / "run"), progress=False)
    assert str(e.value).startswith(
        "config model.hidden_size=64 (checkpoint: 192), model.num_layers=2 (checkpoint: 8) disagrees with "
        f"hf_checkpoint {config.hf_checkpoint}, whose config.json defines the model"
    )
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda wd, tmp: experiment.train(small_config("comm.bandwidth_mbps=-5"), wd, progress=False),
            r"^comm.bandwidth_mbps=-5: must be >= 0$",
        ),
        (
            lambda wd, tmp: experiment.train(small_config(), wd, progress=False, step=2),
            r"^--step 2: .* has no checkpoints yet$",
        ),
        (
            lambda wd, tmp: experiment.serve(small_config("schedule=gradient"), wd, f"file://{tmp}/store"),
            r"^schedule='gradient' needs the server to see data: use the simulator$",
        ),
        (
            lambda wd, tmp: experiment.train(small_config("sim.client_batch=2", "mesh.data=-1"), wd, progress=False),
            r"^sim.client_batch=2: batched clients run on one device, .* use sim.client_batch=1 \(or 0, auto\)$",
        ),
    ],
    ids=["bad link", "--step on a new workdir", "server with an unsupported setting", "batched clients on a mesh"],
)
def test_errors_found_after_setup_still_write_nothing(call, message, tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        call(workdir, tmp_path)
    assert not os.path.exists(workdir) and not os.path.exists(tmp_path / "store")


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(ValueError, match=r"^--workdir .*/run is a file, not a directory$"):
        experiment.train(small_config(), str(tmp_path / "run"), progress=False)


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-round run (checkpoints 1, 2, 3) and its final params."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    experiment.train(small_config("rounds=3"), workdir, progress=False)
    return workdir, final_params(workdir)[1]


def snapshot(workdir):
    """{relative path: bytes} of every file in a workdir."""
    out = {}
    for path in glob.glob(os.path.join(workdir, "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = f.read()
    return out


def test_resuming_with_other_settings_lists_every_difference_and_changes_nothing(finished, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished[0], workdir)
    before = snapshot(workdir)
    with pytest.raises(ValueError) as e:
        experiment.train(
            small_config("rounds=3", "optimizer.learning_rate=0.001", "data.partition=iid"), workdir, progress=False
        )
    assert str(e.value) == (
        f'--workdir {workdir} holds a run with data.partition="dirichlet" (now "iid"), '
        f"optimizer.learning_rate=0.003 (now 0.001): rerun with its settings ({workdir}/config.json) or use a new workdir"
    )
    with pytest.raises(ValueError, match=r"holds a run with num_clients=3 \(now 5\)"):
        experiment.train(small_config("rounds=3", "num_clients=5"), workdir, progress=False)
    with pytest.raises(ValueError, match=r"holds a run with algorithm=\"parablock\" \(now \"fedavg_full\"\)"):
        experiment.train(small_config("rounds=3", "algorithm=fedavg_full"), workdir, progress=False)
    assert snapshot(workdir) == before  # partition.txt, config.json, checkpoints: all as they were
    # Settings that change nothing the run computed may differ; config.json then shows them.
    experiment.train(small_config("rounds=3", "eval.num_examples=5", "checkpoint.interval=2"), workdir, progress=False)
    assert experiment.read_config(workdir).eval.num_examples == 5


def test_train_py_does_not_resume_a_server_workdir(finished, tmp_path):
    """A server's checkpoints hold no client data positions or pending deltas: not a simulator state."""
    workdir = str(tmp_path / "run")
    shutil.copytree(finished[0], workdir)
    for path in glob.glob(os.path.join(workdir, "checkpoints", "*", "meta", "metadata")):
        with open(path) as f:
            meta = json.load(f)
        with open(path, "w") as f:
            json.dump({**meta, "mode": "server"}, f)
    before = snapshot(workdir)
    with pytest.raises(ValueError, match=r"^--workdir .* holds a server run: train.py cannot resume it$"):
        experiment.train(small_config("rounds=3"), workdir, progress=False)
    assert snapshot(workdir) == before


def _largest_chunk(step_dir):
    return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _zero_bytes(path):  # damaged in place: the file still opens and decodes
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\0" * 500)


DAMAGE = {
    "truncated data chunk": lambda d: _truncate(_largest_chunk(d)),
    "deleted data chunk": lambda d: os.remove(_largest_chunk(d)),
    "bytes zeroed in a data chunk": lambda d: _zero_bytes(_largest_chunk(d)),
    "emptied manifest.ocdbt": lambda d: open(os.path.join(d, "state", "manifest.ocdbt"), "w").close(),
    "missing meta/metadata": lambda d: os.remove(os.path.join(d, "meta", "metadata")),
    "truncated meta/metadata": lambda d: _truncate(os.path.join(d, "meta", "metadata")),
    "removed state/": lambda d: shutil.rmtree(os.path.join(d, "state")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_step(finished, tmp_path, damage):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished[0], workdir)
    DAMAGE[damage](os.path.join(workdir, "checkpoints", "3"))
    before = snapshot(workdir)
    logged = []
    _, _, params, step = experiment.restore_model(workdir, log=logged.append)
    assert step == 2 and len(logged) == 1
    assert logged[0].startswith("checkpoint step 3 does not restore (") and logged[0].endswith("): using step 2")
    assert "\n" not in logged[0] and len(logged[0]) < 300
    assert snapshot(workdir) == before  # eval reads; it deletes and writes nothing
    with pytest.raises(ValueError, match=r"^checkpoint step 3 does not restore: "):
        experiment.restore_model(workdir, step=3)


def test_resume_sets_a_damaged_step_aside_and_ends_bit_identical(finished, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished[0], workdir)
    _truncate(_largest_chunk(os.path.join(workdir, "checkpoints", "3")))
    damaged = snapshot(os.path.join(workdir, "checkpoints", "3"))
    experiment.train(small_config("rounds=3"), workdir, progress=False)
    out = capsys.readouterr().out
    assert "checkpoint step 3 does not restore (Exception: Encountered error while reading array" in out
    assert f"resuming {workdir} from round 2 (checkpoint step 2)" in out
    (kept,) = glob.glob(os.path.join(workdir, "set_aside", "step_3_*[0-9]"))
    assert snapshot(kept) == damaged  # moved, not deleted
    jax.tree.map(np.testing.assert_array_equal, final_params(workdir)[1], finished[1])


def test_resume_from_an_earlier_step_sets_the_newer_ones_aside(finished, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished[0], workdir)
    with pytest.raises(ValueError, match=r"^--step 7: no such checkpoint step \(have \[1, 2, 3\]\)$"):
        experiment.train(small_config("rounds=3"), workdir, progress=False, step=7)
    experiment.train(small_config("rounds=3"), workdir, progress=False, step=1)
    assert len(glob.glob(os.path.join(workdir, "set_aside", "step_*[0-9]"))) == 2  # steps 2 and 3
    jax.tree.map(np.testing.assert_array_equal, final_params(workdir)[1], finished[1])
