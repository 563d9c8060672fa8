"""Orbax checkpoints of the federated server state, restorable into the exact same run.

Each step (= rounds completed) holds two items:
  state: {'params': server model, 'pending': {'r<round>': {'c<client>': delta}}, and when present
         'uploads' (what top-k clients sent, per pending delta) and 'extra' (an algorithm's own
         arrays: top-k residuals, FedBuff's updates in flight)}
  meta:  JSON with round, seed, data positions, the pending rounds' block, clients and the clients
         whose delta is still pending ('waiting'), the shapes of 'uploads' and 'extra', an
         algorithm's own JSON ('extra_meta'), the run's federated config (checked on resume),
         wall seconds so far, and `final`.
The meta item describes the state tree exactly, so restore builds the abstract target (shapes,
dtypes, shardings) and never relies on orbax guessing a structure. Orbax writes each step to a
temporary directory and renames it when complete, so a killed run leaves its last complete step.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxblock.fed.blocks import Partition, path_str, unflatten


def directory(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


class _ReadOnlyIsMeant(logging.Filter):
    """Orbax warns `Given directory is read only` on every read-only manager; eval, export and the
    settings check of a resume open one on purpose, so the warning says nothing a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_ReadOnlyIsMeant())


def manager(workdir: str, max_to_keep: int = 3, *, read_only: bool = False) -> ocp.CheckpointManager:
    """The run's CheckpointManager over `workdir/checkpoints`.

    read_only: for eval and export, which must not create or change anything in the workdir;
    a workdir without checkpoints is then a one-line error instead of a new empty directory.
    """
    if max_to_keep < 1:
        raise ValueError(f"checkpoint.max_to_keep={max_to_keep}: keep at least 1")
    if read_only and not os.path.isdir(directory(workdir)):
        raise ValueError(f"--workdir {workdir}: no checkpoints yet (train it first with scripts/train.py)")
    if read_only:  # the options a read-only manager forces (set here, or orbax warns about each of them)
        options = ocp.CheckpointManagerOptions(max_to_keep=None, save_interval_steps=0, create=False, read_only=True)
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory(workdir), options=options, item_names=("state", "meta"))


@jax.jit
def _sums(x):
    """[sum, sum of |x|] in float32: a checksum that survives a different device layout (the
    reduction order changes the last bits, so `verify` compares with a tolerance). Jitted per leaf,
    not per tree: the state's tree changes every round (its pending deltas), and a new tree would
    compile anew each time (0.44 s a round on the tiny model); a leaf shape compiles once."""
    return jnp.stack([jnp.sum(x, dtype=jnp.float32), jnp.sum(jnp.abs(x), dtype=jnp.float32)])


def checksums(arrays: dict) -> dict[str, list[float]]:
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(arrays)[0], strict=True) if arrays else ((), ())
    sums = jax.device_get([_sums(x) for x in leaves])
    return {jax.tree_util.keystr(path): [float(v) for v in value] for path, value in zip(paths, sums, strict=True)}


def verify(arrays: dict, expected: dict[str, list[float]], rtol: float = 1e-5) -> None:
    """ValueError naming the first leaf whose checksum differs (bytes damaged in place still restore)."""
    for key, (total, total_abs) in checksums(arrays).items():
        want = expected.get(key)
        if want is None:
            raise ValueError(f"{key} has no recorded checksum")
        scale = rtol * want[1] + 1e-6
        if not (abs(total - want[0]) <= scale and abs(total_abs - want[1]) <= scale):  # NaN fails too
            raise ValueError(f"{key} fails its checksum (sum {total:.6g}, saved {want[0]:.6g}): data damaged")


def save(
    mgr: ocp.CheckpointManager,
    state: dict,
    fed,
    *,
    wall_s: float,
    final: bool = False,
    config: dict | None = None,
    mode: str = "simulator",
) -> None:
    """Saves `state` as step state['round'] (asynchronously; `mgr.wait_until_finished()` to block).

    config: the run's resolved config (a dict), recorded so that a resume can compare every setting.
    mode: 'simulator' (resumable by train.py) or 'server' (its state holds no client positions).
    """
    pending_meta = [
        {"round": int(r), "block": int(e["block"]), "clients": [int(c) for c in e["clients"]],
         "waiting": [int(c) for c in e["deltas"]]}
        for r, e in sorted(state["pending"].items())
    ]  # fmt: skip
    arrays = {"params": state["params"]}
    if state["pending"]:
        arrays["pending"] = {f"r{r}": {f"c{c}": d for c, d in e["deltas"].items()} for r, e in state["pending"].items()}
        uploads = {f"r{r}": {f"c{c}": u for c, u in e["uploads"].items()} for r, e in state["pending"].items()
                   if "uploads" in e}  # fmt: skip
        if uploads:
            arrays["uploads"] = uploads
    if state.get("extra"):  # an algorithm's own arrays (top-k residuals, FedBuff's updates in flight)
        arrays["extra"] = state["extra"]
    meta = {
        "round": int(state["round"]),
        "seed": int(state["seed"]),
        "positions": [int(p) for p in state["positions"]],
        "pending": pending_meta,
        "fed": json.loads(json.dumps(fed.flat())),  # tuples as lists, as JSON reads them back
        "wall_s": float(wall_s),
        "final": bool(final),
        "checksums": checksums(arrays),
        "mode": mode,
    }
    if "uploads" in arrays or "extra" in arrays:  # their shapes vary: the meta records them for restore
        meta["shapes"] = {k: shapes(arrays[k]) for k in ("uploads", "extra") if k in arrays}
    if state.get("extra_meta"):
        meta["extra_meta"] = state["extra_meta"]
    if config is not None:
        meta["config"] = config
    mgr.save(
        int(state["round"]),
        args=ocp.args.Composite(state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


def newest_readable_meta(mgr: ocp.CheckpointManager) -> dict | None:
    """The meta of the newest step whose meta reads (cheap: no arrays), or None."""
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            with _quiet_failed_reads():
                return read_meta(mgr, step)
        except Exception:  # noqa: BLE001 - a damaged meta: restore_newest names it
            continue
    return None


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
            target["pending"][f"r{e['round']}"] = {f"c{c}": block for c in e.get("waiting", e["clients"])}
    replicated = _replicated(abstract_params)
    for key, recorded in meta.get("shapes", {}).items():
        target[key] = _target(recorded, replicated)
    arrays = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    if "checksums" in meta:  # checkpoints written before checksums existed restore unchecked
        verify(arrays, meta["checksums"])
    pending = {}
    for e in meta["pending"]:
        r = f"r{e['round']}"
        waiting = e.get("waiting", e["clients"])
        pending[e["round"]] = {
            "block": e["block"],
            "clients": list(e["clients"]),
            "deltas": {c: arrays["pending"][r][f"c{c}"] for c in waiting},
        }
        if r in arrays.get("uploads", {}):
            pending[e["round"]]["uploads"] = {c: arrays["uploads"][r][f"c{c}"] for c in waiting}
    state = {
        "params": arrays["params"],
        "round": meta["round"],
        "seed": meta["seed"],
        "positions": np.asarray(meta["positions"], np.int64),
        "pending": pending,
    }
    if "extra" in arrays:
        state["extra"] = arrays["extra"]
    if "extra_meta" in meta:
        state["extra_meta"] = meta["extra_meta"]
    return state, meta


def shapes(tree: dict) -> dict:
    """{'a/b/c': [shape, dtype]} of a nested dict of arrays with str keys."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(path): [list(x.shape), np.dtype(x.dtype).name] for path, x in flat}


def _target(recorded: dict, sharding) -> dict:
    """The nested dict of ShapeDtypeStructs that `shapes` recorded."""
    structs = (
        (path, jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding))
        for path, (shape, dtype) in recorded.items()
    )
    return unflatten(structs)


def _replicated(abstract_params: dict):
    """A sharding that puts an array whole on every device of the params' mesh (or their device)."""
    sharding = getattr(jax.tree.leaves(abstract_params)[0], "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _as_float32(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:  # deltas are float32
    return jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=getattr(x, "sharding", None))


def restore_newest(
    mgr: ocp.CheckpointManager, abstract_params: dict, partition: Partition, step: int | None = None
) -> tuple[dict, dict, list[tuple[int, str]]] | None:
    """(state, meta, skipped) of the newest step that restores, or None when there is no checkpoint.

    A damaged step (a truncated or missing file, bytes changed in place) is skipped, newest first,
    and listed in `skipped` as (step, one-line reason); nothing is deleted. With `step` given, only
    that step is tried, and a failure is a one-line ValueError.
    """
    steps = sorted(mgr.all_steps(), reverse=True)
    if step is not None and step not in steps:
        raise ValueError(f"--step {step}: no such checkpoint step (have {sorted(steps)})")
    skipped = []
    for s in steps if step is None else [step]:
        try:
            with _quiet_failed_reads():
                return (*restore(mgr, abstract_params, partition, s), skipped)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any other failure to read a step means the step is damaged
            skipped.append((s, one_line(e)))
    if step is not None:
        raise ValueError(f"checkpoint step {step} does not restore: {skipped[0][1]}")
    if skipped:
        reasons = "; ".join(f"step {s}: {r}" for s, r in skipped)
        raise ValueError(f"no checkpoint step restores ({reasons})")
    return None


def one_line(e: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, shortened: a reason to print beside a skipped step."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" See full TensorStore details")[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def _quiet_failed_reads():
    """Keeps the noise of a failed restore off the terminal; the caller reports it in one line.

    Orbax reads every array in a task of its own event loop. When one read fails it closes the
    loop, and the other reads' callbacks (TensorStore threads) then print "Event loop is closed"
    tracebacks, and asyncio logs pages of TensorStore specs. Both go to file descriptor 2, so it
    points at /dev/null while a step is read, and a failure waits briefly for the stragglers.
    """
    logger = logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    except BaseException:
        time.sleep(0.25)  # the other reads finish within milliseconds; their callbacks print then
        gc.collect()
        raise
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        logger.setLevel(level)
