"""A user's mistakes on the command line get one line naming the cause and exit 2, and write nothing
(issue 27's numbered defects)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _run(script, *args, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "scripts", script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.parametrize(
    "script, args",
    [
        ("server.py", ["--config", TINY, "--workdir"]),
        ("client.py", ["--config", TINY, "--client-id", "0", "--workdir"]),
        ("plan.py", ["--config", TINY, "--out"]),
    ],
)
def test_a_directory_argument_that_is_a_file_is_one_line_exit_2(script, args, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("mine\n")
    proc = _run(script, *args, str(path))
    flag = args[-1]
    assert proc.returncode == 2, proc.stderr[-1500:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].endswith(f"{flag} {path} is a file, not a directory"), proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    assert path.read_text() == "mine\n" and sorted(os.listdir(tmp_path)) == ["a_file"]  # nothing written, nothing lost


@pytest.mark.parametrize(
    "item, message",
    [
        ("runs/tiny", "--runs runs/tiny: give NAME=WORKDIR (e.g. parablock=runs/tiny)"),
        ("x=runs/nonexist", "--runs x=runs/nonexist: runs/nonexist is not a jaxblock run directory (no config.json)"),
    ],
)
def test_bench_runs_bad_runs_are_one_line_exit_2(item, message):
    proc = _run("bench_runs.py", "--runs", item)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {message}"


def test_reproduce_with_a_bad_rows_regex_is_one_line_exit_2_and_writes_nothing(tmp_path):
    proc = _run("reproduce.py", "--config", TINY, "--table", "G1", "--rows", "(d", "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("error: --rows '(d': not a regular expression (missing ), unterminated subpattern at position 0)")
    )
    assert not (tmp_path / "w").exists()


def test_a_client_with_a_missing_keys_directory_says_so_at_once(tmp_path):
    """Before it waits for a server (there is none here): one line, exit 2, nothing written."""
    store = tmp_path / "store"
    proc = _run("client.py", "--config", TINY, "--client-id", "0", "--store", f"file://{store}",
                "--workdir", str(tmp_path / "c"), f"--config.comm.keys={tmp_path / 'nokeys'}", timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert proc.stderr.strip().splitlines()[-1].endswith("no such directory (make keys with scripts/keys.py)")
    assert not (tmp_path / "c").exists() and not store.exists()


@pytest.mark.parametrize(
    "setting, line",
    [
        ("data.path", "data.path={missing}: no such file"),
        ("hf_checkpoint", "hf_checkpoint={missing}: no such directory (a local HF checkpoint or tokenizer)"),
    ],
)
def test_a_client_with_a_missing_data_file_or_base_model_says_so_at_once(tmp_path, setting, line):
    """Its files are checked before it waits for a server (there is none here): one line, exit 2."""
    store, missing = tmp_path / "store", tmp_path / "gone"
    proc = _run("client.py", "--config", TINY, "--client-id", "0", "--store", f"file://{store}",
                "--workdir", str(tmp_path / "c"), f"--config.{setting}={missing}", timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert proc.stderr.strip().splitlines()[-1].endswith(line.format(missing=missing)), proc.stderr[-1500:]
    assert not (tmp_path / "c").exists() and not store.exists()


@pytest.mark.parametrize(
    "script", ["train.py", "server.py", "client.py", "plan.py", "reproduce.py", "blocks.py", "demo.py"]
)
def test_help_shows_the_config_arguments_and_defaults(script):
    proc = _run(script, "--help")
    assert proc.returncode == 0, proc.stderr[-1500:]
    text = " ".join(proc.stdout.split())
    assert "--config FILE" in text and "--config.KEY VALUE" in text
    assert all(name in text for name in ("parablock", "fedbcd", "fedcybgd", "fedbuff", "flora"))
    if script in ("train.py", "server.py", "client.py", "demo.py"):
        assert "--workdir" in text and ("(default: runs/" in text or "default: runs/<config name>" in text)
