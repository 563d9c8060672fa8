"""Experiment trackers: each round's figures, the config and the runtime plot in TensorBoard, W&B or MLflow.

One writer interface (`Tracker`: `hparams`, `log`, `image`, `close`) and `make(backends, workdir, config)`,
which returns one tracker writing to every backend of `tracking.backends`:

  jsonl        metrics.jsonl and timeline.jsonl, as every run writes them (always on: nothing more here)
  tensorboard  workdir/tensorboard/ (tensorboardX: no TensorFlow)
  wandb        a W&B run (optional extra jaxblock[wandb]; mode 'offline' writes workdir/wandb/, `wandb sync` uploads)
  mlflow       an MLflow run (optional extra jaxblock[mlflow]; tracking.mlflow_uri, '' = workdir/mlflow.db)

What a round logs (`round_scalars`, `timeline_scalars`): every number of its metrics.jsonl row under its key
(`loss`, `lr_factor`, `seconds`, `epsilon`, ...), per-client values as `KEY/client_<i>` (`client_loss`,
`bytes_up`, `client_compute_s`, ...), a dict's numbers as `KEY/<name>` (`left_out_by_reason/<reason>`; with
eval.every, `eval/exact_match`, `eval/loss`, `eval/modeled_wall_s`), any other list as `KEY/count`; and each
client's timeline row as `timeline/<field>/client_<i>` (compute, exposed wait, bytes, ...).
The config goes in as hyperparameters, flattened, without secrets (`hyperparameters`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any

BACKENDS = ("jsonl", "tensorboard", "wandb", "mlflow")
# backend -> (the module it imports, what to install when it is missing)
_NEEDS = {
    "tensorboard": ("tensorboardX", "pip install tensorboardX"),
    "wandb": ("wandb", "pip install 'jaxblock[wandb]'"),
    "mlflow": ("mlflow", "pip install 'jaxblock[mlflow]'"),
}
WANDB_MODES = ("offline", "online", "disabled")


class Tracker:
    """What every backend implements; the base class logs nothing (the 'jsonl' backend: its files are the run's own)."""

    name = "jsonl"

    def hparams(self, config_flat: dict[str, Any]) -> None:
        """The run's settings, once, at the start ({flat key: int, float, bool or str})."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """The scalars of round `step` ({tag: number}); steps come in increasing order."""

    def image(self, tag: str, png_path: str, step: int | None = None) -> None:
        """A PNG file (the runtime plot) as an image."""

    def close(self) -> None:
        """Writes out what is buffered; the tracker is not used after this."""


def backends(config) -> list[str]:
    """`tracking.backends` of a run config (a config without the section: ['jsonl'])."""
    section = config.get("tracking") if hasattr(config, "get") else None
    return list(section.get("backends", ["jsonl"])) if section is not None else ["jsonl"]


def check(config) -> None:
    """ValueError (one line) for a backend that is unknown or whose package is not installed; writes nothing."""
    section = config.get("tracking") if hasattr(config, "get") else None
    if section is None:
        return
    backends = section.get("backends", ["jsonl"])
    if not isinstance(backends, (list, tuple)) or not all(isinstance(b, str) for b in backends):
        raise ValueError(f"config.tracking.backends={backends!r}: must be a list of {', '.join(map(repr, BACKENDS))}")
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"config.tracking.backends: unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
        module, install = _NEEDS.get(b, (None, ""))
        if module and importlib.util.find_spec(module) is None:
            raise ValueError(f"config.tracking.backends: {b!r} needs the {module} package, not installed: {install}")
    mode = section.get("wandb_mode", "offline")
    if "wandb" in backends and mode not in WANDB_MODES:
        raise ValueError(f"config.tracking.wandb_mode={mode!r}: must be one of {', '.join(map(repr, WANDB_MODES))}")


def make(backends, workdir: str, config=None, *, name: str = "") -> Tracker:
    """One tracker writing to each of `backends` (see the module docstring), with `config` logged as
    hyperparameters. `name`: the run's name in W&B and MLflow ('' = tracking.run_name, else the workdir's)."""
    section = config.get("tracking", {}) if config is not None else {}
    name = name or section.get("run_name", "") or os.path.basename(os.path.abspath(workdir))
    project = section.get("project", "") or "jaxblock"
    trackers = []
    for b in dict.fromkeys(backends):  # in order, once each
        if b == "tensorboard":
            trackers.append(TensorBoard(os.path.join(workdir, "tensorboard")))
        elif b == "wandb":
            trackers.append(WandB(workdir, project, name, section.get("wandb_mode", "offline")))
        elif b == "mlflow":
            uri = section.get("mlflow_uri", "") or f"sqlite:///{os.path.abspath(os.path.join(workdir, 'mlflow.db'))}"
            trackers.append(MLflow(uri, project, name, os.path.join(workdir, "mlartifacts")))
        elif b != "jsonl":
            raise ValueError(f"config.tracking.backends: unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
    tracker = FanOut(trackers)
    if config is not None:
        tracker.hparams(hyperparameters(config.to_dict() if hasattr(config, "to_dict") else config))
    return tracker


class FanOut(Tracker):
    """Every call goes to each tracker. A tracker that fails is named once on stderr and left out from
    then on: training goes on (metrics.jsonl holds every figure)."""

    name = "fan-out"

    def __init__(self, trackers: list[Tracker]):
        self.trackers = list(trackers)

    def _each(self, what: str, *args) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, what)(*args)
            except Exception as e:  # a tracker is never worth a training run
                print(f"tracking: {t.name} failed ({what}: {type(e).__name__}: {e}); it logs nothing more",
                      file=sys.stderr, flush=True)  # fmt: skip
                self.trackers.remove(t)

    def hparams(self, config_flat):
        self._each("hparams", config_flat)

    def log(self, step, scalars):
        if scalars:
            self._each("log", int(step), scalars)

    def image(self, tag, png_path, step=None):
        if os.path.exists(png_path):
            self._each("image", tag, png_path, step)

    def close(self):
        self._each("close")


# ----------------------------------------------------------------------------- what is logged

_INVALID_TAG = re.compile(r"[^-/\w.]")  # TensorBoard's own rule, so that every backend sees the same tags


def tag(*parts) -> str:
    return _INVALID_TAG.sub("_", "/".join(str(p) for p in parts)).lstrip("/")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def round_scalars(row: dict) -> dict[str, float]:
    """The scalars of a metrics.jsonl row (the simulator's or the server's): see the module docstring.
    `round` is the step; text and None are left out."""
    clients = row.get("clients")
    per_client = isinstance(clients, list) and len(set(map(str, clients))) == len(clients)
    out: dict[str, float] = {}
    for key, v in row.items():
        if key in ("round", "modeled_rows"):  # the step; FedBuff's timeline rows, logged as such
            continue
        if _number(v):
            out[tag(key)] = float(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                if _number(x):
                    out[tag(key, f"client_{k}" if str(k).isdigit() else k)] = float(x)
        elif isinstance(v, list):
            if (
                key != "clients"
                and v
                and all(_number(x) for x in v)
                and isinstance(clients, list)
                and len(v) == len(clients)
            ):
                if per_client:
                    out.update({tag(key, f"client_{c}"): float(x) for c, x in zip(clients, v, strict=True)})
                else:  # a client twice in one row (FedBuff's arrivals): their mean
                    out[tag(key, "mean")] = float(sum(v) / len(v))
            else:
                out[tag(key, "count")] = float(len(v))
    return out


TIMELINE_SKIP = ("round", "client", "block", "modeled")


def timeline_scalars(rows: list[dict]) -> dict[str, float]:
    """Each timeline row's numbers (compute_s, comm_s, exposed_wait_s, bytes_up, bytes_down, loss, ...) as
    `timeline/<field>/client_<i>`."""
    return {
        tag("timeline", k, f"client_{r['client']}"): float(v)
        for r in rows
        for k, v in r.items()
        if k not in TIMELINE_SKIP and _number(v)
    }


# Keys that name a secret: never logged. Whole words for 'key' and 'token' (data.tokenizer and
# eval.max_new_tokens are settings; comm.keys, api_key, access_token are not), anywhere for the others.
_SECRET_ANYWHERE = ("secret", "credential", "password", "passwd", "auth")
_SECRET_WORDS = ("key", "keys", "token")


def is_secret(key: str) -> bool:
    for word in re.split(r"[^a-z0-9]+", key.lower()):
        if any(s in word for s in _SECRET_ANYWHERE) or word in _SECRET_WORDS or word.endswith("key"):
            return True
    return False


def _scrub(value):
    """A setting's value without secrets: a JSON object (an inline store spec) loses its secret keys, a URL
    its user:password@."""
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if not is_secret(str(k))}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                return json.dumps(_scrub(json.loads(text)), sort_keys=True)
            except ValueError:
                return None  # not JSON after all: it might hold anything
        return re.sub(r"(://)[^/@\s]*@", r"\1", value)
    return value


def hyperparameters(config: dict, prefix: str = "") -> dict[str, Any]:
    """The config flattened to {'a.b': int | float | bool | str}, every key naming a secret left out
    (`is_secret`, at any level) and secrets scrubbed from values (`_scrub`); lists as JSON text."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if is_secret(str(k)):
            continue
        v = _scrub(v)
        if isinstance(v, dict):
            out.update(hyperparameters(v, key + "."))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[key] = "None" if v is None else v
        else:
            out[key] = json.dumps(v, default=str)
    return out


# ----------------------------------------------------------------------------- the backends


class TensorBoard(Tracker):
    """Event files in `logdir` (tensorboardX): scalars (float32, TensorBoard's simple values), the
    hyperparameters in the HParams plugin and as a text table, images."""

    name = "tensorboard"

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=logdir, flush_secs=30)

    def hparams(self, config_flat):
        from tensorboardX.summary import hparams

        writer = self.writer._get_file_writer()
        for summary in hparams(config_flat, {"loss": None}):  # the experiment, session start and end
            writer.add_summary(summary)
        table = "\n".join(f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in config_flat.items())
        self.writer.add_text("config", "| setting | value |\n| --- | --- |\n" + table, 0)

    def log(self, step, scalars):
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def image(self, tag, png_path, step=None):
        import numpy as np
        from PIL import Image

        with Image.open(png_path) as im:
            pixels = np.asarray(im.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self):
        self.writer.close()


class WandB(Tracker):
    """A Weights & Biases run in `dir` (mode 'offline': local files only, `wandb sync` uploads them)."""

    name = "wandb"

    def __init__(self, directory: str, project: str, name: str, mode: str):
        self.wandb = importlib.import_module("wandb")
        os.makedirs(directory, exist_ok=True)
        self.run = self.wandb.init(project=project, name=name, dir=directory, mode=mode)

    def hparams(self, config_flat):
        self.run.config.update(config_flat, allow_val_change=True)

    def log(self, step, scalars):
        self.run.log(dict(scalars), step=step)

    def image(self, tag, png_path, step=None):
        self.run.log({tag: self.wandb.Image(png_path)}, **({} if step is None else {"step": step}))

    def close(self):
        self.run.finish()


class MLflow(Tracker):
    """An MLflow run in experiment `project` of the tracking store `uri` (MlflowClient: nothing global is set)."""

    name = "mlflow"
    _PARAM_CHARS = 6000  # MLflow's longest parameter value

    def __init__(self, uri: str, project: str, name: str, artifacts: str):
        tracking = importlib.import_module("mlflow.tracking")
        self.entities = importlib.import_module("mlflow.entities")
        self.client = tracking.MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(project)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self.client.create_experiment(project, artifact_location=_file_uri(artifacts))
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id

    def hparams(self, config_flat):
        params = [self.entities.Param(k, str(v)[: self._PARAM_CHARS]) for k, v in config_flat.items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 parameters
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step, scalars):
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(k, v, now, step) for k, v in scalars.items() if math.isfinite(v)]
        for i in range(0, len(metrics), 1000):  # and at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def image(self, tag, png_path, step=None):
        self.client.log_artifact(self.run_id, png_path, artifact_path="plots")

    def close(self):
        self.client.set_terminated(self.run_id)


def _file_uri(path: str) -> str:
    return "file://" + os.path.abspath(path)
