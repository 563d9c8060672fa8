"""The run's base model, recorded by content so that resume, eval and export can tell if it moved or changed.

A run's checkpoints hold the whole server model, but its tokenizer (and eval's base-model figures)
still come from `hf_checkpoint`. `record` writes `workdir/base_model.json`: the directory the
checkpoint resolved to and the SHA-256 of every file in it (about 1 GB/s: seconds for a 3B model;
at the start, and again at each resume, eval and export). `verify` says in one line what is
missing or different.
"""

from __future__ import annotations

import hashlib
import json
import os

FILE = "base_model.json"


def resolve(hf_checkpoint: str) -> str:
    """The local directory of a checkpoint path or hub repo id (already in the HF cache for a run);
    "" for a random init."""
    from jaxblock.model.hf_io import resolve as hf_resolve

    return os.path.abspath(hf_resolve(hf_checkpoint)) if hf_checkpoint else ""


def fingerprint(directory: str) -> dict[str, str]:
    """{file name: sha256} of the regular files directly in `directory` (symlinks followed, as in the HF cache)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            out[name] = digest.hexdigest()
    return out


def _recorded(workdir: str) -> dict | None:
    path = os.path.join(workdir, FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def recorded_path(workdir: str) -> str | None:
    """The base model directory recorded for the run in `workdir`, if any."""
    recorded = _recorded(workdir)
    return None if recorded is None else recorded["path"]


def record(workdir: str, hf_checkpoint: str) -> None:
    """Writes workdir/base_model.json for a run from `hf_checkpoint` (nothing for a random init)."""
    if not hf_checkpoint:
        return
    directory = resolve(hf_checkpoint)
    with open(os.path.join(workdir, FILE), "w") as f:
        json.dump({"hf_checkpoint": hf_checkpoint, "path": directory, "sha256": fingerprint(directory)}, f, indent=2)


def verify(workdir: str, hf_checkpoint: str, base_dir: str | None = None) -> str | None:
    """The base model directory to use, checked against workdir/base_model.json; None for a random init.

    Args:
      base_dir: where the base model is now, if it moved (its files must be the recorded ones).
    Raises:
      ValueError, one line, if the recorded directory is gone or any of its files differs.
    """
    recorded, path = _recorded(workdir), os.path.join(workdir, FILE)
    if recorded is None:  # a run from before base_model.json existed: nothing to compare with
        return base_dir or resolve(hf_checkpoint) or None
    directory = base_dir or recorded["path"]
    if not os.path.isdir(directory):
        raise ValueError(
            f"the run's base model {directory} is gone (recorded in {path}): put it back, "
            f"or pass --base DIR with the same files"
        )
    now = fingerprint(directory)
    for name, digest in recorded["sha256"].items():
        if name not in now:
            raise ValueError(f"base model {directory}: {name} is missing (recorded in {path})")
        if now[name] != digest:
            raise ValueError(
                f"base model {directory}: {name} has changed since the run started "
                f"(sha256 {now[name][:12]}..., recorded {digest[:12]}... in {path})"
            )
    return directory
