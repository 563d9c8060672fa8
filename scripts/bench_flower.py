"""jaxblock run on Flower (issue 31): ParaBlock's overlap under `flwr run`, and jaxblock against the peer a
Flower user would pick (Flower's own FedAvg with PyTorch + transformers), in the same Flower engine.

**overlap**: ParaBlock vs FedBCD seconds per round with a modelled link (`comm.bandwidth_mbps`), as
`bench_overlap.py` measures them, through `flwr run` on a deployment SuperLink with 2 SuperNodes on
loopback (`--insecure`), beside jaxblock's own deployment (`scripts/server.py` + 2 `scripts/client.py`
processes) on the same config and link, interleaved. The config: `configs/tiny.py`, 2 clients, one block
spanning every layer (every round computes the same), `schedule=sequential`. A calibration run (own
deployment, FedBCD, unlimited link) gives the compute per round and the bytes a client moves per round
(up + down); each ratio r sets the link so that comm = r x compute. Per round: compute_s + exposed_wait_s
of every client's timeline row, round 0 and the flush left out; medians over every client and repeat.
overlap efficiency = (T_fedbcd - T_parablock) / min(T_comp, T_comm), T_comp and T_comm FedBCD's medians.

**peer**: Flower's `FedAvg` strategy (`flwr.serverapp.strategy`, `ArrayRecord`) over a PyTorch + transformers
ClientApp this script writes into a temporary Flower App, against jaxblock's Fed full FT (`fedavg_full`)
and ParaBlock, all three through `flwr run` in Flower's simulation engine (one simulation SuperLink, 2
SuperNodes, 1 CPU each). The same work: `configs/tiny.py`'s base model (assets/tiny_base, read by
`AutoModelForCausalLM.from_pretrained`), the very batches jaxblock's clients draw (its `batches_fn`, saved
per client and round), K local steps of AdamW with the config's settings, fresh each round as jaxblock's,
uniform averaging. Measured from outside every run:
  steady client-steps/s = K x clients x (rounds - 1) / (time of the server's last round row - time of its
  round-0 row): the rows' arrival in the server's metrics file, polled every 20 ms (jaxblock's
  metrics.jsonl; the peer's ServerApp appends a row after each `aggregate_train`). Start-up, model
  loading and round 0 (JAX's compiles, PyTorch's first step) are out.
  whole-run client-steps/s = K x clients x rounds / the `flwr run` command's wall time (everything in).
  peak RSS per client = VmHWM (/proc/<pid>/status, the kernel's high-water mark) of each Ray actor that
  ran a ClientApp (a descendant of our SuperLink whose title names ClientAppActor), polled every 20 ms.

    HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu python scripts/bench_flower.py --bench overlap --rounds 8 --repeats 2
    HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu python scripts/bench_flower.py --bench peer --rounds 8 --repeats 3

With --json the last line is `{"overlap": [...], "peer": {...}}`.
"""

import argparse
import contextlib
import glob
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
APP = os.path.join(ROOT, "jaxblock", "flower", "app")
CONFIG = os.path.join(ROOT, "configs", "tiny.py")
RUN_S = 900  # one `flwr run` of a few tiny rounds takes 30-120 s here
# bench_overlap's setting, with 2 clients: one block of every layer, so that every round computes the same
OVERLAP = ("num_clients=2", "blocks.layers_per_block=8", "blocks.head_block=False", "blocks.embed_block=False",
           "schedule=sequential", "comm.timeout_s=300")  # fmt: skip


# ----------------------------------------------------------------------------- processes


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: str) -> dict:
    return {**os.environ, "FLWR_HOME": home, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
            "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), "FLWR_DISABLE_UPDATE_CHECK": "1"}  # fmt: skip


def _spawn(cmd: list[str], home: str, log: str) -> subprocess.Popen:
    """A process in a session of its own: it and its children are stopped together (`_stop`)."""
    return subprocess.Popen(cmd, env=_env(home), cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)  # fmt: skip


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _wait_log(path: str, text: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and text in open(path).read():  # noqa: SIM115
            return
        if proc.poll() is not None:
            raise SystemExit(f"error: {proc.args[0]} exited {proc.returncode}: {open(path).read()[-2000:]}")  # noqa: SIM115
        time.sleep(0.3)
    raise SystemExit(f"error: {path}: no {text!r} within {timeout:.0f}s")


@contextlib.contextmanager
def federation(tmp: str, simulation: bool, nodes: int = 2):
    """A SuperLink on free loopback ports with its own FLWR_HOME (simulation mode, or deployment with
    `nodes` SuperNodes, `--node-config client-id=i`); yields (FLWR_HOME, connection name, SuperLink pid)."""
    home, port, name = os.path.join(tmp, "flwr_home"), _port(), "sim" if simulation else "local"
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n')
        f.write(f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    procs, log = [], os.path.join(tmp, "superlink.log")
    try:
        procs.append(_spawn([f"{BIN}/flower-superlink", *(["--simulation"] if simulation else []), "--insecure",
                             "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
                            home, log))  # fmt: skip
        _wait_log(log, "Uvicorn running", procs[0])
        for i in range(0 if simulation else nodes):
            node_log = os.path.join(tmp, f"supernode_{i}.log")
            cmd = [f"{BIN}/flower-supernode", "--superlink", f"127.0.0.1:{port}", "--insecure", "--node-config",
                   f"client-id={i}", "--port", str(_port())]  # fmt: skip
            procs.append(_spawn(cmd, home, node_log))
            _wait_log(node_log, "SuperNode ID:", procs[-1])
        yield home, name, procs[0].pid
    finally:
        for proc in reversed(procs):
            _stop(proc)


class Watch(threading.Thread):
    """Polls, while a run lasts, when each row of the server's metrics file (a glob) appears, and the peak
    RSS (VmHWM) of every Ray actor under `root` that ran a ClientApp."""

    def __init__(self, rows_glob: str, root: int | None, every_s: float = 0.02):
        super().__init__(daemon=True)
        self.rows_glob, self.root, self.every_s = rows_glob, root, every_s
        self.row_times: list[float] = []
        self.peak_kb: dict[int, int] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            now = time.time()
            for path in glob.glob(self.rows_glob):
                with open(path) as f:
                    n = sum(1 for line in f if line.endswith("\n"))
                self.row_times += [now] * (n - len(self.row_times))
            if self.root is not None:
                self._rss()
            self.stopping.wait(self.every_s)

    def _rss(self) -> None:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            pid, cmd = proc.info["pid"], " ".join(proc.info["cmdline"] or [])
            if pid not in self.peak_kb:
                if "ClientAppActor" not in cmd:
                    continue
                with contextlib.suppress(psutil.Error):
                    if self.root not in [p.pid for p in proc.parents()]:
                        continue  # another session's Flower
            with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
                hwm = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)  # 0: a zombie
                self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), hwm)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def flwr_run(home: str, connection: str, app: str, run_config: str, rows_glob: str, log: str,
             federation_config: str | None = None, root: int | None = None) -> dict:  # fmt: skip
    """`flwr run app connection --stream`; returns its wall time, the arrival times of the server's rows
    and the peak RSS (MB) of each ClientApp actor under `root`."""
    cmd = [f"{BIN}/flwr", "run", app, connection, "--stream", "--run-config", run_config]
    cmd += ["--federation-config", federation_config] if federation_config else []
    watch = Watch(rows_glob, root)
    watch.start()
    start = time.time()
    try:
        with open(log, "w") as out:
            proc = subprocess.run(cmd, env=_env(home), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=RUN_S)
    finally:
        watch.stop()
    wall = time.time() - start
    text = open(log).read()  # noqa: SIM115
    if proc.returncode != 0 or "Traceback" in text:
        raise SystemExit(f"error: flwr run failed ({log}): {text[-3000:]}")
    return {"wall_s": wall, "row_times": [t - start for t in watch.row_times],
            "peak_rss_mb": sorted(kb / 1024 for kb in watch.peak_kb.values())}  # fmt: skip


def _run_config(overrides: list[str], workdir: str) -> str:
    return f"config-file='{CONFIG}' overrides='{' '.join(overrides)}' workdir='{workdir}'"


def _read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _timeline(path: str) -> list[dict]:
    """A run's client rows of rounds >= 1 (round 0 has no exchange to hide; the flush is not a round)."""
    return [r for r in _read_rows(path) if r["round"] != "flush" and r["round"] >= 1]


# ----------------------------------------------------------------------------- 1. overlap


def own_deployment(tmp: str, overrides: list[str], tag: str) -> list[dict]:
    """jaxblock's own deployment: scripts/server.py and a scripts/client.py per client over a file:// store."""
    work = os.path.join(tmp, tag)
    flags = [f"--config.{o}" for o in overrides]
    store = f"file://{work}/store"
    home = os.path.join(tmp, "own_home")
    server = _spawn([sys.executable, "scripts/server.py", "--config", CONFIG, *flags, "--store", store, "--workdir",
                     f"{work}/server"], home, f"{work}.server.log")  # fmt: skip
    client = [sys.executable, "scripts/client.py", "--config", CONFIG, *flags, "--store", store, "--workdir",
              f"{work}/clients"]  # fmt: skip
    clients = [_spawn([*client, "--client-id", str(i)], home, f"{work}.client{i}.log") for i in range(2)]
    try:
        for proc in (server, *clients):
            if proc.wait(timeout=RUN_S) != 0:
                raise SystemExit(f"error: {proc.args[1]} failed: see {work}.*.log")
    finally:
        for proc in (server, *clients):
            _stop(proc)
    return _timeline(f"{work}/clients/timeline.jsonl")


def overlap(args, tmp: str) -> list[dict]:
    os.makedirs(os.path.join(tmp, "own_home"), exist_ok=True)
    calib = own_deployment(tmp, [*OVERLAP, "algorithm=fedbcd", f"rounds={max(args.rounds // 2, 4)}"], "calibration")
    comp_s = statistics.median(r["compute_s"] for r in calib)
    moved = statistics.median(r["bytes_up"] + r["bytes_down"] for r in calib)
    print(f"calibration (own deployment, FedBCD, unlimited link): compute {comp_s:.3f} s/round, "
          f"{moved / 1e6:.2f} MB up + down per client and round", flush=True)  # fmt: skip
    settings = []
    with federation(os.path.join(tmp, "deployment"), simulation=False) as (home, connection, _):
        for ratio in [float(x) for x in args.ratios.split(",")]:
            bandwidth = moved / (ratio * comp_s) / 1e6
            rows = {(where, a): [] for where in ("flower", "own") for a in ("fedbcd", "parablock")}
            for rep in range(args.repeats):  # interleaved: drift in the machine's load hits every cell alike
                for algorithm in ("fedbcd", "parablock"):
                    overrides = [*OVERLAP, f"algorithm={algorithm}", f"rounds={args.rounds}",
                                 f"comm.bandwidth_mbps={bandwidth:.3f}"]  # fmt: skip
                    tag = f"r{ratio:g}_{algorithm}_{rep}"
                    work = os.path.join(tmp, f"flower_{tag}")
                    flwr_run(home, connection, APP, _run_config(overrides, work), f"{work}/*/server/metrics.jsonl",
                             f"{work}.log")  # fmt: skip
                    rows["flower", algorithm] += _timeline(glob.glob(f"{work}/*/clients/timeline.jsonl")[0])
                    rows["own", algorithm] += own_deployment(tmp, overrides, f"own_{tag}")
            for where in ("flower", "own"):
                fedbcd, para = rows[where, "fedbcd"], rows[where, "parablock"]
                t_comp = statistics.median(r["compute_s"] for r in fedbcd)
                t_comm = statistics.median(r["comm_s"] for r in fedbcd)
                t_fedbcd = statistics.median(r["compute_s"] + r["exposed_wait_s"] for r in fedbcd)
                t_para = statistics.median(r["compute_s"] + r["exposed_wait_s"] for r in para)
                row = {"where": where, "comm_over_comp": ratio, "bandwidth_mbps": bandwidth, "comp_s": t_comp,
                       "comm_s": t_comm, "fedbcd_s": t_fedbcd, "parablock_s": t_para,
                       "overlap_efficiency": (t_fedbcd - t_para) / min(t_comp, t_comm),
                       "parablock_over_max": t_para / max(t_comp, t_comm), "rounds_per_cell": len(fedbcd)}  # fmt: skip
                settings.append(row)
                print(f"comm/comp {ratio:>4} {where:>6}: link {bandwidth:6.2f} MB/s  comp {t_comp:.3f}s  "
                      f"comm {t_comm:.3f}s  FedBCD {t_fedbcd:.3f} s/round  ParaBlock {t_para:.3f} s/round  "
                      f"efficiency {row['overlap_efficiency']:.2f}  ParaBlock/max {row['parablock_over_max']:.2f}",
                      flush=True)  # fmt: skip
    return settings


# ----------------------------------------------------------------------------- 2. the peer

PEER_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "peer-fedavg"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "peer_app:server"
clientapp = "peer_app:client"

[tool.flwr.app.config]
num-rounds = 3
model = ""
data = ""
rows = ""
lr = 0.001
b1 = 0.9
b2 = 0.999
eps = 1e-6
weight-decay = 0.0
"""

# What a Flower user writes: FedAvg over a transformers model, the weights in an ArrayRecord each way.
PEER_APP = '''\
"""Flower's FedAvg with PyTorch + transformers: the peer of jaxblock in scripts/bench_flower.py."""

import json
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from transformers import AutoModelForCausalLM

server = ServerApp()
client = ClientApp()
_MODEL = {}


class TimedFedAvg(FedAvg):
    """FedAvg that appends a row to `rows` after each round's aggregate (the benchmark times their arrival)."""

    def __init__(self, rows, **kwargs):
        super().__init__(**kwargs)
        self.rows = rows

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        losses = [float(r.content["metrics"]["train_loss"]) for r in replies if r.has_content()]
        compute = [float(r.content["metrics"]["compute_s"]) for r in replies if r.has_content()]
        threads = [int(r.content["metrics"]["threads"]) for r in replies if r.has_content()]
        with open(self.rows, "a") as f:
            f.write(json.dumps({"round": server_round - 1, "losses": losses, "compute_s": compute,
                                "threads": threads}) + "\\n")
        return arrays, metrics


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    strategy = TimedFedAvg(cfg["rows"], fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=2,
                           min_available_nodes=2)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=int(cfg["num-rounds"]),
                   train_config=ConfigRecord({}))


@client.train()
def train(msg: Message, context: Context) -> Message:
    cfg, node = context.run_config, int(context.node_config["partition-id"])
    if "model" not in _MODEL:  # one per actor process, as a Flower user keeps it between messages
        _MODEL["model"] = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32).train()
    model = _MODEL["model"]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    round_ = int(msg.content["config"]["server-round"]) - 1
    data = np.load(f"{cfg['data']}/client{node}_round{round_}.npz")
    tokens = torch.as_tensor(data["tokens"], dtype=torch.long)  # [K, B, T]
    labels = torch.where(torch.as_tensor(data["loss_mask"]) > 0, tokens, torch.full_like(tokens, -100))
    start = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(cfg["b1"], cfg["b2"]), eps=cfg["eps"],
                            weight_decay=cfg["weight-decay"])  # fresh each round, as jaxblock's local optimizer
    losses = []
    for k in range(len(tokens)):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens[k], labels=labels[k]).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    metrics = {"num-examples": int(tokens.shape[0] * tokens.shape[1]), "train_loss": float(np.mean(losses)),
               "compute_s": time.perf_counter() - start, "threads": torch.get_num_threads()}
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
'''


def peer_inputs(tmp: str, rounds: int, extra: tuple[str, ...] = ()) -> dict:
    """The peer's app directory and data: each client's batches of each round, as jaxblock's `batches_fn`
    draws them (every client trains every round in Fed full FT), and the optimizer's settings."""
    import numpy as np

    from jaxblock.run import config as config_lib
    from jaxblock.run import experiment, runtime

    config = config_lib.load_config(CONFIG, ("num_clients=2", f"rounds={rounds}", *extra))
    config_lib.validate(config)
    run = experiment.setup(config)
    data = os.path.join(tmp, "peer_data")
    os.makedirs(data)
    for c in range(config.num_clients):
        position = 0
        for t in range(rounds):
            batches, position = run.batches_fn(c, position, config.local_steps)
            np.savez(f"{data}/client{c}_round{t}.npz", tokens=batches["tokens"], loss_mask=batches["loss_mask"])
    app = os.path.join(tmp, "peer_app")
    os.makedirs(app)
    with open(os.path.join(app, "pyproject.toml"), "w") as f:
        f.write(PEER_PYPROJECT)
    with open(os.path.join(app, "peer_app.py"), "w") as f:
        f.write(PEER_APP)
    opt = runtime.optimizer_config(config)
    if opt.name != "adamw" or opt.schedule != "constant" or opt.warmup_steps or config.lr_decay != "none":
        raise SystemExit(f"error: the peer runs constant AdamW; the config's optimizer is {opt}")
    return {"app": app, "data": data, "model": config.hf_checkpoint, "K": config.local_steps,
            "clients": config.num_clients, "batch": config.batch_size, "seq_len": config.seq_len,
            "optimizer": {"lr": opt.learning_rate, "b1": opt.b1, "b2": opt.b2, "eps": opt.eps,
                          "weight-decay": opt.weight_decay}}  # fmt: skip


def _rates(run: dict, k: int, clients: int, rounds: int) -> dict:
    times = run["row_times"]
    if len(times) < rounds:
        raise SystemExit(f"error: {len(times)} server rows seen, expected >= {rounds}")
    # ParaBlock's last row is its flush (round rounds-1's deltas merged): the end of its training, as
    # FedBCD's or FedAvg's last round row is theirs
    steady = k * clients * (rounds - 1) / (times[-1] - times[0])
    return {"steady_steps_s": steady, "whole_steps_s": k * clients * rounds / run["wall_s"], "wall_s": run["wall_s"],
            "steady_s": times[-1] - times[0], "peak_rss_mb": run["peak_rss_mb"]}  # fmt: skip


def peer(args, tmp: str) -> dict:
    extra = (f"local_steps={args.local_steps}",) if args.local_steps else ()
    inputs = peer_inputs(tmp, args.rounds, extra)
    k, clients = inputs["K"], inputs["clients"]
    print(f"peer: K={k}, batch {inputs['batch']}x{inputs['seq_len']}, {clients} clients, {args.rounds} rounds, "
          f"AdamW {inputs['optimizer']}", flush=True)  # fmt: skip
    systems = ("peer", "fedavg_full", "parablock")
    results: dict[str, list] = {s: [] for s in systems}
    fed_config = f"num-supernodes={clients} client-resources-num-cpus=1"
    with federation(os.path.join(tmp, "simulation"), simulation=True) as (home, connection, root):
        for rep in range(args.repeats):
            for system in systems:
                work = os.path.join(tmp, f"{system}_{rep}")
                if system == "peer":
                    rows = f"{work}/rows.jsonl"
                    os.makedirs(work)
                    o = inputs["optimizer"]
                    run_config = (f"num-rounds={args.rounds} model='{inputs['model']}' data='{inputs['data']}' "
                                  f"rows='{rows}' lr={o['lr']} b1={o['b1']} b2={o['b2']} eps={o['eps']} "
                                  f"weight-decay={o['weight-decay']}")  # fmt: skip
                    run = flwr_run(home, connection, inputs["app"], run_config, rows, f"{work}.log", fed_config, root)
                    detail = _read_rows(rows)
                else:
                    overrides = ["num_clients=2", f"rounds={args.rounds}", f"algorithm={system}", "comm.timeout_s=300",
                                 *extra]  # fmt: skip
                    run = flwr_run(home, connection, APP, _run_config(overrides, work),
                                   f"{work}/*/server/metrics.jsonl", f"{work}.log", fed_config, root)  # fmt: skip
                    detail = _read_rows(glob.glob(f"{work}/*/clients/timeline.jsonl")[0])
                row = {**_rates(run, k, clients, args.rounds), "detail": detail}
                results[system].append(row)
                print(f"repeat {rep} {system:>11}: steady {row['steady_steps_s']:6.2f} client-steps/s "
                      f"({row['steady_s']:.1f}s), whole run {row['whole_steps_s']:5.2f} ({row['wall_s']:.1f}s), "
                      f"peak RSS per client {[round(m) for m in row['peak_rss_mb']]} MB", flush=True)  # fmt: skip
    summary = {"K": k, "clients": clients, "rounds": args.rounds, "repeats": args.repeats, "systems": {}}
    for system in systems:
        runs = results[system]
        if system == "peer":
            compute = [c for r in runs for d in r["detail"] if d["round"] >= 1 for c in d["compute_s"]]
            threads = sorted({t for r in runs for d in r["detail"] for t in d["threads"]})
        else:
            compute = [d["compute_s"] for r in runs for d in r["detail"] if d["round"] != "flush" and d["round"] >= 1]
            threads = []
        summary["systems"][system] = {
            "steady_steps_s": statistics.median(r["steady_steps_s"] for r in runs),
            "whole_steps_s": statistics.median(r["whole_steps_s"] for r in runs),
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "peak_rss_mb": statistics.median(m for r in runs for m in r["peak_rss_mb"]),
            "compute_s_per_round": statistics.median(compute),
            "runs": [{k_: v for k_, v in r.items() if k_ != "detail"} for r in runs],
            **({"torch_threads": threads} if threads else {}),
        }  # fmt: skip
    # Equal work: round 0 starts from the same weights on the same batches in the peer and in Fed full FT
    peer_losses = sorted(results["peer"][0]["detail"][0]["losses"])
    ours = sorted(d["loss"] for d in results["fedavg_full"][0]["detail"] if d["round"] == 0)
    summary["round0_loss_gap"] = max(abs(a - b) for a, b in zip(peer_losses, ours, strict=True))
    s = summary["systems"]
    for system in ("fedavg_full", "parablock"):
        for measure in ("steady_steps_s", "whole_steps_s"):
            summary[f"{system}_over_peer_{measure}"] = s[system][measure] / s["peer"][measure]
    print(f"round 0 mean loss, peer vs jaxblock Fed full FT (same weights, same batches): max gap "
          f"{summary['round0_loss_gap']:.2e}")  # fmt: skip
    for system in systems:
        x = s[system]
        print(f"{system:>11}: steady {x['steady_steps_s']:6.2f} client-steps/s, whole run {x['whole_steps_s']:5.2f}, "
              f"client compute {x['compute_s_per_round']:.3f} s/round, peak RSS per client {x['peak_rss_mb']:.0f} MB",
              flush=True)  # fmt: skip
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", choices=["overlap", "peer", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per run")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each cell")
    parser.add_argument("--ratios", default="0.5,1,2", help="overlap: target comm/comp ratios")
    parser.add_argument("--local-steps", type=int, default=0,
                        help="peer: K local steps per round for every system (default: the config's)")  # fmt: skip
    parser.add_argument("--keep", default="", help="keep the runs' files here (default: a temporary directory)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error(f"--rounds={args.rounds}: need at least 3 (round 0 and the flush are left out)")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min), {os.cpu_count()} cores")
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_flower_") as tmp:
        tmp = args.keep or tmp
        os.makedirs(tmp, exist_ok=True)
        if args.bench in ("overlap", "both"):
            out["overlap"] = overlap(args, tmp)
        if args.bench in ("peer", "both"):
            out["peer"] = peer(args, tmp)
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
