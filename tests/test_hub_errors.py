"""A checkpoint, tokenizer or dataset the hub cannot give: one line naming the repo id, what failed and
the fix; never a traceback. No network is the case on this machine; the others are faked."""

import os
import subprocess
import sys

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import errors as hub
from test_train import ROOT

from jaxblock.model import hf_io
from jaxblock.run import instruct
from jaxblock.run.config import load_config
from jaxblock.run.experiment import load_tokenizer


def _response(status: int):
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/meta-llama/Llama-3.2-3B"))


def test_the_3b_command_without_the_weights_is_one_line(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config", os.path.join(ROOT, "configs",
           "llama3_2_3b.py"), "--workdir", str(tmp_path / "run")]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
    }
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: hf_checkpoint 'meta-llama/Llama-3.2-3B' on the hub: HF_HUB_OFFLINE is set and it is not in the "
        "local HF cache. Fix: --config.hf_checkpoint=/local/dir (a checkpoint downloaded with `huggingface-cli "
        "download meta-llama/Llama-3.2-3B` where there is network), or --config.hf_checkpoint= (random init)"
    ]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize(
    "error, what, fix",
    [
        (lambda: hub.GatedRepoError("403 Client Error: access to model is restricted", response=_response(403)),
         "gated: your account has not been granted access",
         "request access at https://huggingface.co/meta-llama/Llama-3.2-3B, then run `huggingface-cli login`"),
        (lambda: hub.HfHubHTTPError("401 Client Error: Unauthorized", response=_response(401)),
         "not logged in, or the token has no access", "run `huggingface-cli login` (or set HF_TOKEN)"),
        (lambda: hub.RepositoryNotFoundError("404 Client Error: Repository Not Found", response=_response(404)),
         "not found (or private)", "check the id; if it is private, run `huggingface-cli login`"),
        (lambda: hub.LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known"),
         "no network (the hub is unreachable) and it is not in the local HF cache", "--config.hf_checkpoint=/local"),
    ],
)  # fmt: skip
def test_each_checkpoint_failure_names_repo_reason_and_fix(monkeypatch, error, what, fix):
    def fail(*args, **kwargs):
        raise error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ValueError) as e:
        hf_io.resolve("meta-llama/Llama-3.2-3B")
    line = str(e.value)
    assert line.startswith(f"hf_checkpoint 'meta-llama/Llama-3.2-3B' on the hub: {what}. Fix: {fix}"), line
    assert "\n" not in line and line.endswith("--config.hf_checkpoint= (random init)")


def test_tokenizer_and_datasets_wrapped_by_transformers_and_datasets(monkeypatch):
    """transformers and datasets re-raise the hub's errors as OSError / ConnectionError: still one line."""
    import datasets
    import transformers

    def gated_tokenizer(*args, **kwargs):
        try:
            raise hub.GatedRepoError("403 restricted", response=_response(403))
        except hub.GatedRepoError as e:
            raise OSError("You are trying to access a gated repo. Make sure to have access to it.") from e

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", gated_tokenizer)
    config = load_config(os.path.join(ROOT, "configs", "llama3_8b.py"))
    with pytest.raises(ValueError, match=r"^hf_checkpoint 'meta-llama/Meta-Llama-3-8B' on the hub: gated: "):
        load_tokenizer(config)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ValueError) as e:
        instruct.load_examples("gsm8k", split="test", path_key="eval.path")
    assert str(e.value) == (
        "eval.source=gsm8k: dataset 'openai/gsm8k' on the hub: no network (the hub is unreachable) and it is not "
        "in the local HF cache. Fix: --config.eval.path=FILE.jsonl (its rows exported where there is network)"
    )


def test_an_error_that_is_not_the_hubs_passes_unchanged(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("weight_map")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(KeyError):
        hf_io.resolve("meta-llama/Llama-3.2-3B")
