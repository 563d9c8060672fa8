"""What the ServerApp and its ClientApps agree on: the run (a jaxblock config file and its overrides,
from Flower's run-config) and which jaxblock client a SuperNode is (its `--node-config`)."""

from __future__ import annotations

import dataclasses
import os
import shlex

import ml_collections

RECORD = "jaxblock"  # the ConfigRecord of the server's message and of the client's reply
MESSAGE_TYPE = "train"


@dataclasses.dataclass(frozen=True)
class FlowerRun:
    """One jaxblock run as Flower's run-config gives it (`[tool.flwr.app.config]`, `--run-config`)."""

    config_file: str
    overrides: tuple[str, ...] = ()
    workdir: str = "runs/flower"
    store: str = ""

    @property
    def store_url(self) -> str:
        """The data plane: `store`, or a file:// store in the workdir (one machine, or a shared disk)."""
        return self.store or "file://" + os.path.abspath(os.path.join(self.workdir, "store"))

    def record(self) -> dict:
        """What the server's message carries (a ConfigRecord's values: str and list[str])."""
        return {"config-file": self.config_file, "overrides": list(self.overrides), "workdir": self.workdir,
                "store": self.store_url}  # fmt: skip


def from_run_config(run_config: dict) -> FlowerRun:
    """The run from Flower's run-config: `config-file`, `overrides` (a string of `key=value`, as
    `--config.key=value`), `workdir`, `store`, and any `config.<key>` added to the app's pyproject.toml
    (an override of `<key>`). Unknown keys are a one-line ValueError."""
    known = {"config-file", "overrides", "workdir", "store"}
    unknown = sorted(k for k in run_config if k not in known and not k.startswith("config."))
    if unknown:
        raise ValueError(f"run-config {', '.join(unknown)}: unknown (keys: {', '.join(sorted(known))}, config.<key>)")
    if not run_config.get("config-file"):
        raise ValueError("run-config config-file is empty: name a jaxblock config file, e.g. configs/tiny.py")
    overrides = split_overrides(str(run_config.get("overrides", "")))
    overrides += tuple(f"{k[len('config.') :]}={_toml_value(v)}" for k, v in sorted(run_config.items()) if
                       k.startswith("config."))  # fmt: skip
    store = str(run_config.get("store", ""))
    if store.startswith("memory://"):
        raise ValueError("run-config store=memory:// lives in one process: the clients could not reach it")
    return FlowerRun(
        config_file=str(run_config["config-file"]),
        overrides=overrides,
        workdir=str(run_config.get("workdir") or "runs/flower"),
        store=store,
    )


def for_run(run: FlowerRun, run_id: int) -> FlowerRun:
    """The run's own places: `<workdir>/<run id>/`, and a store URL with `/<run id>` appended (a store
    holds one run; a TensorStore spec, JSON or @file, is used as given)."""
    store = run.store
    if "://" in store and not store.lstrip().startswith(("{", "@")):
        store = f"{store.rstrip('/')}/{run_id}"
    return dataclasses.replace(run, workdir=os.path.join(run.workdir, str(run_id)), store=store)


def from_record(record) -> FlowerRun:
    """The run the server's message names (`FlowerRun.record`)."""
    return FlowerRun(str(record["config-file"]), tuple(record["overrides"]), str(record["workdir"]),
                     str(record["store"]))  # fmt: skip


def split_overrides(text: str) -> tuple[str, ...]:
    """'algorithm=fedit rounds=3' (a leading `--config.` is accepted) -> ('algorithm=fedit', 'rounds=3')."""
    items = tuple(item.removeprefix("--config.") for item in shlex.split(text))
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ValueError(f"run-config overrides {' '.join(bad)}: each must be key=value, e.g. 'rounds=3'")
    return items


def _toml_value(value) -> str:
    """A TOML value as an override's text: True, 3, 0.5 or '3' keep their type (`config.apply_override`)."""
    return repr(value)


def load(run: FlowerRun, extra: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """The jaxblock config of the run, validated as scripts/train.py validates it (a bad key or value
    is a one-line ValueError); `extra`: a party's own overrides after the run's (its keys directory)."""
    from jaxblock.run import runtime

    return runtime.load_checked(os.path.expanduser(run.config_file), (*run.overrides, *extra))


def client_id(node_config: dict, num_clients: int) -> int:
    """The jaxblock client a SuperNode is: its `--node-config client-id=i`, or in Flower's simulation
    engine its `partition-id`."""
    for key in ("client-id", "partition-id"):
        if key in node_config:
            value = node_config[key]
            break
    else:
        raise ValueError("the SuperNode's node-config names no client: start it with --node-config 'client-id=<i>'")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_clients:
        raise ValueError(f"node-config {key}={value!r}: the run has clients 0..{num_clients - 1}")
    return value


def client_overrides(node_config: dict) -> tuple[str, ...]:
    """A SuperNode's own overrides (`--node-config 'overrides="comm.keys=keys/client_0"'`): its keys,
    its data file, what differs on its machine."""
    return split_overrides(str(node_config.get("overrides", "")))


def client_workdir(run: FlowerRun, node_config: dict) -> str:
    """Where a client keeps its checkpoints and timeline: its `--node-config workdir=...`, else the run's."""
    return str(node_config.get("workdir") or os.path.join(run.workdir, "clients"))


def node_key(node_id: int) -> str:
    """The store key where a SuperNode's ClientApp says which client it runs (`client_app`)."""
    return f"flower/node/{node_id}"
