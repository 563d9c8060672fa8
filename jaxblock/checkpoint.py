"""Orbax checkpoints of the federated server state, restorable into the exact same run.

Each step (= rounds completed) holds two items:
  state: {'params': server model, 'pending': {'r<round>': {'c<client>': delta}}}  (arrays)
  meta:  JSON with round, seed, data positions, the pending rounds' block and clients, the run's
         federated config (checked on resume), wall seconds so far, and `final`.
The meta item describes the state tree exactly, so restore builds the abstract target (shapes,
dtypes, shardings) and never relies on orbax guessing a structure. Orbax writes each step to a
temporary directory and renames it when complete, so a killed run leaves its last complete step.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxblock.blocks import Partition


def manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """The run's CheckpointManager over `workdir/checkpoints`."""
    if max_to_keep < 1:
        raise ValueError(f"checkpoint.max_to_keep={max_to_keep}: keep at least 1")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")), options=options, item_names=("state", "meta")
    )


def save(mgr: ocp.CheckpointManager, state: dict, fed, *, wall_s: float, final: bool = False) -> None:
    """Saves `state` as step state['round'] (asynchronously; `mgr.wait_until_finished()` to block)."""
    pending_meta = [
        {"round": int(r), "block": int(e["block"]), "clients": [int(c) for c in e["clients"]]}
        for r, e in sorted(state["pending"].items())
    ]
    arrays = {"params": state["params"]}
    if state["pending"]:
        arrays["pending"] = {f"r{r}": {f"c{c}": d for c, d in e["deltas"].items()} for r, e in state["pending"].items()}
    meta = {
        "round": int(state["round"]),
        "seed": int(state["seed"]),
        "positions": [int(p) for p in state["positions"]],
        "pending": pending_meta,
        "fed": dataclasses.asdict(fed),
        "wall_s": float(wall_s),
        "final": bool(final),
    }
    mgr.save(
        int(state["round"]),
        args=ocp.args.Composite(state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


def read_meta(mgr: ocp.CheckpointManager, step: int | None = None) -> dict | None:
    step = mgr.latest_step() if step is None else step
    if step is None:
        return None
    return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(
    mgr: ocp.CheckpointManager, abstract_params: dict, partition: Partition, step: int | None = None
) -> tuple[dict, dict] | None:
    """(state, meta) of `step` (default: the latest), or None when the workdir has no checkpoint.

    Args:
      abstract_params: ShapeDtypeStructs (with shardings, to restore onto a mesh) of the params.
      partition: the run's partition, which gives each pending delta's shape.
    """
    step = mgr.latest_step() if step is None else step
    if step is None:
        return None
    if step not in mgr.all_steps():
        raise ValueError(f"checkpoint step {step} does not exist (have {sorted(mgr.all_steps())})")
    meta = read_meta(mgr, step)
    target = {"params": abstract_params}
    if meta["pending"]:
        target["pending"] = {}
        for e in meta["pending"]:
            block = jax.tree.map(_as_float32, partition.block(abstract_params, e["block"]))
            target["pending"][f"r{e['round']}"] = {f"c{c}": block for c in e["clients"]}
    arrays = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    pending = {
        e["round"]: {
            "block": e["block"],
            "clients": list(e["clients"]),
            "deltas": {c: arrays["pending"][f"r{e['round']}"][f"c{c}"] for c in e["clients"]},
        }
        for e in meta["pending"]
    }
    state = {
        "params": arrays["params"],
        "round": meta["round"],
        "seed": meta["seed"],
        "positions": np.asarray(meta["positions"], np.int64),
        "pending": pending,
    }
    return state, meta


def _as_float32(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:  # deltas are float32
    return jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=getattr(x, "sharding", None))
