"""Issue 31: `flwr run` of jaxblock's Flower App gives the simulator's final model bit for bit, in
Flower's simulation engine (Ray) and on a real SuperLink with SuperNodes (TLS, node authentication);
an unregistered SuperNode is refused; a SuperNode killed mid-run (kill -9, its ClientApp with it) and
restarted rejoins, and the run completes with the same model.

Every process is real and bounded in time; the SuperLink and SuperNodes are on loopback ports."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_comm import _start
from test_train import SMALL, final_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
APP = os.path.join(ROOT, "jaxblock", "flower", "app")
RUN_S = 400  # a `flwr run` of 3-4 tiny rounds (JAX start-up, compiles, Ray) takes 30-120 s here


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home) -> dict:
    return {**os.environ, "FLWR_HOME": str(home), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1",
            "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), "FLWR_DISABLE_UPDATE_CHECK": "1"}  # fmt: skip


def _spawn(cmd, home, log):
    """A long-running Flower process in a session of its own (its children are killed with it)."""
    return subprocess.Popen(cmd, env=_env(home), cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)  # fmt: skip


def _stop(proc, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _wait_log(path, text, proc, timeout=90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and text in open(path).read():  # noqa: SIM115
            return
        assert proc.poll() is None, f"{proc.args[0]} exited {proc.returncode}: {open(path).read()[-2000:]}"  # noqa: SIM115
        time.sleep(0.3)
    raise AssertionError(f"{path}: no {text!r} within {timeout:.0f}s: {open(path).read()[-2000:]}")  # noqa: SIM115


def _connection(home, name: str, port: int, ca: str | None = None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{ca}"' if ca else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\n{security}\n'
    )


def _run_config(overrides: str, workdir) -> str:
    """Flower's run-config of the tiny config shrunk as the simulator's tests shrink it (`SMALL`)."""
    return f"config-file='{ROOT}/configs/tiny.py' overrides='{' '.join(SMALL)} {overrides}' workdir='{workdir}'"


def _flwr_run(home, connection: str, overrides: str, workdir, *extra) -> str:
    run_config = _run_config(overrides, workdir)
    cmd = [f"{BIN}/flwr", "run", APP, connection, "--stream", "--run-config", run_config, *extra]
    proc = subprocess.run(cmd, env=_env(home), cwd=ROOT, capture_output=True, text=True, timeout=RUN_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "jaxblock on Flower: done: " in out, out[-3000:]
    return out


def _run_dir(workdir) -> str:
    (run,) = os.listdir(workdir)  # one directory per Flower run id
    return os.path.join(workdir, run)


def _assert_bitwise(flower_server: str, sim: str) -> int:
    (step_a, a), (step_b, b) = final_params(flower_server), final_params(sim)
    assert step_a == step_b
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    return step_a


def _simulator(overrides: str, workdir):
    """scripts/train.py on the same config (`_start` adds `SMALL`)."""
    return _start("train.py", *[f"--config.{o}" for o in overrides.split()], "--workdir", str(workdir), "--no-progress")


def _finish(proc) -> None:
    _, err = proc.communicate(timeout=RUN_S)
    assert proc.returncode == 0, err[-2000:]


@pytest.fixture(scope="module")
def simulation_superlink(tmp_path_factory):
    """A SuperLink in simulation mode (what `flwr run` starts on its own for a local federation, here on
    a free port and with its own FLWR_HOME, so that nothing outlives the test)."""
    home, port = tmp_path_factory.mktemp("flwr_sim"), _port()
    _connection(home, "sim", port)
    log = home / "superlink.log"
    link = _spawn([f"{BIN}/flower-superlink", "--simulation", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                   "--disable-runtime-dependency-installation"], home, log)  # fmt: skip
    try:
        _wait_log(log, "Uvicorn running", link)
        yield home
    finally:
        _stop(link)


@pytest.mark.parametrize("algorithm", ["parablock", "fedit"])
def test_flwr_run_in_the_simulation_engine_equals_the_simulator(algorithm, simulation_superlink, tmp_path, report):
    overrides = f"algorithm={algorithm} num_clients=2 rounds=3 comm.timeout_s=120"
    sim = _simulator(overrides, tmp_path / "sim")
    try:
        start = time.perf_counter()
        out = _flwr_run(simulation_superlink, "sim", overrides, tmp_path / "flower",
                        "--federation-config", "num-supernodes=2 client-resources-num-cpus=1")  # fmt: skip
        seconds = time.perf_counter() - start
        _finish(sim)
    finally:
        if sim.poll() is None:
            sim.kill()
    run = _run_dir(tmp_path / "flower")
    rounds = _assert_bitwise(os.path.join(run, "server"), str(tmp_path / "sim"))
    # Both simulated SuperNodes ran a client (their partition-id is the client id) and replied "done"
    assert out.count(" done (") == 2 and "client 0 done" in out and "client 1 done" in out, out[-3000:]
    assert sorted(os.listdir(os.path.join(run, "clients"))) == ["client_0", "client_1", "timeline.jsonl"]
    report(f"flwr run, simulation engine, {algorithm}: final model bitwise the simulator's ({rounds} rounds, "
           f"{seconds:.0f}s for `flwr run`)")  # fmt: skip


def test_superlink_with_tls_and_node_auth_survives_a_killed_supernode_and_equals_the_simulator(tmp_path, report):
    """Issue 31's deployment tests in one federation (each costs a SuperLink and SuperNodes to start):
    TLS and node authentication on; a SuperNode with an unregistered key is refused; SuperNode 1 is
    killed (SIGKILL, its ClientApp dies with it) after round 1 and restarted; the run completes with
    the simulator's final model."""
    home, port = tmp_path / "home", _port()
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, f"{ROOT}/scripts/flower_certs.py", "--out", str(certs), "--nodes", "3"],
                   check=True, timeout=60, capture_output=True)  # fmt: skip
    _connection(home, "tls", port, ca=str(certs / "ca.crt"))
    overrides = "num_clients=2 rounds=4 comm.timeout_s=300"
    sim = _simulator(overrides, tmp_path / "sim")
    procs = {}
    try:
        procs["link"] = _spawn([f"{BIN}/flower-superlink", "--host", "127.0.0.1", "--port", str(port),
                                "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "superlink.crt"),
                                "--ssl-keyfile", str(certs / "superlink.key"), "--enable-supernode-auth",
                                "--disable-runtime-dependency-installation"], home, tmp_path / "superlink.log")  # fmt: skip
        _wait_log(tmp_path / "superlink.log", "Uvicorn running on https://", procs["link"])
        for i in (0, 1):  # the federation's two SuperNodes; node_2's key is never registered
            subprocess.run([f"{BIN}/flwr", "supernode", "register", str(certs / f"node_{i}.pub"), "tls"],
                           env=_env(home), check=True, timeout=60, capture_output=True)  # fmt: skip

        def supernode(key: int, client: int, name: str):
            log = tmp_path / f"{name}.log"
            return log, _spawn([f"{BIN}/flower-supernode", "--superlink", f"127.0.0.1:{port}",
                                "--root-certificates", str(certs / "ca.crt"),
                                "--auth-supernode-private-key", str(certs / f"node_{key}"),
                                "--node-config", f"client-id={client}", "--port", str(_port())], home, log)  # fmt: skip

        log_stranger, procs["stranger"] = supernode(2, 1, "stranger")
        procs["stranger"].wait(timeout=90)
        stranger = log_stranger.read_text()
        assert procs["stranger"].returncode != 0 and "Failed to activate SuperNode" in stranger, stranger[-2000:]
        logs = {}
        for i in (0, 1):
            logs[i], procs[i] = supernode(i, i, f"node{i}")
            _wait_log(logs[i], "SuperNode ID:", procs[i])
        run_log = tmp_path / "run.log"
        run_config = _run_config(overrides, tmp_path / "flower")
        procs["run"] = _spawn([f"{BIN}/flwr", "run", APP, "tls", "--stream", "--run-config", run_config], home, run_log)
        _wait_log(run_log, "server: end of round 1:", procs["run"], timeout=RUN_S)
        _stop(procs[1], signal.SIGKILL)  # a crash: no goodbye to the SuperLink; its ClientApp exits with it
        killed = time.perf_counter()
        # Flower lets the restarted SuperNode in once the SuperLink has marked the dead one offline (two missed
        # heartbeats, <= 60 s): until then it exits at once ("Failed to activate"), so it is restarted as a
        # service manager would, until it is in
        for attempt in range(40):
            logs[1], procs[1] = supernode(1, 1, f"node1_restart{attempt}")
            try:
                _wait_log(logs[1], "SuperNode ID:", procs[1], timeout=30)
                break
            except AssertionError:
                time.sleep(3)
        else:
            raise AssertionError("SuperNode 1 never rejoined")
        back_s = time.perf_counter() - killed
        procs["run"].wait(timeout=RUN_S)
        out = run_log.read_text()
        assert procs["run"].returncode == 0 and "jaxblock on Flower: done: " in out, out[-3000:]
        _finish(sim)
    finally:
        for p in procs.values():
            _stop(p)
        if sim.poll() is None:
            sim.kill()
    run = _run_dir(tmp_path / "flower")
    rounds = _assert_bitwise(os.path.join(run, "server"), str(tmp_path / "sim"))
    assert "its client stopped without a reply" in out or "Node Unavailable" in out, out[-3000:]
    assert "client 1 done" in out and "client 0 done" in out, out[-3000:]
    assert "left out 0" in out and "left out 1" not in out, out[-3000:]  # every update of every round merged
    report(f"flwr run on a SuperLink (TLS, node auth) + 2 SuperNodes, one killed after round 1 and back in "
           f"{back_s:.0f}s: final model bitwise the simulator's ({rounds} rounds); an unregistered key refused")  # fmt: skip


def test_a_flwr_datasets_partitioner_replaces_jaxblocks_partition(report):
    """Issue 31 item 4: data.partitioner=DirichletPartitioner partitions the bundled math data as
    flwr-datasets itself does (its own call, here, on the same labels), and partition.txt's table says so;
    a name that is not a partitioner, or arguments it does not take, are one-line errors."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    from jaxblock.run import config as config_lib
    from jaxblock.run import experiment, instruct, runtime

    config = config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"),
                                    ["data.partitioner=DirichletPartitioner", "num_clients=4", "data.alpha=0.5"])  # fmt: skip
    clients, table = experiment.client_data(config, runtime.model_config(config))
    labels = [e["label"] for e in instruct.load_examples("mathinstruct", config.data.path, seed=config.seed)]
    theirs = DirichletPartitioner(num_partitions=4, partition_by="label", alpha=0.5, seed=config.seed,
                                  min_partition_size=config.data.min_client_size)  # fmt: skip
    theirs.dataset = datasets.Dataset.from_dict({"label": labels, "index": list(range(len(labels)))})
    sizes = [theirs.load_partition(i).num_rows for i in range(4)]
    assert [len(c["tokens"]) for c in clients] == sizes and len(set(sizes)) > 1  # non-IID, as flwr-datasets drew it
    assert "(flwr-datasets DirichletPartitioner)" in table.splitlines()[0]
    assert [int(line.split()[-1]) for line in table.splitlines()[2:]] == sizes
    for extra, says in (
        (["data.partitioner=Nope"], "data.partitioner=Nope: not a flwr-datasets partitioner (one of: "),
        (
            ["data.partitioner=IidPartitioner", 'data.partitioner_args={"bogus": 1}'],
            "unexpected keyword argument 'bogus'",
        ),
    ):
        bad = config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"), extra)
        with pytest.raises(ValueError, match=None) as e:
            experiment.client_data(bad, runtime.model_config(bad))
        assert says in str(e.value) and "\n" not in str(e.value)
    report(f"data.partitioner=DirichletPartitioner: client sizes {sizes}, those of flwr-datasets' own draw")


def test_run_config_and_node_config_mistakes_are_one_line_errors(tmp_path):
    """What `flwr run --run-config` and `--node-config` can get wrong is said in one line, naming the key."""
    from jaxblock.flower import settings

    tiny = os.path.join(ROOT, "configs", "tiny.py")
    run = settings.from_run_config({"config-file": tiny, "overrides": "rounds=3 --config.seed=2", "config.lr_decay": "cosine",
                                    "workdir": str(tmp_path), "store": ""})  # fmt: skip
    assert run.overrides == ("rounds=3", "seed=2", "lr_decay=cosine")
    assert run.store_url == f"file://{tmp_path}/store"
    config = settings.load(run, ("num_clients=4",))
    assert (config.rounds, config.seed, config.lr_decay, config.num_clients) == (3, 2, "cosine", 4)
    assert settings.from_record(run.record()) == settings.FlowerRun(tiny, run.overrides, str(tmp_path), run.store_url)
    cases = [
        (lambda: settings.from_run_config({"config-file": tiny, "rounds": 3}), "run-config rounds: unknown (keys: "),
        (lambda: settings.from_run_config({"config-file": ""}), "run-config config-file is empty"),
        (
            lambda: settings.from_run_config({"config-file": tiny, "overrides": "rounds"}),
            "run-config overrides rounds: ",
        ),
        (lambda: settings.load(settings.FlowerRun(tiny, ("roundz=3",))), "unknown config key"),
        (lambda: settings.load(settings.FlowerRun(str(tmp_path / "no.py"))), "no such file"),
        (lambda: settings.client_id({}, 2), "start it with --node-config 'client-id=<i>'"),
        (lambda: settings.client_id({"client-id": 2}, 2), "node-config client-id=2: the run has clients 0..1"),
        (lambda: settings.client_id({"partition-id": "0"}, 2), "node-config partition-id='0'"),
    ]
    for call, says in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert settings.client_id({"partition-id": 1, "num-partitions": 2}, 2) == 1
    assert settings.client_workdir(run, {"workdir": "/w"}) == "/w"
    assert settings.client_workdir(run, {}) == os.path.join(str(tmp_path), "clients")
