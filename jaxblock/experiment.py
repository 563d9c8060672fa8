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
import operator
import os
import time

import jax
import ml_collections
import numpy as np
import optax
import tqdm

from jaxblock import checkpoint, comm, data, evaluate, federated, instruct, local, model, plots, runtime, transport
from jaxblock.blocks import Partition
from jaxblock.config import ModelConfig, dump_json
from jaxblock.hf_io import save_hf
from jaxblock.sharding import Layout


def load_tokenizer(config: ml_collections.ConfigDict):
    """The run's tokenizer: `data.tokenizer`, else the one saved with `hf_checkpoint`."""
    from transformers import AutoTokenizer

    path = config.data.tokenizer or config.hf_checkpoint
    if not path:
        raise ValueError("data.tokenizer is empty and there is no hf_checkpoint to take a tokenizer from")
    return AutoTokenizer.from_pretrained(path)


def client_data(config: ml_collections.ConfigDict, cfg: ModelConfig) -> tuple[list[dict[str, np.ndarray]], str]:
    """Each client's examples as fixed-shape arrays, per `config.data`, and a clients x labels table.

    source 'synthetic' makes token data; 'mathinstruct', 'alpaca_gpt4' load instruction data (the hub,
    or `data.path`), tokenize it with response-only loss masks and partition it across clients
    (Dirichlet over the label, or IID).
    """
    d = config.data
    if d.source == "synthetic":
        clients = data.synthetic_clients(
            config.num_clients, d.examples_per_client, config.seq_len, cfg.vocab_size,
            num_sources=d.num_sources, seed=config.seed,
        )  # fmt: skip
        return clients, f"synthetic token data: {config.num_clients} clients x {d.examples_per_client} examples"
    examples = instruct.load_examples(d.source, d.path or None, sample=d.sample, seed=config.seed)
    tokenizer = load_tokenizer(config)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocab_size is {cfg.vocab_size}")
    arrays = instruct.tokenize(tokenizer, examples, config.seq_len)
    labels = [e["label"] for e in examples]
    if d.partition == "dirichlet":
        parts = instruct.dirichlet_partition(
            labels, config.num_clients, d.alpha, seed=config.seed, min_size=d.min_client_size
        )
    elif d.partition == "iid":
        parts = instruct.iid_partition(len(examples), config.num_clients, seed=config.seed)
    else:
        raise ValueError(f"data.partition={d.partition!r}: choose 'dirichlet' or 'iid'")
    table = f"{len(examples)} examples of {d.source} over {config.num_clients} clients ({d.partition}):\n"
    table += instruct.partition_table(labels, parts)
    return [{k: v[np.asarray(idx)] for k, v in arrays.items()} for idx in parts], table


@dataclasses.dataclass
class Setup:
    """Everything a run builds from its config, shared by the simulator, the server and the clients."""

    fed: federated.FedConfig
    cfg: ModelConfig
    layout: Layout
    params: dict
    partition: Partition
    batches_fn: federated.BatchesFn
    client_sizes: np.ndarray
    loss_fn: local.LossFn
    optimizer: optax.GradientTransformation
    shardings: dict
    partition_table: str

    def local_train(self):
        return local.make_local_train(self.loss_fn, self.optimizer, layout=self.layout, param_shardings=self.shardings)

    def trainer(self, store: transport.Store | None = None) -> federated.Trainer:
        return federated.Trainer(
            self.fed, self.loss_fn, self.batches_fn, self.partition, self.local_train(), self.client_sizes, store
        )

    def abstract_params(self) -> dict:
        return abstract(self.params)


def abstract(params: dict) -> dict:
    """ShapeDtypeStructs, shardings included: an orbax restore target for arrays like these."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)


def setup(config: ml_collections.ConfigDict) -> Setup:
    """Builds the model, data, partition and optimizer of a run config (validated at the boundary)."""
    runtime.setup_jax(config)
    layout = runtime.make_layout(config)
    if config.batch_size % layout.ways("activation_batch"):
        raise ValueError(
            f"batch_size={config.batch_size} does not split over the {layout.ways('activation_batch')} "
            f"data-parallel devices of mesh {dict(layout.mesh.shape)}: use a multiple, or change config.mesh"
        )
    cfg, params = runtime.load_model(config, layout)
    fed = runtime.fed_config(config)
    partition = federated.algorithm_partition(fed, params, runtime.make_partition(config, cfg))
    clients, table = client_data(config, cfg)
    return Setup(
        fed=fed,
        cfg=cfg,
        layout=layout,
        params=params,
        partition=partition,
        batches_fn=data.make_batches_fn(clients, config.batch_size, seed=config.seed),
        client_sizes=np.array([len(c["tokens"]) for c in clients]),
        loss_fn=local.lm_loss(cfg, layout),
        optimizer=local.make_optimizer(runtime.optimizer_config(config), fed.local_steps),
        shardings=layout.tree_shardings(model.logical_axes(cfg)),
        partition_table=table,
    )


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
    """Runs (or resumes) the federated run of `config` in `workdir`; returns the summary."""
    os.makedirs(workdir, exist_ok=True)
    run = setup(config)
    fed, partition = run.fed, run.partition
    if progress:
        print(run.partition_table)
    with open(os.path.join(workdir, "partition.txt"), "w") as f:
        f.write(run.partition_table + "\n")
    # The simulator's exchanges go through the configured TensorStore (memory:// by default).
    trainer = run.trainer(transport.Store(config.comm.store) if config.comm.store else None)
    loss_fn, batches_fn = run.loss_fn, run.batches_fn

    mgr = checkpoint.manager(workdir, config.checkpoint.max_to_keep)
    restored = checkpoint.restore(mgr, run.abstract_params(), partition)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if restored is None:
        state, wall_before, final = federated.init_state(fed, run.params), 0.0, False
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(dump_json(config))
    else:
        state, meta = restored
        _check_same_run(meta, fed, workdir)
        wall_before, final = meta["wall_s"], meta["final"]
        print(f"resuming {workdir} from round {state['round']} (checkpoint step {mgr.latest_step()})")
    run.params = None  # the state owns the model from here on
    timeline_path = os.path.join(workdir, "timeline.jsonl")
    history = _truncate_metrics(metrics_path, state["round"])
    _truncate_metrics(timeline_path, state["round"])
    timeline = comm.TimelineWriter(timeline_path)
    links = [transport.link_for(c, config.comm.bandwidth_mbps, config.comm.latency_ms) for c in range(fed.num_clients)]

    start = time.perf_counter()
    bar = tqdm.tqdm(total=fed.rounds, initial=state["round"], desc=fed.algorithm, disable=not progress, unit="round")
    while state["round"] < fed.rounds:
        state, metrics = federated.run_round(trainer, state)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        history.append(metrics)
        for row in comm.modeled_timeline(fed, partition, links, history):
            timeline(row)
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

    totals = _timeline_totals(timeline_path, fed.num_clients)
    label = f"{fed.algorithm}\n{_link_label(config.comm.bandwidth_mbps)}"
    plots.runtime_bars(
        [{"label": label, "compute_s": totals["compute_s"], "exposed_s": totals["exposed_wait_s"]}],
        os.path.join(workdir, "runtime.png"),
        "Per client, whole run: compute vs exposed communication (modeled link)",
    )
    summary = {
        "algorithm": fed.algorithm,
        "rounds": fed.rounds,
        "num_clients": fed.num_clients,
        "staleness": fed.effective_staleness,
        "blocks": partition.num_blocks,
        "wall_s": wall_s,
        **{f"per_client_{k}": v for k, v in totals.items()},
        "final_train_loss": train_loss(loss_fn, state["params"], batches_fn, fed.num_clients),
        "checkpoint_step": int(mgr.latest_step()),
        "fed": dataclasses.asdict(fed),
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    mgr.close()
    return summary


def train_loss(loss_fn, params: dict, batches_fn, num_clients: int, num_batches: int = 8) -> float:
    """Mean loss of `params` on every client's first `num_batches` batches: the same fixed set for
    every algorithm (8 batches: a few hundred examples in all, so one odd batch cannot swing it)."""
    fn = jax.jit(loss_fn)
    losses = []
    for c in range(num_clients):
        batches = batches_fn(c, 0, num_batches)[0]
        losses += [float(fn(params, jax.tree.map(operator.itemgetter(i), batches))) for i in range(num_batches)]
    return float(np.mean(losses))


def _check_same_run(meta: dict, fed: federated.FedConfig, workdir: str) -> None:
    # A key the checkpoint lacks was added to FedConfig after it was written: that run had its default.
    saved = {**dataclasses.asdict(federated.FedConfig()), **meta["fed"]}
    diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(fed).items() if saved.get(k) != v}
    if diff:
        k, (was, now) = next(iter(diff.items()))
        raise ValueError(
            f"--workdir {workdir} holds a run with {k}={was!r}, not {now!r}: use a new workdir or the same config"
        )


def _truncate_metrics(path: str, next_round: int) -> list[dict]:
    """Keeps the JSON lines of rounds before `next_round` (a resumed run rewrites the rest); returns them."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["round"] < next_round]
    with open(path, "w") as f:
        f.writelines(kept)
    return [json.loads(line) for line in kept]


def _timeline_totals(path: str, num_clients: int) -> dict:
    """Whole-run sums per client (averaged over clients) of a timeline.jsonl."""
    totals = {"compute_s": 0.0, "comm_s": 0.0, "exposed_wait_s": 0.0, "bytes_up": 0.0, "bytes_down": 0.0}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                for k in totals:
                    totals[k] += row[k]
    return {k: v / num_clients for k, v in totals.items()}


def _link_label(bandwidth) -> str:
    if bandwidth is None:
        return "unlimited link"
    if isinstance(bandwidth, str):
        return f"{bandwidth} link"
    if isinstance(bandwidth, list):
        return "per-client links"
    return f"{bandwidth:g} MB/s"


# ----------------------------------------------------------------------------- multi-process


def comm_config(config: ml_collections.ConfigDict, store: str | None = None) -> comm.CommConfig:
    return comm.CommConfig(store=store or config.comm.store, timeout_s=float(config.comm.timeout_s))


def serve(config: ml_collections.ConfigDict, workdir: str, store_url: str | None = None) -> dict:
    """The server process: plans rounds, aggregates clients' uploads, checkpoints after each aggregate.

    Returns the summary; the final model is the workdir's last orbax checkpoint.
    """
    os.makedirs(workdir, exist_ok=True)
    run = setup(config)
    cc = comm_config(config, store_url)
    store = transport.Store(cc.store)
    if store.get_json(transport.plan_key(0)) is not None:
        raise ValueError(f"--store {cc.store} already holds a run: use an empty store")
    mgr = checkpoint.manager(workdir, config.checkpoint.max_to_keep)
    start = time.perf_counter()

    def save(state):
        final = state["round"] == run.fed.rounds
        checkpoint.save(mgr, state, run.fed, wall_s=time.perf_counter() - start, final=final)

    try:
        params = comm.serve(
            run.fed, run.params, run.partition, store, cc, client_sizes=run.client_sizes, on_aggregate=save
        )
    finally:
        mgr.wait_until_finished()
        mgr.close()
    summary = {
        "algorithm": run.fed.algorithm,
        "rounds": run.fed.rounds,
        "num_clients": run.fed.num_clients,
        "wall_s": time.perf_counter() - start,
        "final_train_loss": train_loss(run.loss_fn, params, run.batches_fn, run.fed.num_clients),
        "store": cc.store,
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def client(config: ml_collections.ConfigDict, client_id: int, workdir: str, store_url: str | None = None) -> dict:
    """A client process: trains its blocks and exchanges deltas; appends to workdir/timeline.jsonl."""
    run = setup(config)
    if not 0 <= client_id < run.fed.num_clients:
        raise ValueError(f"--client-id {client_id}: the run has clients 0..{run.fed.num_clients - 1}")
    os.makedirs(workdir, exist_ok=True)
    cc = comm_config(config, store_url)
    link = transport.link_for(client_id, config.comm.bandwidth_mbps, config.comm.latency_ms)
    timeline = comm.TimelineWriter(os.path.join(workdir, "timeline.jsonl"))
    return comm.run_client(
        client_id, run.fed, run.params, run.partition, run.local_train(), run.batches_fn,
        transport.Store(cc.store), cc, link, on_round=timeline,
    )  # fmt: skip


# ----------------------------------------------------------------------------- after training


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"--workdir {workdir}: no config.json (not a jaxblock run directory)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_model(
    workdir: str, step: int | None = None
) -> tuple[ml_collections.ConfigDict, ModelConfig, dict, dict, int]:
    """(config, model config, base params, the run's server params at `step` (default: latest), step)."""
    config = read_config(workdir)
    cfg, base = runtime.load_model(config)
    mgr = checkpoint.manager(workdir, config.checkpoint.max_to_keep)
    try:
        partition = runtime.make_partition(config, cfg)
        restored = checkpoint.restore(mgr, abstract(base), partition, step)
        if restored is None:
            raise ValueError(f"--workdir {workdir}: no checkpoint yet")
        state, meta = restored
    finally:
        mgr.close()
    return config, cfg, base, state["params"], meta["round"]


def evaluate_run(workdir: str, step: int | None = None, *, base: bool = True, log=print) -> dict:
    """Exact match and eval loss of the run's model (and of its base model) on `config.eval`; writes
    eval.json and predictions_{base,finetuned}.jsonl (every question, output, extracted and gold answer)."""
    config, cfg, base_params, params, step = restore_model(workdir, step)
    tokenizer = load_tokenizer(config)
    e = config.eval
    examples = instruct.load_examples(e.source, e.path or None, split="test")
    if e.num_examples:
        examples = examples[: e.num_examples]
    results = {"workdir": workdir, "step": step, "eval_source": e.path or e.source, "n": len(examples)}
    for name, p in ([("base", base_params)] if base else []) + [("finetuned", params)]:
        em = evaluate.exact_match(
            cfg, p, tokenizer, examples, batch_size=e.batch_size, prompt_len=e.prompt_len,
            max_new_tokens=e.max_new_tokens, desc=f"{name}: exact match",
        )  # fmt: skip
        loss = evaluate.eval_loss(cfg, p, tokenizer, examples, seq_len=config.seq_len, batch_size=e.batch_size)
        results[name] = {"exact_match": em["exact_match"], "eval_loss": loss, "samples": em["records"][:5]}
        with open(os.path.join(workdir, f"predictions_{name}.jsonl"), "w") as f:  # every answer, to read
            f.writelines(json.dumps(r) + "\n" for r in em["records"])
        log(f"{name:>9}: exact match {em['exact_match']:.1%} on {len(examples)}, eval loss {loss:.4f}")
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def export_hf(workdir: str, out_dir: str, step: int | None = None) -> int:
    """The run's model as an HF checkpoint (safetensors, config.json, tokenizer); returns the step."""
    config, cfg, _, params, step = restore_model(workdir, step)
    save_hf(cfg, params, out_dir)
    load_tokenizer(config).save_pretrained(out_dir)
    return step
