"""Issue 31: `flwr run` on a real SuperLink with SuperNodes (TLS, node authentication) gives the
simulator's final model bit for bit; an unregistered SuperNode is refused; a SuperNode killed mid-run
(kill -9, its ClientApp with it) and restarted rejoins, and the run completes with the same model.
(A file of its own, so that pytest-xdist runs it beside tests/test_flower.py's simulation runs.)"""

import os
import signal
import subprocess
import sys
import time

import pytest
from test_flower import (
    APP,
    BIN,
    ROOT,
    RUN_S,
    _assert_bitwise,
    _connection,
    _env,
    _finish,
    _port,
    _rounds_trained,
    _run_config,
    _run_dir,
    _simulator,
    _spawn,
    _stop,
    _wait_log,
)

pytest.importorskip("flwr")  # the flower extra (Python >= 3.11); make test installs it


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
    # a modelled latency paces the rounds (wall time only: the model is the same), so that client 1 is
    # still mid-run when it is killed
    overrides = "num_clients=2 rounds=3 comm.timeout_s=300 comm.latency_ms=400"
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
        trained = _rounds_trained(tmp_path / "flower", client=1)
        assert trained < 3, f"client 1 had trained every round ({trained}) before it was killed"
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
    # the ServerApp saw the client's lease stop (before the SuperLink's heartbeat verdict) and sent the run again
    assert "SuperNode" in out and "its client stopped without a reply" in out, out[-3000:]
    assert _rounds_trained(tmp_path / "flower", client=1) == 3  # the restarted client trained the rest
    left = [f for _, _, files in os.walk(os.path.join(run, "store", "flower")) for f in files]
    assert left == []  # the ClientApps' notes taken out of the store
    assert "client 1 done" in out and "client 0 done" in out, out[-3000:]
    assert "left out 0" in out and "left out 1" not in out, out[-3000:]  # every update of every round merged
    report(f"flwr run on a SuperLink (TLS, node auth) + 2 SuperNodes, one killed after round 1 and back in "
           f"{back_s:.0f}s: final model bitwise the simulator's ({rounds} rounds); an unregistered key refused")  # fmt: skip
