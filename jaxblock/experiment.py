"""A federated fine-tuning run from a config: model, data, algorithm, checkpoints, logs.

`train(config, workdir)` is what `scripts/train.py` calls. Rerunning it on the same workdir
resumes from the latest orbax checkpoint; on CPU the final model is bit-identical to an
uninterrupted run's. The workdir receives:
  checkpoints/   orbax steps (server params, pending deltas, round, data positions, ...)
  metrics.jsonl  one JSON object per round (round, block, loss, seconds, ...)
  summary.json   the run's outcome (algorithm, rounds, wall seconds, final train loss, ...)
  config.json    the resolved config
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
import tqdm

from jaxblock import checkpoint, data, federated, local, model, runtime
from jaxblock.config import ModelConfig, dump_json


def client_data(config: ml_collections.ConfigDict, cfg: ModelConfig) -> list[dict[str, np.ndarray]]:
    """Each client's examples as fixed-shape arrays, per `config.data.source`."""
    if config.data.source == "synthetic":
        return data.synthetic_clients(
            config.num_clients,
            config.data.examples_per_client,
            config.seq_len,
            cfg.vocab_size,
            num_sources=config.data.num_sources,
            seed=config.seed,
        )
    raise ValueError(f"data.source={config.data.source!r}: supported is 'synthetic'")


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
    """Runs (or resumes) the federated run of `config` in `workdir`; returns the summary."""
    runtime.setup_jax(config)
    os.makedirs(workdir, exist_ok=True)
    layout = runtime.make_layout(config)
    if config.batch_size % layout.ways("activation_batch"):
        raise ValueError(
            f"batch_size={config.batch_size} does not split over the {layout.ways('activation_batch')} "
            f"data-parallel devices of mesh {dict(layout.mesh.shape)}: use a multiple, or change config.mesh"
        )
    cfg, params = runtime.load_model(config, layout)
    fed = runtime.fed_config(config)
    partition = federated.algorithm_partition(fed, params, runtime.make_partition(config, cfg))
    clients = client_data(config, cfg)
    batches_fn = data.make_batches_fn(clients, config.batch_size, seed=config.seed)
    sizes = np.array([len(c["tokens"]) for c in clients])
    shardings = layout.tree_shardings(model.logical_axes(cfg))
    loss_fn = local.lm_loss(cfg, layout)
    optimizer = local.make_optimizer(runtime.optimizer_config(config), fed.local_steps)
    trainer = federated.make_trainer(
        fed, loss_fn, batches_fn, partition, optimizer, client_sizes=sizes, layout=layout, param_shardings=shardings
    )

    mgr = checkpoint.manager(workdir, config.checkpoint.max_to_keep)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    restored = checkpoint.restore(mgr, abstract, partition)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if restored is None:
        state, wall_before, final = federated.init_state(fed, params), 0.0, False
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(dump_json(config))
    else:
        state, meta = restored
        _check_same_run(meta, fed, workdir)
        wall_before, final = meta["wall_s"], meta["final"]
        print(f"resuming {workdir} from round {state['round']} (checkpoint step {mgr.latest_step()})")
    del params
    _truncate_metrics(metrics_path, state["round"])

    start = time.perf_counter()
    bar = tqdm.tqdm(total=fed.rounds, initial=state["round"], desc=fed.algorithm, disable=not progress, unit="round")
    while state["round"] < fed.rounds:
        state, metrics = federated.run_round(trainer, state)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        bar.set_postfix(block=metrics["block"], loss=f"{metrics['loss']:.4f}", s=f"{metrics['seconds']:.1f}")
        bar.update(1)
        if state["round"] % config.checkpoint.interval == 0 and state["round"] < fed.rounds:
            checkpoint.save(mgr, state, fed, wall_s=wall_before + time.perf_counter() - start)
    bar.close()
    if not final:
        state = federated.flush(trainer, state)
        checkpoint.save(mgr, state, fed, wall_s=wall_before + time.perf_counter() - start, final=True)
    mgr.wait_until_finished()
    wall_s = wall_before + time.perf_counter() - start

    summary = {
        "algorithm": fed.algorithm,
        "rounds": fed.rounds,
        "num_clients": fed.num_clients,
        "staleness": fed.effective_staleness,
        "blocks": partition.num_blocks,
        "wall_s": wall_s,
        "final_train_loss": train_loss(loss_fn, state["params"], batches_fn, fed.num_clients),
        "checkpoint_step": int(mgr.latest_step()),
        "fed": dataclasses.asdict(fed),
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    mgr.close()
    return summary


def train_loss(loss_fn, params: dict, batches_fn, num_clients: int) -> float:
    """Mean loss of `params` on every client's first batch: the same fixed set for every algorithm."""
    fn = jax.jit(loss_fn)
    losses = [float(fn(params, jax.tree.map(lambda x: x[0], batches_fn(c, 0, 1)[0]))) for c in range(num_clients)]
    return float(np.mean(losses))


def _check_same_run(meta: dict, fed: federated.FedConfig, workdir: str) -> None:
    saved = meta["fed"]
    diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(fed).items() if saved.get(k) != v}
    if diff:
        k, (was, now) = next(iter(diff.items()))
        raise ValueError(
            f"--workdir {workdir} holds a run with {k}={was!r}, not {now!r}: use a new workdir or the same config"
        )


def _truncate_metrics(path: str, next_round: int) -> None:
    """Keeps the metrics of rounds before `next_round`: a resumed run rewrites the rest."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["round"] < next_round]
    with open(path, "w") as f:
        f.writelines(kept)
