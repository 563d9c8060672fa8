"""A federated fine-tuning run from a config: model, data, algorithm, checkpoints, logs.

`train(config, workdir)` is what `scripts/train.py` calls. Rerunning it on the same workdir
resumes from the latest orbax checkpoint; on CPU the final model is bit-identical to an
uninterrupted run's. The workdir receives:
  checkpoints/   orbax steps (server params, pending deltas, round, data positions, ...)
  metrics.jsonl  one JSON object per round (round, block, loss, client_loss, seconds, ...; with
                 eval.every, the evaluation rounds' `eval`: exact match, eval loss, modelled wall s)
  summary.json   the run's outcome (algorithm, rounds, wall seconds, final train loss, ...)
  config.json    the resolved config
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import operator
import os
import sys
import time

import jax
import ml_collections
import numpy as np
import optax
import tqdm

from jaxblock.fed import algorithms, data, local, loop, privacy, secagg, validate, wire
from jaxblock.fed.blocks import Partition, subtree_like
from jaxblock.fed.config import FedConfig
from jaxblock.model import hf_io, lora
from jaxblock.model.config import ModelConfig
from jaxblock.model.hf_io import save_hf
from jaxblock.model.sharding import Layout
from jaxblock.net import asynchronous, comm, lease, signing, transport
from jaxblock.net import exchange as net_exchange
from jaxblock.run import base_model, checkpoint, evaluate, instruct, plots, runtime, timeline, tracking
from jaxblock.run import config as config_lib
from jaxblock.run.config import dump_json

# tokenizer_config.json's tokenizer_class values that name transformers' generic tokenizers-library
# tokenizer (one class in transformers 5): AutoTokenizer would pick that very class.
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(config: ml_collections.ConfigDict):
    """The run's tokenizer: `data.tokenizer`, else the one saved with `hf_checkpoint`.

    A local tokenizer of the generic class (the bundled ones, Llama 3's) is loaded as that class
    directly: importing AutoTokenizer imports every model's config and with them PyTorch where it is
    installed, ~6 s of each process's start for the class AutoTokenizer would pick anyway. Any other
    tokenizer (a hub id, Qwen2's own class) goes through AutoTokenizer."""
    path = config.data.tokenizer or config.hf_checkpoint
    if not path:
        raise ValueError("data.tokenizer is empty and there is no hf_checkpoint to take a tokenizer from")
    setting = "data.tokenizer" if config.data.tokenizer else "hf_checkpoint"
    with hf_io.hub_errors(setting, path, "--config.data.tokenizer=/local/dir (a saved tokenizer)"):
        if _tokenizer_class(path) in GENERIC_TOKENIZERS:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)


def _tokenizer_class(path: str) -> str | None:
    """tokenizer_config.json's tokenizer_class for a local tokenizer directory (None otherwise)."""
    file = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f).get("tokenizer_class")


def client_data(config: ml_collections.ConfigDict, cfg: ModelConfig) -> tuple[list[dict[str, np.ndarray]], str]:
    """Each client's examples as fixed-shape arrays, per `config.data`, and a clients x labels table.

    source 'synthetic' makes token data; 'mathinstruct', 'alpaca_gpt4' load instruction data (the hub,
    or `data.path`), tokenize it with response-only loss masks and partition it across clients
    (Dirichlet over the label, or IID).
    """
    d = config.data
    if d.source == "synthetic":
        if d.get("partitioner"):
            raise ValueError(f"data.partitioner={d.partitioner}: partitions instruction data, not synthetic data")
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
    labels, how = [e["label"] for e in examples], d.partition
    if d.get("partitioner"):  # a flwr-datasets partitioner, as a Flower user would partition
        parts = instruct.flower_partition(
            d.partitioner, labels, config.num_clients, alpha=d.alpha, seed=config.seed,
            min_size=d.min_client_size, args=d.get("partitioner_args", ""),
        )  # fmt: skip
        how = f"flwr-datasets {d.partitioner}{' ' + d.partitioner_args if d.get('partitioner_args') else ''}"
    elif d.partition == "dirichlet":
        parts = instruct.dirichlet_partition(
            labels, config.num_clients, d.alpha, seed=config.seed, min_size=d.min_client_size
        )
    elif d.partition == "iid":
        parts = instruct.iid_partition(len(examples), config.num_clients, seed=config.seed)
    else:
        raise ValueError(f"data.partition={d.partition!r}: choose 'dirichlet' or 'iid'")
    table = f"{len(examples)} examples of {d.source} over {config.num_clients} clients ({how}):\n"
    table += instruct.partition_table(labels, parts)
    return [{k: v[np.asarray(idx)] for k, v in arrays.items()} for idx in parts], table


@dataclasses.dataclass
class Setup:
    """Everything a run builds from its config, shared by the simulator, the server and the clients."""

    fed: FedConfig
    algorithm: algorithms.Algorithm
    cfg: ModelConfig
    layout: Layout
    params: dict
    partition: Partition
    batches_fn: loop.BatchesFn
    client_sizes: np.ndarray
    loss_fn: local.LossFn
    optimizer: optax.GradientTransformation
    shardings: dict
    partition_table: str
    policy: validate.Policy
    client_batch: int = 1  # the simulator's clients trained at once (loop.client_batch_size)
    dp: privacy.DPConfig = privacy.DPConfig()
    noise_multiplier: float = 0.0  # z of a DP run (given, or calibrated to dp.target_epsilon)
    noise_seed: int = 0  # this party's DP secret (privacy.secret_seed)
    fixed_batches_fn: loop.BatchesFn | None = None  # the data in order (train_loss): batches_fn may sample
    batch_size: int = 1

    def local_train(self):
        poisson = self.batch_size if self.dp.sampling == "poisson" else 0  # the divisor: the expected batch
        dp = local.DPSGD(self.dp.clip_norm, self.noise_multiplier, poisson) if self.dp.level == "record" else None
        return local.make_local_train(
            self.loss_fn, self.optimizer, layout=self.layout, param_shardings=self.shardings, dp=dp
        )

    def budget(self, rounds: int, rows: list[dict] | None = None) -> dict:
        """What rounds [0, rounds) of this DP run spent (privacy.budget); `rows`, the run's metrics rows,
        say how many uploads each round's sum held (distributed noise: a dropout takes its share away)."""
        summed = None if rows is None else uploads_summed(rows)
        return privacy.budget(self.dp, self.fed, self.algorithm, self.noise_multiplier, rounds,
                              self.client_sizes, self.batch_size, summed)  # fmt: skip

    def trainer(self, exchange=None, links=None) -> loop.Trainer:
        return loop.Trainer(
            self.fed, self.loss_fn, self.batches_fn, self.partition, self.local_train(), self.client_sizes, exchange,
            self.algorithm, links and tuple(links), self.policy, self.client_batch,
        )  # fmt: skip

    def abstract_params(self) -> dict:
        return abstract(self.params)


def abstract(params: dict) -> dict:
    """ShapeDtypeStructs, shardings included: an orbax restore target for arrays like these."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)


def setup(config: ml_collections.ConfigDict, workdir: str | None = None) -> Setup:
    """Builds the model, data, partition and optimizer of a run config (validated at the boundary).

    Writes nothing: every mistake in the config, the base model or the data is found here, before
    a workdir is touched. `workdir`: where a DP run keeps this party's noise secret (read, if there).
    """
    config_lib.validate(config)
    tracking.check(config)  # an unknown tracker, or one whose package is missing
    runtime.setup_jax(config)
    layout = runtime.make_layout(config)
    client_batch = config.get("sim", {}).get("client_batch", 0)  # sim.client_batch (0 = auto)
    if client_batch > 1 and layout.mesh.size > 1:
        raise ValueError(
            f"sim.client_batch={client_batch}: batched clients run on one device, and mesh "
            f"{dict(layout.mesh.shape)} has {layout.mesh.size}: use sim.client_batch=1 (or 0, auto)"
        )
    if config.batch_size % layout.ways("activation_batch"):
        raise ValueError(
            f"batch_size={config.batch_size} does not split over the {layout.ways('activation_batch')} "
            f"data-parallel devices of mesh {dict(layout.mesh.shape)}: use a multiple, or change config.mesh"
        )
    cfg, params = runtime.load_model(config, layout)
    fed = runtime.fed_config(config)
    dp = privacy.from_config(config.get("dp"))
    privacy.check(dp, fed, algorithms.REGISTRY[fed.algorithm], runtime.policy(config))
    clients, table = client_data(config, cfg)
    sizes = np.array([len(c["tokens"]) for c in clients])
    fed, z, seed = _private(dp, config.get("secagg"), fed, sizes, config.batch_size, workdir)
    if secagg.of(fed.transforms) is not None:
        secagg.check(fed, algorithms.REGISTRY[fed.algorithm], runtime.policy(config))
    algorithm = algorithms.make(fed, cfg, runtime.lora_config(config))
    shardings = layout.tree_shardings(runtime.logical_axes(config, cfg))
    layers = runtime.layer_partition(config, cfg, params)
    params = algorithm.server_params(params)  # LoRA methods: adapters beside the frozen kernels
    params = jax.device_put(params, subtree_like(shardings, params))
    partition = algorithm.partition(params, layers)
    in_order = data.make_batches_fn(clients, config.batch_size, seed=config.seed)
    sampled = data.make_sampled_batches_fn(
        clients, config.batch_size, seed, dp.sampling, multiple=layout.ways("activation_batch")
    ) if dp.level == "record" else in_order  # fmt: skip
    return Setup(
        policy=privacy.policy(runtime.policy(config), dp),
        fed=fed,
        algorithm=algorithm,
        cfg=cfg,
        layout=layout,
        params=params,
        partition=partition,
        batches_fn=sampled,
        fixed_batches_fn=in_order,
        batch_size=config.batch_size,
        client_sizes=sizes,
        dp=dp,
        noise_multiplier=z,
        noise_seed=seed,
        loss_fn=local.lm_loss(cfg, layout),
        optimizer=local.make_optimizer(runtime.optimizer_config(config), fed.local_steps),
        shardings=shardings,
        partition_table=table,
        client_batch=loop.client_batch_size(
            client_batch,
            params,
            fed.clients_per_round,
            layout.mesh.size,
            layout.mesh.devices.flat[0].platform,
        ),
    )


def _private(dp: privacy.DPConfig, sa, fed: FedConfig, client_sizes, batch_size: int, workdir: str | None):
    """(fed with the privacy transforms: client-level DP's, then secure aggregation's; z; this party's
    secret seed) of a run; neither: (fed, 0, 0)."""
    secure = sa is not None and sa.on
    if not dp.on and not secure:
        return fed, 0.0, 0
    cls = algorithms.REGISTRY[fed.algorithm]
    z = privacy.noise_multiplier(dp, fed, cls, client_sizes, batch_size) if dp.on else 0.0
    seed = privacy.secret_seed(dp, workdir)
    per_round = len(cls.participants(fed, 0))  # M: the sampled clients (a rota's one)
    chain = list(fed.transforms)
    if dp.level == "client":
        adaptive = {}
        if dp.adaptive:
            if secure:
                raise ValueError("dp.adaptive_quantile with secagg.on: the clients' clipped-or-not bits would need "
                                 "a secure sum of their own, and the server could not check each upload against "
                                 "the round's clip norm")  # fmt: skip
            sigma_b = privacy.count_noise(dp, per_round)
            privacy.update_multiplier(z, sigma_b)  # refused here, in one line, if sigma_b <= z / 2
            adaptive = {"adaptive_quantile": dp.adaptive_quantile, "adaptive_lr": dp.adaptive_lr,
                        "count_noise": sigma_b}  # fmt: skip
        chain.append(privacy.ClientDP(dp.clip_norm, z, dp.noise, per_round, seed, **adaptive))
    if secure:
        clip = sa.clip_norm or (dp.clip_norm if dp.level == "client" else 0.0)
        if not clip > 0:
            raise ValueError("secagg.on needs a clip norm to quantize in a range: set secagg.clip_norm (or "
                             "dp.clip_norm with dp.level='client')")  # fmt: skip
        share = z * dp.clip_norm / math.sqrt(per_round) if dp.noise == "distributed" and dp.level == "client" else 0.0
        chain.append(secagg.SecureAggregation(clip, per_round, sa.bits, sa.neighbors, sa.threshold, share, seed))
    return dataclasses.replace(fed, transforms=tuple(chain)), z, seed


def _keep_secret(run: Setup, directory: str) -> None:
    """A random secret (DP noise, secure aggregation's rounding) is written once the run is checked."""
    if run.dp.on or secagg.of(run.fed.transforms) is not None:
        privacy.keep_secret(run.dp, directory, run.noise_seed)


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, step: int | None = None) -> dict:
    """Runs (or resumes) the federated run of `config` in `workdir`; returns the summary.

    Resumes from the newest checkpoint that restores (or from `step`); steps it cannot use (damaged,
    or newer than `step`) are moved to `workdir/set_aside/`, never deleted. The rounds are the round
    loop's (`loop.run_rounds`); what a run does each round hangs on it as hooks (`_round_hooks`).
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir} is a file, not a directory")
    run = setup(config, workdir)  # every user error is raised here, before anything is written
    evaluator = training_evaluator(config, run.cfg)  # so is one in eval.* (eval.every > 0 only)
    _keep_secret(run, workdir)
    fed = run.fed
    links = [wire.link_for(c, config.comm.bandwidth_mbps, config.comm.latency_ms) for c in range(fed.num_clients)]
    # The simulator's exchanges go through the configured TensorStore (memory:// by default).
    store = transport.Store(config.comm.store) if config.comm.store else None
    if store is not None:
        store.check()
    trainer = run.trainer(store and net_exchange.ThroughStore(store, fed.wire_dtype), links)
    state, wall_before, final = _start_or_resume(run, trainer, config, workdir, step)
    mgr = checkpoint.manager(workdir, config.checkpoint.max_to_keep)
    if progress:
        print(run.partition_table)
    with open(os.path.join(workdir, "partition.txt"), "w") as f:
        f.write(run.partition_table + "\n")
    run.params = None  # the state owns the model from here on
    start = time.perf_counter()
    history = _truncate_metrics(os.path.join(workdir, "metrics.jsonl"), state["round"])
    _truncate_metrics(os.path.join(workdir, "timeline.jsonl"), state["round"])

    def save(state: dict, final: bool = False) -> None:
        wall_s = wall_before + time.perf_counter() - start
        checkpoint.save(mgr, state, fed, wall_s=wall_s, final=final, config=public_config(config).to_dict())

    bar = tqdm.tqdm(total=fed.rounds, initial=state["round"], desc=fed.algorithm, disable=not progress, unit="round")
    tracker = tracking.make(tracking.backends(config), workdir, config)
    try:
        hooks = _round_hooks(run, config, workdir, links, history, bar, save, tracker, evaluator)
        state = loop.run_rounds(trainer, state, hooks)
    except BaseException:
        tracker.close()
        raise
    bar.close()
    if not final:
        state = loop.flush(trainer, state)
        save(state, final=True)
    write_row = timeline.TimelineWriter(os.path.join(workdir, "timeline.jsonl"))
    flush_rows = timeline.flush_timeline(fed, run.partition, links, history)  # rewritten on a resume: modelled
    for row in flush_rows:
        write_row(row)
    final_eval = {}
    if evaluator is not None and flush_rows:  # the flush merged more: the model the run ends with, too
        wall_s = timeline.modeled_wall_s(os.path.join(workdir, "timeline.jsonl"), history)
        final_eval = {**evaluator(state["params"]), "modeled_wall_s": wall_s}
    scalars = {**tracking.timeline_scalars(flush_rows), **tracking.round_scalars({"eval": final_eval})}
    tracker.log(fed.rounds, scalars)  # the step after the last round
    mgr.wait_until_finished()
    summary = _summary(run, config, workdir, state, history, wall_before + time.perf_counter() - start)
    if final_eval:
        summary["final_eval"] = final_eval
    tracker.image("runtime", os.path.join(workdir, "runtime.png"), fed.rounds)
    tracker.close()
    summary["checkpoint_step"] = int(mgr.latest_step())
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    mgr.close()
    return summary


def _start_or_resume(run: Setup, trainer, config, workdir: str, step: int | None) -> tuple[dict, float, bool]:
    """(state, wall seconds before this process, whether the run is final): round 0's, or the newest
    checkpoint's that restores (or `step`'s) after checking the settings are the run's."""
    restored, steps = None, []
    if os.path.isdir(checkpoint.directory(workdir)):
        mgr = checkpoint.manager(workdir, read_only=True)
        try:
            steps = sorted(mgr.all_steps())
            # The settings first (meta is cheap JSON): a changed setting that also changes array
            # shapes must be named as such, not reported as damaged steps after full restores.
            meta = checkpoint.newest_readable_meta(mgr)
            if meta is not None:
                check_same_run(meta, config, workdir)
            restored = checkpoint.restore_newest(mgr, run.abstract_params(), run.partition, step)
        finally:
            mgr.close()
    if restored is None:
        if step is not None:
            raise ValueError(f"--step {step}: {workdir} has no checkpoints yet")
        write_run_files(config, workdir)
        return trainer.init_state(run.params), 0.0, False
    state, meta, skipped = restored
    if meta.get("mode", "simulator") != "simulator":
        raise ValueError(f"--workdir {workdir} holds a {meta['mode']} run: train.py cannot resume it")
    base_model.verify(workdir, config.hf_checkpoint, base_model.resolve(config.hf_checkpoint) or None)
    newer = [s for s in steps if s > meta["round"] and s not in dict(skipped)]
    for s, reason in skipped:
        print(f"checkpoint step {s} does not restore ({reason}): set aside in {set_aside(workdir, s, reason)}")
    for s in newer:
        set_aside(workdir, s, f"newer than --step {step}")
    print(f"resuming {workdir} from round {state['round']} (checkpoint step {meta['round']})")
    with open(os.path.join(workdir, "config.json"), "w") as f:  # settings a resume may change (eval, ...)
        f.write(dump_json(public_config(config)))
    return state, meta["wall_s"], meta["final"]


def _round_hooks(run: Setup, config, workdir: str, links, history: list, bar, save, tracker, evaluator=None) -> list:
    """What the simulator does after each round: the modelled timeline, with `evaluator`
    (`training_evaluator`) every `eval.every` rounds and after the last an evaluation of the server
    model, metrics.jsonl, the trackers (the round's row and timeline rows), the progress bar, and a
    checkpoint every `checkpoint.interval` rounds (the last one is the final flush's)."""
    fed, timeline_path = run.fed, os.path.join(workdir, "timeline.jsonl")
    write_row = timeline.TimelineWriter(timeline_path)

    def log(state, metrics):
        if run.dp.on:  # what the run has spent so far
            metrics["epsilon"] = run.budget(state["round"])["epsilon"]
        history.append(metrics)
        for row in timeline.modeled_timeline(fed, run.partition, links, history):
            write_row(row)

    def evaluate_every(state, metrics):  # after log: the timeline holds this round's rows
        done = metrics["round"] + 1
        if done % config.eval.every == 0 or done == fed.rounds:
            wall_s = timeline.modeled_wall_s(timeline_path, history)  # rounds 0..t, as summary.json counts them
            metrics["eval"] = {**evaluator(state["params"]), "modeled_wall_s": wall_s}

    def write(state, metrics):
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def track(state, metrics):  # after log: history holds this round
        rows = timeline.modeled_timeline(fed, run.partition, links, history)
        tracker.log(metrics["round"], {**tracking.round_scalars(metrics), **tracking.timeline_scalars(rows)})

    def progress(state, metrics):
        loss = "-" if metrics["loss"] is None else f"{metrics['loss']:.4f}"  # FedBuff: a round may train nobody
        bar.set_postfix(block=metrics["block"], loss=loss, s=f"{metrics['seconds']:.1f}")
        bar.update(1)
        if "eval" in metrics and not bar.disable:
            e = metrics["eval"]
            bar.write(f"round {metrics['round']}: exact match {e['exact_match']:.1%}, eval loss {e['loss']:.4f} "
                      f"on {e['n']}, modelled wall {e['modeled_wall_s']:.1f}s")  # fmt: skip

    def checkpoint_every(state, metrics):
        if state["round"] % config.checkpoint.interval == 0 and state["round"] < fed.rounds:
            save(state)

    return [log, *([evaluate_every] if evaluator else []), write, track, progress, checkpoint_every]


def training_evaluator(config: ml_collections.ConfigDict, cfg: ModelConfig):
    """With `eval.every` > 0, a function scoring a server model as scripts/eval.py does (greedy exact
    match, eval loss) on the first `eval.during_training_examples` problems (0: `eval.num_examples`):
    params -> {exact_match, loss, n, seconds}. Its tokenizer and problems are loaded here, so that a
    mistake is one line before training starts. Greedy decoding draws no random numbers: training
    goes on exactly as without it. `eval.every` = 0: None."""
    e = config.eval
    every = e.get("every", 0)
    if not every:
        return None
    if e.source == "mt_bench":
        raise ValueError(f"eval.every={every}: eval.source=mt_bench needs a judge and is scored after training "
                         "(scripts/eval.py --bench mt_bench): set eval.every=0")  # fmt: skip
    try:
        tokenizer = load_tokenizer(config)
    except ValueError as err:
        raise ValueError(f"eval.every={every}: {err}") from None
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"eval.every={every}: the tokenizer has {len(tokenizer)} tokens, the model's "
                         f"vocab_size is {cfg.vocab_size}")  # fmt: skip
    examples = eval_examples(config, e.get("during_training_examples", 0) or e.num_examples)

    def score(params: dict) -> dict:
        start = time.perf_counter()
        em, loss = _score(config, cfg, params, tokenizer, examples, progress=False)
        seconds = time.perf_counter() - start
        return {"exact_match": em["exact_match"], "loss": loss, "n": len(examples), "seconds": seconds}

    return score


def _score(config, cfg: ModelConfig, params: dict, tokenizer, examples: list[dict], **progress) -> tuple[dict, float]:
    """(exact_match's result, eval loss) of `params` on `examples`, with the run's `eval` settings:
    what scripts/eval.py and evaluation during training both report."""
    e = config.eval
    em = evaluate.exact_match(cfg, params, tokenizer, examples, batch_size=e.batch_size, prompt_len=e.prompt_len,
                              max_new_tokens=e.max_new_tokens, **progress)  # fmt: skip
    return em, evaluate.eval_loss(cfg, params, tokenizer, examples, seq_len=config.seq_len, batch_size=e.batch_size)


def eval_examples(config: ml_collections.ConfigDict, n: int = 0) -> list[dict]:
    """The first `n` problems (0: all) of the run's held-out set (`config.eval`)."""
    e = config.eval
    examples = instruct.load_examples(e.source, e.path or None, split="test", path_key="eval.path")
    return examples[:n] if n else examples


def _summary(run: Setup, config, workdir: str, state: dict, history: list, wall_s: float) -> dict:
    """summary.json's figures (and runtime.png): the run's outcome, traffic and modelled wall time."""
    fed, timeline_path = run.fed, os.path.join(workdir, "timeline.jsonl")
    totals = _timeline_totals(timeline_path, fed.num_clients)
    label = f"{fed.algorithm}\n{_link_label(config.comm.bandwidth_mbps)}"
    plots.runtime_bars(
        [{"label": label, "compute_s": totals["compute_s"], "exposed_s": totals["exposed_wait_s"]}],
        os.path.join(workdir, "runtime.png"),
        "The whole run, mean per client: compute vs exposed communication (modelled link)",
        "seconds, whole run (mean per client)",
    )
    per_client = isinstance(fed.flat().get("staleness"), tuple)
    return {
        "algorithm": fed.algorithm,
        "rounds": fed.rounds,
        "num_clients": fed.num_clients,
        "staleness": list(fed.stalenesses) if per_client else max(fed.stalenesses),
        "blocks": run.partition.num_blocks,
        "wall_s": wall_s,
        **{f"per_client_{k}": v for k, v in totals.items()},
        "modeled_wall_s": timeline.modeled_wall_s(timeline_path, history),
        "final_train_loss": train_loss(run.loss_fn, state["params"], run.fixed_batches_fn, fed.num_clients),
        "fed": fed.flat(),
        **({"dp": run.budget(fed.rounds, history)} if run.dp.on else {}),
    }


def uploads_summed(rows: list[dict]) -> dict[int, int]:
    """{round r: how many of its uploads were merged}, from metrics rows' `merged` ([[r, clients], ...])."""
    out: dict[int, int] = {}
    for row in rows:
        for r, clients in row.get("merged", []):
            out[r] = out.get(r, 0) + len(clients)
    return out


def read_rows(path: str) -> list[dict]:
    """A JSONL file's rows ([] if there is none)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_loss(loss_fn, params: dict, batches_fn, num_clients: int, num_batches: int = 8) -> float:
    """Mean loss of `params` on every client's first `num_batches` batches: the same fixed set for
    every algorithm (8 batches: a few hundred examples in all, so one odd batch cannot swing it)."""
    fn = jax.jit(loss_fn)
    losses = []
    for c in range(num_clients):
        batches = batches_fn(c, 0, num_batches)[0]
        losses += [float(fn(params, jax.tree.map(operator.itemgetter(i), batches))) for i in range(num_batches)]
    return float(np.mean(losses))


# Settings that may differ when a run resumes: they change neither the model nor the logs.
RESUMABLE_KEYS = (
    "checkpoint.", "comm.timeout_s", "comm.store", "comm.keep_rounds", "compilation_cache_dir", "eval.", "memory.",
    "sim.", "tracking.",
)  # fmt: skip


# Settings a client may hold differently from the server: where files are, and its own link.
PER_PARTY_KEYS = (
    "comm.keys",
    "comm.server_timeout_s",
    "dp.noise_seed",  # each party's secret
    *RESUMABLE_KEYS,
    "hf_checkpoint",
    "data.path",
    "data.tokenizer",
    "comm.bandwidth_mbps",
    "comm.latency_ms",
)


def agreed_settings(config: ml_collections.ConfigDict) -> dict:
    """Every setting that changes the result, as {flat key: JSON text}: server and clients must agree."""
    return {k: _json(v) for k, v in sorted(_flat(config.to_dict()).items()) if not k.startswith(PER_PARTY_KEYS)}


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def check_agreement(published: dict, config: ml_collections.ConfigDict) -> None:
    """ValueError listing every key where this client's config differs from the one the server published."""
    mine = agreed_settings(config)
    if settings_hash(mine) == published.get("hash"):
        return
    theirs = published.get("settings", {})
    diff = [f"{k}={mine.get(k, '(unset)')} (server: {theirs.get(k, '(unset)')})" for k in sorted({*mine, *theirs})
            if mine.get(k) != theirs.get(k)]  # fmt: skip
    raise ValueError(
        f"this config differs from the server's in {', '.join(diff) or 'its hash'}: rerun with the server's settings"
    )


def check_same_run(meta: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses to resume a run with settings that change its result, listing every differing key.

    The run's settings come from the checkpoint's meta (older checkpoints: workdir/config.json, or
    only the federated settings). A key the saved run lacks was added later: it had the default.
    """
    saved = meta.get("config")
    if saved is None and os.path.exists(os.path.join(workdir, "config.json")):
        saved = read_config(workdir).to_dict()
    if saved is None:  # only the federated settings: those of its algorithm, a missing key at its default
        now = runtime.fed_config(config).flat()
        saved = {**algorithms.configure(algorithm=now["algorithm"]).flat(), **meta["fed"]}
    else:
        saved, now = {**_flat(config_lib.base_config().to_dict()), **_flat(saved)}, _flat(config.to_dict())
    diff = [
        f"{k}={_json(saved.get(k))} (now {_json(v)})"
        for k, v in now.items()
        if _json(saved.get(k)) != _json(v) and not k.startswith(RESUMABLE_KEYS)
    ]
    if diff:
        raise ValueError(
            f"--workdir {workdir} holds a run with {', '.join(diff)}: rerun with its settings "
            f"({os.path.join(workdir, 'config.json')}) or use a new workdir"
        )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _json(v) -> str:  # one spelling per value: a tuple and a list, as config.json would have them
    return json.dumps(v, default=str)


def public_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config as files hold it (config.json, checkpoint metas): `comm.store` without its credentials."""
    public = ml_collections.ConfigDict(config.to_dict())
    if public.comm.get("store"):
        public.comm.store = transport.public_store(public.comm.store)
    return public


def write_run_files(config: ml_collections.ConfigDict, workdir: str) -> None:
    """config.json (the resolved config) and base_model.json (what the base model was) of a new run."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(dump_json(public_config(config)))
    base_model.record(workdir, config.hf_checkpoint)


def set_aside(workdir: str, step: int, reason: str) -> str:
    """Moves checkpoint `step` to workdir/set_aside/ (with the reason beside it); returns where."""
    dest_root = os.path.join(workdir, "set_aside")
    os.makedirs(dest_root, exist_ok=True)
    dest = os.path.join(dest_root, f"step_{step}_{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(os.path.join(checkpoint.directory(workdir), str(step)), dest)
    with open(dest + ".reason.txt", "w") as f:
        f.write(reason + "\n")
    return dest


def _truncate_metrics(path: str, next_round: int) -> list[dict]:
    """Keeps the JSON lines of rounds before `next_round` (a resumed run rewrites the rest); returns them."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rounds = [(line, json.loads(line)["round"]) for line in f if line.strip()]
    # A "flush" row (timeline.jsonl) comes after every round: a resumed run writes it again.
    kept = [line for line, r in rounds if isinstance(r, int) and r < next_round]
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
    return comm.CommConfig(
        store=store or config.comm.store,
        timeout_s=float(config.comm.timeout_s),
        keep_rounds=bool(config.comm.get("keep_rounds", False)),
        keys=config.comm.get("keys", ""),
        server_timeout_s=float(config.comm.get("server_timeout_s", 1800.0)),
    )


def serve(config: ml_collections.ConfigDict, workdir: str, store_url: str | None = None) -> dict:
    """The server process: plans rounds, aggregates clients' uploads, checkpoints after each aggregate.

    Returns the summary; the final model is the workdir's last orbax checkpoint. Rerunning the same
    command after the server stopped (killed, crashed) resumes: from the workdir's newest checkpoint
    (none: from round 0), on the store that holds this run, while the clients wait for it.
    """
    run = setup(config, workdir)
    if not run.algorithm.asynchronous:  # FedBuff runs its own loop (net/asynchronous.py)
        comm.check_supported(run.algorithm)
    cc = comm_config(config, store_url)
    store = transport.Store(cc.store)  # shown as store.name: cc.store may hold credentials
    store.check()
    settings = agreed_settings(config)
    keys = cc.load_keys()
    published = {"kind": "config", "hash": settings_hash(settings), "settings": settings}
    state = None
    if transport.holds_a_run(store):  # a restart: the store must hold this very run, unfinished
        if store.get_json("server/done") is not None:  # (a finished run keeps nothing else: see finish below)
            raise ValueError(f"--store {store.name} holds a finished run: use an empty store")
        theirs = store.get_json("server/config") or {}
        if theirs.get("hash") != published["hash"]:
            raise ValueError(f"--store {store.name} holds another run (its settings differ): use an empty store")
        store.delete("server/error")  # the failure that stopped it: clients started anew must not stop on it
        mgr = checkpoint.manager(workdir, config.checkpoint.max_to_keep)
        if mgr.latest_step() is not None:
            check_same_run(checkpoint.newest_readable_meta(mgr) or {}, config, workdir)
            state, meta, skipped = checkpoint.restore_newest(mgr, run.abstract_params(), run.partition)
            for step, why in skipped:
                print(f"checkpoint step {step} skipped: {why}", file=sys.stderr)
        mgr.close()
        resumed = 0 if state is None else state["round"]
        _truncate_metrics(os.path.join(workdir, "metrics.jsonl"), resumed + run.fed.effective_staleness)
        _truncate_metrics(os.path.join(workdir, "arrivals.jsonl"), resumed)  # FedBuff's: judged again
        print(f"server: resuming the run in {store.name} after round {resumed}", file=sys.stderr, flush=True)
    elif os.path.isdir(checkpoint.directory(workdir)):
        raise ValueError(f"--workdir {workdir} holds checkpoints but --store {store.name} no run: use the run's store")
    write_run_files(config, workdir)  # so that eval.py and export_hf.py read a server workdir like any other
    if config.eval.get("every", 0):
        print(f"server: eval.every={config.eval.every} is the simulator's; the server does not evaluate during "
              "training (score its checkpoints: scripts/eval.py --step N)", file=sys.stderr)  # fmt: skip
    _keep_secret(run, workdir)
    store.put_json("server/config", keys.seal(published) if keys else published)
    mgr = checkpoint.manager(workdir, config.checkpoint.max_to_keep)
    start = time.perf_counter()
    tracker = tracking.make(tracking.backends(config), workdir, config)

    def save(state):
        final = state["round"] == run.fed.rounds
        wall_s = time.perf_counter() - start
        public = public_config(config).to_dict()
        checkpoint.save(mgr, state, run.fed, wall_s=wall_s, final=final, config=public, mode="server")

    def log_and_save(state, row):  # FedBuff's apply: durable on return, as the driver deletes what it consumed
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        tracker.log(row["round"], tracking.round_scalars(row))
        save(state)
        mgr.wait_until_finished()

    try:
        if run.algorithm.asynchronous:  # FedBuff: arrivals in real time, applied every buffer_size
            params = asynchronous.serve(
                run.fed, run.params, run.partition, store, cc, policy=run.policy, state=state, on_apply=log_and_save,
                on_arrival=functools.partial(asynchronous.log_arrival, os.path.join(workdir, "arrivals.jsonl")),
            )  # fmt: skip
        else:
            log = functools.partial(log_merge, os.path.join(workdir, "metrics.jsonl"), start=start, tracker=tracker)
            if run.dp.on:
                log = functools.partial(_with_epsilon, run, log)
            params = comm.serve(
                run.fed, run.params, run.partition, store, cc, client_sizes=run.client_sizes, policy=run.policy,
                on_aggregate=save, on_merge=log, state=state, algorithm=run.algorithm,
            )  # fmt: skip
    except ValueError as e:  # TensorStore reports I/O failures as ValueError: not the user's mistake
        raise RunFailed(f"the server failed: {store.scrub(str(e))}") from e
    finally:
        tracker.close()
        mgr.wait_until_finished()
        mgr.close()
    if not cc.keep_rounds:  # a finished run leaves only server/done, which every party checks first
        store.delete("server/config")
    summary = {
        "algorithm": run.fed.algorithm,
        "rounds": run.fed.rounds,
        "num_clients": run.fed.num_clients,
        "wall_s": time.perf_counter() - start,
        "final_train_loss": train_loss(run.loss_fn, params, run.fixed_batches_fn, run.fed.num_clients),
        "store": store.name,
        **({"dp": run.budget(run.fed.rounds, read_rows(f"{workdir}/metrics.jsonl"))} if run.dp.on else {}),
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _with_epsilon(run: Setup, log, row: dict) -> None:
    """The server's row of the end of round t, with what the rounds trained by then have spent (the
    simulator's definition: a round's uploads count from the round they are made in)."""
    log({**row, "epsilon": run.budget(min(row["round"] + 1, run.fed.rounds))["epsilon"]})


def log_merge(path: str, row: dict, start: float | None = None, tracker: tracking.Tracker | None = None) -> None:
    """The server's record of round t's merges: a line in metrics.jsonl (with the left-out updates
    counted by reason) and its scalars in `tracker`, a progress line on stderr (round, merged, left out,
    seconds since `start`) and a line per update left out."""
    reasons = [why.split(":")[0] for _, _, why in row["left_out"]]
    row = {**row, "left_out_by_reason": {k: reasons.count(k) for k in sorted(set(reasons))}}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if tracker is not None:
        tracker.log(row["round"], tracking.round_scalars(row))
    merged = sum(len(clients) for _, clients in row["merged"])
    elapsed = "" if start is None else f", {time.perf_counter() - start:.1f}s"
    print(f"server: end of round {row['round']}: merged {merged} update(s), left out {len(row['left_out'])}{elapsed}",
          file=sys.stderr, flush=True)  # fmt: skip
    for r, c, why in row["left_out"]:
        print(f"round {r}: client {c}'s update left out: {why}", file=sys.stderr, flush=True)


def client(config: ml_collections.ConfigDict, client_id: int, workdir: str, store_url: str | None = None) -> dict:
    """A client process: trains its blocks and exchanges deltas; appends to workdir/timeline.jsonl and
    checkpoints its state in workdir/client_<i>/ each round; rerunning it resumes from there."""
    if not 0 <= client_id < config.num_clients:
        raise ValueError(f"--client-id {client_id}: the run has clients 0..{config.num_clients - 1}")
    cc = comm_config(config, store_url)
    cc.load_keys()  # a missing or wrong keys directory is said now, not once the server has started
    check_local_files(config)  # so are its data and base model
    store = transport.Store(cc.store)  # shown as store.name: cc.store may hold credentials
    store.check()
    if store.get_json("server/done") is not None:  # nothing to join: say so now, and write nothing
        raise _finished(store)
    held = lease.Lease(store, client_id, workdir)  # a second process with this id is refused here, at once
    try:
        return _client(config, client_id, workdir, cc, store)
    finally:
        held.release()


def _local_path(value: str) -> bool:
    """A setting that names a file on this machine (not a hub repo id such as 'org/name')."""
    return value.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(value))


def check_local_files(config: ml_collections.ConfigDict) -> None:
    """Every local file a party reads (its data file, base model, tokenizer) exists: a client says so
    before it joins a run, not after the server has started and waited for it."""
    if config.data.path and not os.path.isfile(os.path.expanduser(config.data.path)):
        raise ValueError(f"data.path={config.data.path}: no such file")
    for key in ("hf_checkpoint", "data.tokenizer"):
        value = config.hf_checkpoint if key == "hf_checkpoint" else config.data.tokenizer
        if value and _local_path(value) and not os.path.isdir(os.path.expanduser(value)):
            raise ValueError(f"{key}={value}: no such directory (a local HF checkpoint or tokenizer)")


def _finished(store) -> ValueError:
    return ValueError(f"--store {store.name} holds a finished run (server/done): start a new run on an empty store")


def _client(config: ml_collections.ConfigDict, client_id: int, workdir: str, cc, store) -> dict:
    link = wire.link_for(client_id, config.comm.bandwidth_mbps, config.comm.latency_ms)
    # Before anything is built: a client with other settings would train another run.
    try:
        published = store.wait_json("server/config", cc.server_wait_s, "the server's config")
    except transport.TransportTimeout:
        if store.get_json("server/done") is not None:  # it finished (and took its config away) meanwhile
            raise _finished(store) from None
        raise
    keys = cc.load_keys()
    if keys is not None:
        try:
            keys.check(published, "server", {"kind": "config"})
        except signing.BadSignature as e:
            raise RunFailed(f"the server's config in the store is not the server's ({e})") from None
    check_agreement(published, config)
    own = os.path.join(workdir, f"client_{client_id}")  # its checkpoints and its DP secret
    run = setup(config, own)
    if not run.algorithm.asynchronous:  # FedBuff runs its own loop (net/asynchronous.py)
        comm.check_supported(run.algorithm)
    os.makedirs(workdir, exist_ok=True)
    _keep_secret(run, own)
    write_row = _with_a_line(client_id, timeline.TimelineWriter(os.path.join(workdir, "timeline.jsonl")))
    if run.algorithm.asynchronous:  # its state is {n, data position}: a JSON file, not a model
        try:
            return asynchronous.run_client(
                client_id, run.fed, run.params, run.partition, run.local_train(), run.batches_fn, store, cc, link,
                on_round=write_row, state_path=os.path.join(workdir, f"client_{client_id}", "fedbuff.json"),
            )  # fmt: skip
        except ValueError as e:  # see serve
            raise RunFailed(f"the client failed: {store.scrub(str(e))}") from e
    # Its own state, each round (before it acks the round): rerunning the command rejoins the run.
    mgr = checkpoint.manager(os.path.join(workdir, f"client_{client_id}"), max_to_keep=2)
    resume = None
    if mgr.latest_step() is not None:
        check_same_run(checkpoint.newest_readable_meta(mgr) or {}, config, workdir)
        resume, _, skipped = checkpoint.restore_newest(mgr, run.abstract_params(), run.partition)
        for step, why in skipped:
            print(f"client {client_id}: checkpoint step {step} skipped: {why}", file=sys.stderr)
        print(f"client {client_id}: rejoining the run at round {resume['round']}", file=sys.stderr, flush=True)

    def save(state: dict) -> None:
        checkpoint.save(mgr, state, run.fed, wall_s=0.0, config=public_config(config).to_dict(), mode="client")
        mgr.wait_until_finished()

    try:
        return comm.run_client(
            client_id, run.fed, run.params, run.partition, run.local_train(), run.batches_fn,
            store, cc, link, on_round=write_row, on_state=save, resume=resume, algorithm=run.algorithm,
            client_sizes=run.client_sizes,
        )  # fmt: skip
    except ValueError as e:  # see serve
        raise RunFailed(f"the client failed: {store.scrub(str(e))}") from e
    finally:
        mgr.close()


def _with_a_line(client_id: int, write_row):
    """A client's timeline writer that also prints the row as a line on stderr: a deployment shows
    its progress as it runs."""

    def write(row: dict) -> None:
        write_row(row)
        loss = "" if row.get("loss") is None else f", loss {row['loss']:.4f}"
        print(f"client {client_id}: round {row['round']}: block {row['block']}{loss}, "
              f"compute {row['compute_s']:.2f}s, comm {row['comm_s']:.2f}s, waited {row['exposed_wait_s']:.2f}s",
              file=sys.stderr, flush=True)  # fmt: skip

    return write


class RunFailed(RuntimeError):
    """A server or client run that failed after its setup (store I/O, ...): not a user error."""


# ----------------------------------------------------------------------------- after training


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"--workdir {workdir}: no config.json (not a jaxblock run directory)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_model(
    workdir: str, step: int | None = None, *, base_dir: str | None = None, log=print
) -> tuple[ml_collections.ConfigDict, ModelConfig, dict, int]:
    """(config, model config, the run's server params at `step` (default: the newest that restores), step).

    Reads only the workdir (the checkpoint holds the whole model) and writes nothing to it. The base
    model directory, whose tokenizer the run used, is checked against base_model.json; `base_dir`
    points at it if it moved, and becomes the config's `hf_checkpoint`.
    """
    config = read_config(workdir)
    runtime.setup_jax(config)  # the evaluation's executables are cached like training's
    mgr = checkpoint.manager(workdir, config.checkpoint.max_to_keep, read_only=True)
    directory = base_model.verify(workdir, config.hf_checkpoint, base_dir)
    if directory is not None:
        config.hf_checkpoint = directory
    cfg = config_lib.model_config(config)
    partition = runtime.make_partition(config, cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = runtime.server_shapes(config, cfg)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    try:
        restored = checkpoint.restore_newest(mgr, target, partition, step)
    finally:
        mgr.close()
    if restored is None:
        raise ValueError(f"--workdir {workdir}: no checkpoints yet (train it first with scripts/train.py)")
    state, meta, skipped = restored
    for s, reason in skipped:
        log(f"checkpoint step {s} does not restore ({reason}): using step {meta['round']}")
    return config, cfg, state["params"], meta["round"]


def evaluate_run(
    workdir: str,
    step: int | None = None,
    *,
    base: bool = True,
    base_dir: str | None = None,
    loss_by_token: bool = False,
    source: str | None = None,
    log=print,
) -> dict:
    """Exact match and eval loss of the run's model (and of its base model) on `config.eval`; writes
    eval.json and predictions_{base,finetuned}.jsonl (every question, output, extracted and gold answer).
    `loss_by_token`: also the reference tokens that carry most of the eval loss (`evaluate.loss_by_token`).
    `source`: another held-out set than the run's `eval.source` ('gsm8k': the hub's, for a run scored
    by MT-Bench; MT-Bench itself is `mt_bench.evaluate_run`)."""
    config = read_config(workdir)
    if (source or config.eval.source) != "gsm8k":
        raise ValueError(f"eval.source={source or config.eval.source}: exact match needs gsm8k "
                         "(MT-Bench: scripts/eval.py --bench mt_bench)")  # fmt: skip
    config, cfg, params, step = restore_model(workdir, step, base_dir=base_dir, log=log)
    if source and source != config.eval.source:  # the hub's set: the run's eval.path holds its own source's rows
        config.eval.update(source=source, path="")
    base_params = runtime.load_model(config)[1] if base else None
    tokenizer = load_tokenizer(config)
    e = config.eval
    examples = eval_examples(config, e.num_examples)
    results = {"workdir": workdir, "step": step, "eval_source": e.path or e.source, "n": len(examples)}
    for name, p in ([("base", base_params)] if base else []) + [("finetuned", params)]:
        em, loss = _score(config, cfg, p, tokenizer, examples, desc=f"{name}: exact match")
        results[name] = {"exact_match": em["exact_match"], "eval_loss": loss, "samples": em["records"][:5]}
        if loss_by_token:
            rows = evaluate.loss_by_token(cfg, p, tokenizer, examples, seq_len=config.seq_len, batch_size=e.batch_size)
            results[name]["loss_by_token"] = rows
            log(f"{name:>9}: the tokens that carry the eval loss (share, count, mean loss):")
            for r in rows:
                log(f"{'':>11}{r['token']!r:>14} {r['share']:6.1%} {r['count']:6d} {r['mean_loss']:8.3f}")
        with open(os.path.join(workdir, f"predictions_{name}.jsonl"), "w") as f:  # every answer, to read
            f.writelines(json.dumps(r) + "\n" for r in em["records"])
        log(f"{name:>9}: exact match {em['exact_match']:.1%} on {len(examples)}, eval loss {loss:.4f}")
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def export_hf(workdir: str, out_dir: str, step: int | None = None, *, force: bool = False, base_dir=None) -> int:
    """The run's model as an HF checkpoint (safetensors, config.json, tokenizer); returns the step.

    A run with LoRA adapters is written merged (W + BA * alpha / r), and its adapters also as a PEFT
    adapter directory `out_dir/adapter` for the base model.

    Refuses an `out_dir` that is a non-empty directory unless `force`, and never writes into the
    base model's directory or the run's workdir, whatever `force` says.
    """
    out = os.path.realpath(out_dir)
    config = read_config(workdir)
    protected = {os.path.realpath(workdir): "the run's workdir"}
    recorded = base_model.recorded_path(workdir)  # where a hub id resolved to (the HF cache), too
    for path in (config.hf_checkpoint, config.data.tokenizer, base_dir, recorded):
        if path and os.path.isdir(path):
            protected[os.path.realpath(path)] = "the base model's directory"
    if out in protected:
        raise ValueError(f"--out {out_dir} is {protected[out]}: export elsewhere")
    checkpoints = os.path.realpath(checkpoint.directory(workdir))
    if out == checkpoints or out.startswith(checkpoints + os.sep):  # orbax owns it: a stray directory breaks restores
        raise ValueError(f"--out {out_dir} is inside the run's checkpoints directory: export elsewhere")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ValueError(f"--out {out_dir} is a non-empty directory: choose another, or pass --force to overwrite")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out_dir} is a file, not a directory")
    config, cfg, params, step = restore_model(workdir, step, base_dir=base_dir)
    tokenizer = load_tokenizer(config)
    adapted = lora.has_adapters(params)  # FedIT, FFA-LoRA (FLoRA merges every round: plain params)
    save_hf(cfg, lora.merge(cfg, params) if adapted else params, out_dir)
    tokenizer.save_pretrained(out_dir)
    if adapted:  # also as a PEFT adapter on the run's base model: PeftModel.from_pretrained(base, out/adapter)
        lora.save_peft(cfg, params, os.path.join(out_dir, "adapter"), base_model_name_or_path=config.hf_checkpoint)
    return step
