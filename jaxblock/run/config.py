"""Configuration: the frozen `ModelConfig`, HF `config.json` in and out, and config files.

Run configs are Python files whose `get_config()` returns an `ml_collections.ConfigDict`
(big_vision style). At the module boundary they become frozen dataclasses (`ModelConfig`), which
are hashable and so can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import os

import ml_collections

from jaxblock.model.config import ModelConfig

# ----------------------------------------------------------------------------- config files


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a Python config file and applies `key.sub=value` overrides.

    An unknown key or a value of the wrong type is a one-line ValueError naming it.
    """
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"jaxblock_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {path}: the file defines no get_config()")
    config = module.get_config()
    for item in overrides:
        apply_override(config, item)
    for key in NUMBER_OR_WORD_KEYS:  # 1 is 1.0, from a file or a flag: one setting, one cell, one hash
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            config[key] = float(value)
    return config


# Settings that take one value or a list with one value per client.
PER_CLIENT_KEYS = ("staleness", "bandwidth_mbps", "latency_ms")
# Settings that take a number or a word (ParaBlock's self_weight: 1, 0.5 or 'w'); validate() checks which.
NUMBER_OR_WORD_KEYS = ("self_weight",)


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Applies one `a.b.c=value` override in place; the value is a Python literal or a bare string."""
    if "=" not in item:
        raise ValueError(f"--config.{item}: expected --config.KEY=VALUE")
    key, raw = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ValueError(f"--config.{key}: unknown config key {'.'.join(parents[: i + 1])!r}")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
        raise ValueError(f"--config.{key}: unknown config key (known here: {known})")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string such as --config.schedule=random
    old = node[leaf]
    if leaf in PER_CLIENT_KEYS:
        old = None  # one value, or a list with one per client: validate() checks which
    if leaf in NUMBER_OR_WORD_KEYS:
        old = None  # (load_config makes an int a float)
    if isinstance(old, str) and isinstance(value, dict):
        value = raw  # a setting holding a JSON object as text (data.partitioner_args)
    if isinstance(old, float) and raw.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        value = float(raw)  # literal_eval has no nan/inf; validate() then says what range is allowed
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # bool is a subclass of int: --config.rounds=True must not pass as 1.
    wrong_bool = isinstance(value, bool) != isinstance(old, bool)
    if old is not None and value is not None and (wrong_bool or not isinstance(value, type(old))):
        raise ValueError(f"--config.{key}={raw}: expected {type(old).__name__}, got {type(value).__name__}")
    if leaf in PER_CLIENT_KEYS and type(value) is not type(node[leaf]):  # one value <-> one per client
        del node[leaf]
        value = ml_collections.FieldReference(value, field_type=object)
    try:
        node[leaf] = value
    except TypeError as e:  # ConfigDict's own type check, e.g. a FieldReference
        raise ValueError(f"--config.{key}={raw}: {e}") from None


def split_config_args(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """Splits argv into (config path, config overrides, the rest) for thin argparse CLIs."""
    path, overrides, rest = None, [], []
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            path = next(it, None)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            item = arg[len("--config.") :]
            if "=" not in item:  # --config.key value
                item = f"{item}={next(it, '')}"
            overrides.append(item)
        else:
            rest.append(arg)
    return path, overrides, rest


# ----------------------------------------------------------------------------- validation


def _int(lo: int):
    def check(v):
        return None if isinstance(v, int) and not isinstance(v, bool) and v >= lo else f"an integer >= {lo}"

    return check


def _number(lo: float, hi: float = math.inf, *, lo_open: bool = True, hi_open: bool = True):
    """A finite int/float in the interval (lo, hi) with open or closed ends."""
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    if hi == math.inf:
        want = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        want = f"a number in {left}{lo:g}, {hi:g}{right}"

    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return want
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else want

    return check


def _choice(*options):
    def check(v):
        return None if v in options else f"one of {', '.join(map(repr, options))}"

    return check


def _bool(v):
    return None if isinstance(v, bool) else "True or False"


def _int_or_list(lo: int):
    """An integer >= lo, or a list of them (one per client)."""
    one = _int(lo)

    def check(v):
        if isinstance(v, (list, tuple)):
            return None if v and all(one(x) is None for x in v) else f"an integer >= {lo} or a non-empty list of them"
        return one(v)

    return check


def _number_or(word: str, lo: float, hi: float):
    """A number in [lo, hi], or the string `word`."""
    number = _number(lo, hi, lo_open=False, hi_open=False)

    def check(v):
        return None if v == word or number(v) is None else f"{number(v)} or {word!r}"

    return check


def _list_of(check_one):
    def check(v):
        if not isinstance(v, (list, tuple)):
            return "a list"
        bad = [check_one(x) for x in v if check_one(x) is not None]
        return None if not bad else f"a list, each value {bad[0]}"

    return check


def _optional(check_one):
    return lambda v: None if v is None else check_one(v)


# Every numeric or enumerated run setting and what it allows. Sections with their own dataclass
# (model, optimizer names/schedules, FedConfig's choices) check themselves as well; this table
# catches what a dataclass cannot: bools posing as ints, NaN, and values that only fail rounds later.
_RULES = {
    "seed": _int(0),
    "local_steps": _int(1),
    "batch_size": _int(1),
    "seq_len": _int(2),
    "rounds": _int(1),
    "num_clients": _int(1),
    "eta": _number(0),
    "staleness": _int_or_list(0),
    "staleness_weight": _optional(_number(0, lo_open=False)),
    "max_staleness": _int(0),
    "self_weight": _number_or("w", 0, 1),
    "compression": _choice("none", "topk"),
    "topk_ratio": _number(0, 1, hi_open=False),
    "buffer_size": _int(0),
    "fedbuff_blocks": _bool,
    "client_slowdown": _list_of(_number(0)),
    "step_seconds": _number(0, lo_open=False),
    "participation": _number(0, 1, hi_open=False),
    "lr_decay_alpha": _number(0, 1, lo_open=False, hi_open=False),
    "optimizer.learning_rate": _number(0),
    "optimizer.b1": _number(0, 1, lo_open=False),
    "optimizer.b2": _number(0, 1, lo_open=False),
    "optimizer.eps": _number(0),
    "optimizer.weight_decay": _number(0, lo_open=False),
    "optimizer.momentum": _number(0, 1, lo_open=False),
    "optimizer.warmup_steps": _int(0),
    "blocks.layers_per_block": _int(1),
    "blocks.partial": _bool,
    "blocks.embed_block": _bool,
    "blocks.head_block": _bool,
    "data.source": _choice("synthetic", "mathinstruct", "alpaca_gpt4"),
    "data.partition": _choice("dirichlet", "iid"),
    "data.sample": _int(0),
    "data.alpha": _number(0),
    "data.min_client_size": _int(1),  # a client without data cannot train its block
    "data.examples_per_client": _int(1),
    "data.num_sources": _int(1),
    "eval.source": _choice("gsm8k", "mt_bench"),
    "eval.num_examples": _int(0),
    "eval.batch_size": _int(1),
    "eval.prompt_len": _int(1),
    "eval.max_new_tokens": _int(1),
    "eval.every": _int(0),
    "eval.during_training_examples": _int(0),
    "lora.rank": _int(1),
    "lora.alpha": _number(0),
    "lora.init_seed": _int(0),
    "sim.client_batch": _int(0),
    "checkpoint.interval": _int(1),
    "checkpoint.max_to_keep": _int(1),
    "comm.timeout_s": _number(0),
    "comm.keep_rounds": _bool,
    "comm.min_clients": _int(1),
    "comm.server_timeout_s": _number(0),
    "comm.max_delta_norm": _number(0, lo_open=False),
    "comm.max_norm_ratio": _number(0, lo_open=False),
    "comm.max_upload_mb": _number(0, lo_open=False),
    "comm.on_bad_update": _choice("drop", "stop"),
}


def validate(config: ml_collections.ConfigDict) -> None:
    """One-line ValueError for the first setting outside its allowed range, naming key and range.

    Runs before anything is written, so that a typo never costs a round of training or a file.
    """
    for key, check in _RULES.items():
        node, parts = config, key.split(".")
        for part in parts:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                break  # a config may leave a section out; the code that needs it says so
            node = node[part]
        else:
            problem = check(node)
            if problem is not None:
                raise ValueError(f"config.{key}={node!r}: must be {problem}")


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The frozen ModelConfig of a run config's `model` section (and the LoRA scale, `lora.alpha`)."""
    cfg = ModelConfig.from_dict(config.model.to_dict())
    if "memory" in config:
        cfg = cfg.replace(remat=bool(config.memory.remat))
    return cfg.replace(lora_alpha=float(config.lora.alpha)) if "lora" in config else cfg


def dump_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, default=str)


def model_section(**fields) -> ml_collections.ConfigDict:
    """A config's `model` section holding every ModelConfig field, so each one can be overridden
    (except lora_alpha and remat, which the `lora` and `memory` sections set)."""
    section = dataclasses.asdict(ModelConfig(**fields))
    del section["lora_alpha"], section["remat"]
    return ml_collections.ConfigDict(section)


# The paper's Section 6.1 math task: 50,000 MathInstruct examples, split over clients by
# Dirichlet(0.6) over their `source`, scored by GSM8K exact match.
PAPER_MATH = {"source": "mathinstruct", "path": "", "sample": 50_000, "partition": "dirichlet", "alpha": 0.6}
# Its instruction-following task: all of Alpaca-GPT4 (52,002 examples: the paper samples only
# MathInstruct), split over clients by Dirichlet(0.1) over a text-cluster label (instruct.cluster_labels),
# scored by MT-Bench with a GPT-4o judge (scripts/eval.py --bench mt_bench, jaxblock/run/mt_bench.py).
PAPER_ALPACA = {"source": "alpaca_gpt4", "path": "", "sample": 0, "partition": "dirichlet", "alpha": 0.1}


def paper_math(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Sets `config.data`, `config.eval` and the seed to the paper's math experiment (hub datasets)."""
    config.seed = 42  # "The random seeds for all libraries is 42"
    config.data.update(PAPER_MATH)
    config.eval.update(source="gsm8k", path="")
    return config


def paper_alpaca(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Sets `config.data`, `config.eval` and the seed to the paper's instruction-following experiment."""
    config.seed = 42
    config.data.update(PAPER_ALPACA)
    config.eval.update(source="mt_bench", path="")
    return config


def base_config() -> ml_collections.ConfigDict:
    """Run settings shared by every shipped config; each config file fills in `model` and overrides."""
    from jaxblock.fed.local import OptimizerConfig
    from jaxblock.model.sharding import DEFAULT_RULES

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.hf_checkpoint = ""  # a local directory or hub repo id; "" = random init from `model`
    # Mesh axis sizes; one may be -1 (all remaining devices). GPU configs shard weights FSDP.
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    config.rules = [list(rule) for rule in DEFAULT_RULES]
    # Block partition (blocks.llm_block_rules): consecutive layers per block, or half-layers.
    config.blocks = ml_collections.ConfigDict(
        {"layers_per_block": 2, "partial": False, "embed_block": False, "head_block": False}
    )
    config.local_steps = 10  # K: optimizer steps per round on the client's block
    config.batch_size = 4  # per client per local step
    config.seq_len = 512  # every batch is padded to this length: one executable per block
    config.optimizer = ml_collections.ConfigDict(dataclasses.asdict(OptimizerConfig()))
    # JAX's persistent compilation cache (runtime.cache_dir): '' = the user cache
    # ($XDG_CACHE_HOME or ~/.cache)/jaxblock/xla, shared by every run; a path; 'off' = none.
    config.compilation_cache_dir = ""
    # Federated run (FedConfig): ParaBlock by default, as in the paper. The algorithms
    # (jaxblock/algorithms/): parablock, fedbcd, fedavg_full (Fed full FT), and the LoRA methods
    # fedit, ffa_lora, flora, which train the adapters of the `lora` section on a frozen model.
    config.algorithm = "parablock"
    config.rounds = 10
    config.num_clients = 10
    config.eta = 1.0  # global learning rate
    # ParaBlock: rounds an upload takes (the paper's s); a list gives each client its own (Table 8's
    # slow client: client i's delta of round r is merged at the end of round r + s_i).
    config.staleness = ml_collections.FieldReference(1, field_type=object)
    # Late deltas' weight (1 + tau)^-a (tau: rounds later than the fastest client's; FedBuff: versions
    # behind); None = the algorithm's own (FedBuff 0.5, ParaBlock 0). Later than max_staleness: dropped.
    config.staleness_weight = None
    config.max_staleness = 0  # 0 = no limit
    # ParaBlock: the weight of a client's own un-merged delta in its model until the round's aggregate
    # arrives: 1 = Algorithm 2, 'w' = its aggregation weight w_i (1/M, or by sample count), 0 = none
    # (it trains from the server model), or a number in [0, 1]. The correction stays exact.
    config.self_weight = ml_collections.FieldReference(1.0, field_type=object)
    # Top-k compression with error feedback (ParaBlock, FedBCD): 'none' or 'topk' (the top topk_ratio
    # of each leaf of a delta goes up as int32 index + value; the client keeps the rest for next time).
    config.compression = "none"
    config.topk_ratio = 0.2
    # FedBuff (asynchronous): the server applies every buffer_size arrivals (0 = all clients);
    # fedbuff_blocks trains one random block per pull instead of every parameter; a client's local
    # training takes step_seconds x local_steps x client_slowdown[i] seconds: modelled in the
    # simulator, and in the deployment (scripts/client.py) at least that long in real time when set.
    config.buffer_size = 0
    config.fedbuff_blocks = False
    config.client_slowdown = []  # one factor per client, [] = all 1
    config.step_seconds = 0.1
    config.participation = 1.0  # fraction of clients sampled each round
    config.aggregation = "uniform"  # or 'samples': weights proportional to client sizes
    # random, random_norepeat (never the previous round's block again), sequential, reverse, cyclic, gradient
    config.schedule = "random"
    # The local learning rate across rounds (optimizer.schedule runs within a round): 'none',
    # 'linear' or 'cosine', from optimizer.learning_rate at round 0 towards lr_decay_alpha x it at round T.
    config.lr_decay = "none"
    config.lr_decay_alpha = 0.0
    config.data = ml_collections.ConfigDict(
        {
            "source": "synthetic",  # 'synthetic', 'mathinstruct', 'alpaca_gpt4'
            "path": "",  # a local JSON/JSONL file with the dataset's fields ("" = the hub)
            "sample": 0,  # draw this many examples with the seed (0 = all); the paper: 50,000 of MathInstruct
            "tokenizer": "",  # default: the tokenizer saved with hf_checkpoint
            "partition": "dirichlet",  # or 'iid'
            # or a flwr-datasets partitioner ('DirichletPartitioner', 'PathologicalPartitioner', ...; pip install
            # 'jaxblock[flower]'), given num_clients, seed, alpha, min_client_size and partitioner_args (JSON)
            "partitioner": "",
            "partitioner_args": "",
            "alpha": 0.6,  # Dirichlet concentration over the label (MathInstruct: source)
            "min_client_size": 8,
            "examples_per_client": 256,  # synthetic only
            "num_sources": 4,  # synthetic only
        }
    )
    # Held-out evaluation (scripts/eval.py): source 'gsm8k', GSM8K-style exact match and eval loss,
    # or 'mt_bench', answered and graded by a judge after training (scripts/eval.py --bench mt_bench).
    # every N > 0 (gsm8k only): the simulator also scores the server model every N rounds and after
    # the last (and, when a flush merges more, the final model) on the first during_training_examples
    # problems (0: num_examples), into the round's metrics.jsonl row as `eval` with the modelled wall
    # time so far. Evaluating never changes training; a run may change these on resume.
    config.eval = ml_collections.ConfigDict(
        {"source": "gsm8k", "path": "", "num_examples": 0, "batch_size": 64, "prompt_len": 64, "max_new_tokens": 32,
         "every": 0, "during_training_examples": 0}
    )  # fmt: skip
    # LoRA (fedit, ffa_lora, flora; lora.LoraConfig): adapters on `targets`, scale alpha / rank.
    # FLoRA's clients may differ in rank: client_ranks has one rank per client ([] = rank for all).
    config.lora = ml_collections.ConfigDict(
        {"rank": 32, "alpha": 64.0, "targets": ["q_proj", "v_proj"], "init_seed": 0, "client_ranks": []}
    )
    # Memory levers for large models (a run may change them on resume: they change how a step runs,
    # not what it computes). remat: recompute each decoder layer's activations in backward (the frozen
    # layers above a block still need backward for activations). loss_chunk: the next-token loss over
    # chunks of this many positions, never forming [B, T, V] float32 logits (0 = off; sums in
    # another order, so equal to ~1e-6). donate: the local step's executable reuses the buffers of
    # the block's master copy and optimizer state (scripts/plan.py's per-step figures).
    config.memory = ml_collections.ConfigDict({"remat": False, "loss_chunk": 0, "donate": True})
    # The simulator (scripts/train.py): client_batch clients of a round train at once, as one vmapped
    # program (0 = auto: on a GPU/TPU all of a round's clients when their models fit in 1 GiB on one
    # device, on the CPU one by one; 1 = one by one). Equal to one by one up to float rounding; a run
    # may change it on resume.
    config.sim = ml_collections.ConfigDict({"client_batch": 0})
    config.checkpoint = ml_collections.ConfigDict({"interval": 1, "max_to_keep": 3})
    # Differential privacy (jaxblock/fed/privacy.py): level 'record' (DP-SGD on each client's block:
    # per-example clipping to clip_norm, Gaussian noise) or 'client' (each upload clipped, the server
    # adds noise to the sum: noise 'central', or each client its share: 'distributed'). Give z
    # (noise_multiplier) or target_epsilon at delta (z calibrated for the whole run); accounted with
    # dp-accounting's accountant 'rdp' or 'pld' (PLD: client level, or record level with Poisson
    # sampling). sampling (record level): each step draws batch_size of a client's examples
    # 'without_replacement', or each example independently with probability batch_size / n_i
    # ('poisson': a fixed buffer with a 0/1 mask, divided by the expected batch_size; add/remove
    # adjacency). noise_seed: the noise's secret (-1: random, kept in workdir/dp_secret).
    # adaptive_quantile gamma (client level, central noise; 0: off): the clip norm starts at clip_norm
    # and tracks the gamma-quantile of the update norms (Andrew et al. 2021), C <- C exp(-adaptive_lr
    # (b - gamma)), b the fraction of unclipped uploads noised with std count_noise (0: M / 20); the
    # update's noise multiplier becomes (z^-2 - (2 count_noise)^-2)^(-1/2), the epsilon stays z's.
    config.dp = ml_collections.ConfigDict(
        {"level": "none", "noise": "central", "noise_multiplier": 0.0, "target_epsilon": 0.0, "delta": 1e-5,
         "clip_norm": 1.0, "accountant": "rdp", "sampling": "without_replacement", "noise_seed": -1,
         "adaptive_quantile": 0.0, "adaptive_lr": 0.2, "count_noise": 0.0}
    )  # fmt: skip
    # Secure aggregation (jaxblock/fed/secagg.py, in the deployment net/secure.py): the server learns only the
    # sum of a round's uploads, each clipped to clip_norm (0: dp.clip_norm) and quantized to `bits`
    # fixed point, masked pairwise (SecAgg+ graph of `neighbors`, 0: all pairs; `threshold` t of
    # each client's share holders recover dropouts, 0: just above half).
    config.secagg = ml_collections.ConfigDict(
        {"on": False, "bits": 32, "neighbors": 0, "threshold": 0, "clip_norm": 0.0}
    )
    # Experiment trackers (jaxblock/run/tracking.py): each round's metrics row and timeline rows as
    # scalars, the config as hyperparameters (never a key naming a secret), runtime.png at the end.
    # backends: 'jsonl' (metrics.jsonl, timeline.jsonl: always written), 'tensorboard' (workdir/tensorboard),
    # 'wandb' (pip install 'jaxblock[wandb]'; wandb_mode 'offline' writes workdir/wandb, `wandb sync` uploads),
    # 'mlflow' (pip install 'jaxblock[mlflow]'; mlflow_uri '' = sqlite in workdir/mlflow.db). project: the
    # W&B project / MLflow experiment; run_name '' = the workdir's name. A run may change them on resume.
    config.tracking = ml_collections.ConfigDict(
        {"backends": ["jsonl"], "project": "jaxblock", "run_name": "", "wandb_mode": "offline", "mlflow_uri": ""}
    )
    config.wire_dtype = "float32"  # deltas and aggregates on the wire: 'float32' or 'bfloat16'
    # The communication runtime (scripts/server.py, scripts/client.py, bench_overlap.py).
    config.comm = ml_collections.ConfigDict(
        {
            "store": "memory://",  # a TensorStore kvstore URL: memory://, file:///dir, gs://..., s3://...
            # A client's link: MB/s (a number, a preset '50MBps'/'100MBps'/'150MBps', or a list with
            # one value per client); None = unlimited. Latency in ms, likewise.
            "bandwidth_mbps": None,
            "latency_ms": None,
            "timeout_s": 600.0,
            # How long a client waits for a silent server (killed, being restarted: it resumes); a
            # server that fails says so at once in server/error.
            "server_timeout_s": 1800.0,
            # Server mode deletes round t's keys once every client has its aggregate (the store
            # would otherwise grow by one delta per client per round); True keeps them all.
            "keep_rounds": False,
            # Which uploads the server (and the simulator) accepts, see jaxblock/validate.py: a round
            # needs min_clients updates; an update above max_delta_norm (L2; 0 = no bound), above
            # max_norm_ratio x the round's median norm (0 = off) or above max_upload_mb (0 = the
            # block's exact size) is rejected, as is a malformed or non-finite one; on_bad_update:
            # 'drop' it and go on, or 'stop' the run.
            "min_clients": 1,
            "max_delta_norm": 0.0,
            "max_norm_ratio": 0.0,
            "max_upload_mb": 0.0,
            "on_bad_update": "drop",
            # This party's key directory from scripts/keys.py (keys/server on the server,
            # keys/client_<i> on client i): every delta, plan and aggregate is signed and checked
            # (jaxblock/signing.py). "" = nothing is signed: for one trusted box only.
            "keys": "",
        }
    )
    return config
