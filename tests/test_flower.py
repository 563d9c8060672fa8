"""Issue 31: `flwr run` of jaxblock's Flower App in Flower's simulation engine (Ray) gives the
simulator's final model bit for bit; the ServerApp's control plane (a fake Grid), its run-config,
the certificates and the flwr-datasets partitioner. The SuperLink + SuperNodes tests (TLS, node auth,
a killed SuperNode) are in tests/test_flower_deploy.py, which reuses the helpers here.

Every process is real and bounded in time; the SuperLink and SuperNodes are on loopback ports."""

import json
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

pytest.importorskip("flwr")  # the flower extra (Python >= 3.11); make test installs it

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


def _rounds_trained(workdir, client: int) -> int:
    """The rounds `client` has trained, from its run's timeline (a restarted client's rounds once)."""
    path = os.path.join(_run_dir(workdir), "clients", "timeline.jsonl")
    if not os.path.exists(path):
        return 0
    rows = [json.loads(line) for line in open(path)]  # noqa: SIM115
    return len({r["round"] for r in rows if r["client"] == client and isinstance(r["round"], int)})


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
    parts = [sorted(theirs.load_partition(i)["index"]) for i in range(4)]
    sizes = [len(p) for p in parts]
    assert len(set(sizes)) > 1  # non-IID
    examples = instruct.load_examples("mathinstruct", config.data.path, seed=config.seed)
    arrays = instruct.tokenize(experiment.load_tokenizer(config), examples, config.seq_len)
    for mine, idx in zip(clients, parts, strict=True):  # each client holds exactly flwr-datasets' examples
        np.testing.assert_array_equal(mine["tokens"], arrays["tokens"][np.asarray(idx)])
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
        with pytest.raises(ValueError) as e:
            experiment.client_data(bad, runtime.model_config(bad))
        assert says in str(e.value) and "\n" not in str(e.value)
    report(f"data.partitioner=DirichletPartitioner: client sizes {sizes}, those of flwr-datasets' own draw")


def test_run_config_and_node_config_mistakes_are_one_line_errors(tmp_path):
    """What `flwr run --run-config` and `--node-config` can get wrong is said in one line, naming the key."""
    from jaxblock.flower import settings

    tiny = os.path.join(ROOT, "configs", "tiny.py")
    run = settings.from_run_config({"config-file": tiny, "overrides": "rounds=3 --config.seed=2", "config.lr_decay": "cosine",
                                    "workdir": str(tmp_path), "store": ""})  # fmt: skip
    assert run.overrides == ("rounds=3", "seed=2", "lr_decay='cosine'")
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
    # TOML values keep their types as overrides: a bool, a float, a string that looks like a number
    typed = settings.from_run_config({"config-file": tiny, "config.comm.keep_rounds": True, "config.eta": 0.5,
                                      "config.tracking.run_name": "3"})  # fmt: skip
    loaded = settings.load(typed)
    assert (loaded.comm.keep_rounds, loaded.eta, loaded.tracking.run_name) == (True, 0.5, "3")
    with pytest.raises(ValueError, match="memory:// lives in one process"):
        settings.from_run_config({"config-file": tiny, "store": "memory://"})
    # each Flower run its own directory and store (a store holds one run); a spec is used as given
    mine = settings.for_run(settings.FlowerRun(tiny, (), "w", "s3://bucket/runs/"), 7)
    assert (mine.workdir, mine.store) == (os.path.join("w", "7"), "s3://bucket/runs/7")
    assert settings.for_run(settings.FlowerRun(tiny, (), "w", '{"driver": "s3"}'), 7).store == '{"driver": "s3"}'
    assert settings.for_run(settings.FlowerRun(tiny, (), "w"), 7).store_url == "file://" + os.path.abspath("w/7/store")
    assert settings.client_workdir(run, {"workdir": "/w"}) == "/w"
    assert settings.client_workdir(run, {}) == os.path.join(str(tmp_path), "clients")


class _FakeGrid:
    """Flower's Grid as the Dispatcher uses it: online node ids, pushed messages, replies pulled by id."""

    def __init__(self, nodes):
        self.nodes, self.sent, self.replies, self.down = set(nodes), [], {}, False

    def get_node_ids(self):
        if self.down:
            raise ConnectionError("SuperLink unreachable")
        return sorted(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            ids.append(f"m{len(self.sent)}")
            self.sent.append((ids[-1], m))
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]

    def to(self, node):
        return [mid for mid, m in self.sent if m.metadata.dst_node_id == node]

    def reply(self, mid, status=None, error_code=None, **record):
        from types import SimpleNamespace

        from jaxblock.flower import settings

        error = None if error_code is None else SimpleNamespace(code=error_code, reason=f"Error: code {error_code}")
        self.replies[mid] = SimpleNamespace(
            metadata=SimpleNamespace(reply_to_message_id=mid), has_error=lambda: error is not None, error=error,
            content={settings.RECORD: {"status": status, "seconds": 1.0, **record}},
        )  # fmt: skip


def test_the_dispatcher_resends_the_run_to_a_node_whose_client_died_and_to_no_one_else(monkeypatch, capsys):
    """The ServerApp's control plane without processes: a client whose lease stops beating is sent the run
    again (once its node is online); a finished or refused client is not; a lease that is another
    process's does not count; a Grid that fails is said once and retried; the store is left clean."""
    from flwr.common.constant import ErrorCode
    from flwr.supercore.task_identity import TaskIdentity

    from jaxblock.flower import server_app, settings
    from jaxblock.net import lease

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what Flower sets in a ServerApp's process
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(server_app, "STALE_S", 0.05)
    monkeypatch.setattr(server_app, "RETRY_S", (0.0, 0.0))
    grid = _FakeGrid({1, 2})
    run = settings.FlowerRun(os.path.join(ROOT, "configs", "tiny.py"), ("rounds=3",), "w", "memory://flower_test")
    d = server_app.Dispatcher(grid, run)
    d.step()
    assert [len(grid.to(n)) for n in (1, 2)] == [1, 1]
    _, first = grid.sent[0]
    assert first.metadata.ttl == server_app.MESSAGE_TTL_S  # lives as long as the run, not Flower's 12 h
    assert first.content[settings.RECORD]["store"] == "memory://flower_test"
    d.step()
    assert len(grid.sent) == 2  # unanswered messages are not sent again while their clients live
    # node 1's ClientApp runs client 0: a beating lease of its own process
    d.store.put_json(settings.node_key(1), {"client": 0, "pid": 11, "host": "h"})
    d.store.put_json(settings.node_key(2), {"client": 1, "pid": 12, "host": "h"})
    for beat in range(3):
        d.store.put_json(lease.lease_key(0), {"where": "h:/w", "pid": 11, "beat": beat})
        d.store.put_json(lease.lease_key(1), {"where": "h:/w", "pid": 12, "beat": beat})
        d.step()
        time.sleep(0.03)
    assert len(grid.sent) == 2
    # client 1 finishes: it says so before its lease goes; its slow reply is not a death
    d.store.put_json(settings.node_key(2), {"client": 1, "pid": 12, "host": "h", "finished": True})
    d.store.delete(lease.lease_key(1))
    # client 0 stops beating (killed); a lease of another process (a pid that repeats on another host) is not its own
    for beat in range(2):  # the step that sees the lease change, then one STALE_S later
        d.store.put_json(lease.lease_key(0), {"where": "other:/w", "pid": 11, "beat": 9 + beat})  # beating, not ours
        d.step()
        time.sleep(0.1)
    assert len(grid.to(1)) == 1  # judged dead in this step: sent again in the next
    d.step()
    assert len(grid.to(1)) == 2 and len(grid.to(2)) == 1  # node 1 sent the run again; node 2 not
    assert d.store.get_json(settings.node_key(1)) is None  # watched anew from its next ClientApp on
    grid.reply(grid.to(2)[0], "done", client=1)
    # node 1's new message: its node went offline; it is not sent while offline, and is once back
    grid.reply(grid.to(1)[1], error_code=ErrorCode.NODE_UNAVAILABLE)
    grid.nodes.discard(1)
    d.step()
    assert len(grid.to(1)) == 2 and 2 in d.done
    grid.nodes |= {1, 3}  # node 1 back; node 3 a spare SuperNode
    d.step()
    assert len(grid.to(1)) == 3 and len(grid.to(3)) == 1 and len(grid.to(2)) == 1
    grid.reply(grid.to(3)[0], "refused", reason="node-config client-id=5: the run has clients 0..1")
    grid.reply(grid.to(1)[2], "taken", reason="--client-id 0 is already running at h:/w (pid 11)")
    d.step()
    d.step()
    assert len(grid.to(3)) == 1 and len(grid.to(1)) == 4  # refused for good: never again; taken: asked again
    grid.down = True
    d.step()
    d.step()
    grid.down = False
    out = capsys.readouterr().err
    assert out.count("the control plane failed (ConnectionError: SuperLink unreachable)") == 1, out
    assert "its client stopped without a reply" in out and "client 1 done" in out and "refused: node-config" in out
    grid.reply(grid.to(1)[3], "done", client=0)
    d.finish(grace_s=5.0)
    assert d.out == {} and d.store.keys("flower/") == []


def test_flower_certs_make_a_ca_signed_superlink_certificate_and_openssh_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from jaxblock.flower import certs

    made = certs.files(["localhost", "127.0.0.1"], 2)
    ca, cert = x509.load_pem_x509_certificate(made["ca.crt"]), x509.load_pem_x509_certificate(made["superlink.crt"])
    cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for i in (0, 1):  # what flower-supernode and `flwr supernode register` read: ECDSA on a NIST curve, OpenSSH
        private, public = load_ssh_private_key(made[f"node_{i}"], None), load_ssh_public_key(made[f"node_{i}.pub"])
        assert isinstance(private.curve, ec.SECP384R1) and private.public_key() == public
    certs.write(str(tmp_path / "c"), made)
    assert oct(os.stat(tmp_path / "c" / "ca.key").st_mode & 0o777) == "0o600"
    assert oct(os.stat(tmp_path / "c" / "ca.crt").st_mode & 0o777) == "0o644"
    before = (tmp_path / "c" / "ca.key").read_bytes()
    with pytest.raises(ValueError, match="already holds ca.crt, ca.key"):
        certs.write(str(tmp_path / "c"), certs.files(["localhost"], 0))
    assert (tmp_path / "c" / "ca.key").read_bytes() == before  # nothing overwritten
    with pytest.raises(ValueError, match="--hosts names no host"):
        certs.files([], 1)
