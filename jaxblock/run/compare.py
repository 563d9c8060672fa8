"""Finished runs side by side: exact match and eval loss from eval.json, and the modelled wall time
and bytes replayed from metrics.jsonl through the link model (`scripts/bench_runs.py`,
`scripts/reproduce.py`).

The modelled wall time is, per round, the slowest client's compute plus its exposed communication,
summed over rounds and ParaBlock's final flush (clients train in parallel; a FedCyBGD turn has one
client working). Any link
can be put in place of the run's own: training never depends on it. FedBuff's clock is modelled
while it trains (its arrival order depends on it), so it is always over the run's own links.
"""

from __future__ import annotations

import json
import os

from jaxblock.fed import algorithms, blocks, wire
from jaxblock.run import experiment, runtime, timeline
from jaxblock.run.config import model_config

MB = 1e6


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def modeled(workdir: str, bandwidth=None, latency=None, compute_s: float | None = None) -> dict:
    """Modelled seconds and bytes of a run's metrics (its rounds and its final flush):
    `modeled_wall_s` = `wall_compute_s` + `wall_exposed_s`, the slowest client's compute and exposed
    communication per round, summed; `compute_s`, `exposed_s`, `mb_up`, `mb_down`: a client's whole
    run, mean over clients.

    compute_s: every participant's compute per round, in place of the measured one (runs made on a
    shared machine at different times compare only in their communication then).
    """
    fed, history, rows, bandwidth = _replayed(workdir, bandwidth, latency, compute_s)
    wall_compute, wall_exposed = timeline.slowest_per_round(rows)
    if "modeled_time_s" in history[-1]:  # FedBuff: its clock, split as its clients' time adds up
        clock, busy = history[-1]["modeled_time_s"], sum(r["compute_s"] for r in rows)
        share = busy / (busy + sum(r["exposed_wait_s"] for r in rows))
        wall_compute, wall_exposed = clock * share, clock * (1 - share)
    n = fed.num_clients
    return {
        "algorithm": fed.algorithm,
        "rounds": len(history),
        "trainings": sum(len(m["clients"]) for m in history),
        "modeled_wall_s": float(wall_compute + wall_exposed),
        "wall_compute_s": float(wall_compute),
        "wall_exposed_s": float(wall_exposed),
        "compute_s": sum(r["compute_s"] for r in rows) / n,
        "exposed_s": sum(r["exposed_wait_s"] for r in rows) / n,
        "mb_up": sum(r["bytes_up"] for r in rows) / n / MB,
        "mb_down": sum(r["bytes_down"] for r in rows) / n / MB,
        "link": comm_label(bandwidth),
    }


def _replayed(workdir: str, bandwidth, latency, compute_s: float | None):
    """(fed, the run's metrics rows, their timeline rows replayed over these links, the bandwidth
    used): the run's own links when none is given, and always for FedBuff (see `modeled`)."""
    config = experiment.read_config(workdir)
    fed = runtime.fed_config(config)
    history = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if compute_s is not None and "modeled_time_s" not in history[-1]:
        history = [{**m, "client_compute_s": {c: compute_s for c in m["clients"]}} for m in history]
    if "modeled_time_s" in history[-1] or bandwidth is None:  # the run's own links
        bandwidth, latency = config.comm.bandwidth_mbps, config.comm.latency_ms
    links = [wire.link_for(c, bandwidth, latency) for c in range(fed.num_clients)]
    partition = runtime.make_partition(config, model_config(config))
    return fed, history, timeline.replay(fed, partition, links, history), bandwidth


def eval_curve(workdir: str, bandwidth=None, latency=None, compute_s: float | None = None) -> list[dict]:
    """A run's evaluations during training (`eval.every`), in order: {round, modeled_wall_s,
    exact_match, loss}; the final model's (summary.json's `final_eval`, after ParaBlock's flush) last,
    with round None. The wall time is the rounds' up to the evaluated one, replayed over these links
    as `modeled` does (over the run's own links: the figure the row holds). [] = the run has none."""
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return []
    _, history, rows, _ = _replayed(workdir, bandwidth, latency, compute_s)
    if not any("eval" in m for m in history):
        return []
    clock = "modeled_time_s" in history[-1]  # FedBuff: its own clock, over its own links
    points = []
    for m in history:
        if "eval" in m:
            upto = [r for r in rows if r["round"] != "flush" and r["round"] <= m["round"]]
            wall = m["modeled_time_s"] if clock else sum(timeline.slowest_per_round(upto))
            points.append({"round": m["round"], "modeled_wall_s": float(wall), **_figures(m["eval"])})
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            final = json.load(f).get("final_eval")
        if final is not None:  # the whole run's wall time, its flush included
            points.append(
                {"round": None, "modeled_wall_s": float(sum(timeline.slowest_per_round(rows))), **_figures(final)}
            )
    return points


def _figures(e: dict) -> dict:
    return {"exact_match": e["exact_match"], "loss": e["loss"]}


def comm_label(bandwidth) -> str:
    """A link setting in a few words: per-client lists by value, e.g. '9 clients at 100 MB/s, 1 at 2 MB/s'."""
    if isinstance(bandwidth, (list, tuple)):
        values = [f"{b:g} MB/s" if isinstance(b, (int, float)) else str(b) for b in bandwidth]
        counts = {v: values.count(v) for v in values}  # in order of first appearance
        (v0, n0), *rest = counts.items()
        return ", ".join([f"{n0} client{'s' if n0 > 1 else ''} at {v0}", *(f"{n} at {v}" for v, n in rest)])
    if isinstance(bandwidth, (int, float)):
        return f"{bandwidth:g} MB/s"
    return "unlimited" if bandwidth is None else str(bandwidth)


def score(workdir: str) -> dict:
    path = os.path.join(workdir, "eval.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        e = json.load(f)["finetuned"]
    return {"exact_match": e["exact_match"], "eval_loss": e["eval_loss"]}


# ----------------------------------------------------------------------------- Figure 2, modelled


def block_costs(config, name: str, layout=None, cache: dict | None = None, progress=None, only=None):
    """(algorithm, partition, [XLA's static cost of one local step of each block]) of algorithm
    `name` on `config` (`local.step_cost`: flops and memory per device, with the run's memory levers
    and, given a layout, its mesh shardings; nothing runs).

    cache: a dict shared between calls; a step already compiled (the same leaves trained, e.g.
    ParaBlock's and FedBCD's blocks) is not compiled again. progress: called with each block's label
    before it compiles. only: the block ids to compile (the others' costs are None)."""
    import jax
    import jax.numpy as jnp

    from jaxblock.fed import local

    config = config.copy_and_resolve_references()
    config.algorithm = name
    cfg = model_config(config)
    algo = runtime.make_algorithm(config, cfg)
    part = runtime.make_partition(config, cfg)
    params = jax.eval_shape(lambda: algo.client_model(runtime.server_shapes(config, cfg), 0, 0))
    loss_fn = local.lm_loss(cfg, layout, config.memory.loss_chunk)
    optimizer = local.make_optimizer(runtime.optimizer_config(config), config.local_steps)
    batch = {
        "tokens": jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jnp.int32),
        "loss_mask": jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jnp.float32),
    }
    shardings = None if layout is None else layout.tree_shardings(runtime.logical_axes(config, cfg))
    cache = {} if cache is None else cache
    costs = []
    for b in range(part.num_blocks):
        if only is not None and b not in only:
            costs.append(None)
            continue
        block, frozen = part.split(params, b)
        shapes = [(blocks.path_str(p), x.shape) for tree in (block, frozen) for p, x in _leaves(tree)]
        key = (tuple(shapes), len(_leaves(block)), json.dumps(config.memory.to_dict(), sort_keys=True))
        if key not in cache:
            if progress:
                progress(part.blocks[b].name)
            cache[key] = local.step_cost(
                loss_fn, optimizer, block, frozen, batch, layout=layout, param_shardings=shardings,
                donate=config.memory.donate,
            )  # fmt: skip
        costs.append(cache[key])
    return algo, part, costs


def _leaves(tree):
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]


def block_flops(config, name: str) -> list[float]:
    """FLOPs of one local step of each block of algorithm `name` on `config`."""
    return [c["flops"] for c in block_costs(config, name)[2]]


def modeled_run(config, name: str, bandwidth, round_s: list[float]) -> dict:
    """The modelled wall time of a whole run of `name` on `config` without training it: the rounds'
    blocks, participants and wire values come from the algorithm, each block's compute per round
    from `round_s`, communication from the link model (`timeline.modeled_timeline`)."""
    config = config.copy_and_resolve_references()
    config.algorithm = name
    if algorithms.REGISTRY[name].turns:  # one turn per round: as many client trainings as the others
        config.rounds = config.rounds * config.num_clients
    cfg = model_config(config)
    fed = runtime.fed_config(config)
    algo = runtime.make_algorithm(config, cfg)
    part = runtime.make_partition(config, cfg)
    links = [wire.link_for(c, bandwidth, None) for c in range(fed.num_clients)]
    history = []
    for t in range(fed.rounds):
        block, clients = algo.choose_block(fed, t, part.num_blocks), algo.participants(fed, t)
        up, down = algo.wire_params(part, block, clients, t)
        history.append({"round": t, "block": block, "clients": clients, "params_up": up, "params_down": down,
                        "client_compute_s": {c: round_s[block] for c in clients}})  # fmt: skip
    compute_s, exposed_s = timeline.slowest_per_round(timeline.replay(fed, part, links, history))
    return {"compute_s": compute_s, "exposed_s": exposed_s, "wall_s": compute_s + exposed_s}
