"""Every round-based algorithm runs in the deployment: `scripts/server.py` + `scripts/client.py` as
separate OS processes over a file:// store give the one-process simulator's final model bit for bit.
(ParaBlock and FedBCD: tests/test_comm.py.) The deployment calls the algorithm's own hooks, so FLoRA's
per-client ranks and stacked download, FedCyBGD's turns and FedIT's adapters need nothing of their own."""

import json
import os
import subprocess
import time

import jax
import numpy as np
import pytest
from test_comm import _start
from test_train import final_params

CASES = {
    # FLoRA: a fresh adapter per round, ranks 2 and 4 (the uploads differ in shape), the stack sent down
    "flora": ["--config.algorithm=flora", "--config.lora.client_ranks=[2,4]", "--config.rounds=2"],
    # FedCyBGD: one client per round, in turn, each its own block (2 clients, 2 blocks)
    "fedcybgd": ["--config.algorithm=fedcybgd", "--config.rounds=4"],
    # FedIT: FedAvg of LoRA adapters carried by the server model
    "fedit": ["--config.algorithm=fedit", "--config.rounds=2"],
    # ParaBlock with client-level DP, central noise (issue 28): clipped uploads, the server's noise on
    # the sum drawn from its secret seed (the simulator is given the same one)
    "parablock_dp": [
        "--config.dp.level=client",
        "--config.dp.noise_multiplier=0.8",
        "--config.dp.clip_norm=0.05",
        "--config.dp.noise_seed=11",
        "--config.rounds=2",
    ],
    # The same with adaptive clipping: the server announces each round's clip norm C_t in its signed
    # plan, each client clips to it and uploads its bit (norm <= C_t) beside the update, the server
    # moves C by the noised count (round 0's count moves round 2's C: ParaBlock's one-round lag)
    "parablock_adaptive_dp": [
        "--config.dp.level=client",
        "--config.dp.noise_multiplier=0.8",
        "--config.dp.clip_norm=0.05",
        "--config.dp.noise_seed=11",
        "--config.dp.adaptive_quantile=0.5",
        "--config.dp.count_noise=1.0",
        "--config.rounds=3",
    ],
    # Record-level DP-SGD in each client process: its own sampling and noise from its seed (the
    # simulator is given the same one), the server's merge as without DP
    "fedbcd_record_dp": [
        "--config.algorithm=fedbcd",
        "--config.dp.level=record",
        "--config.dp.noise_multiplier=0.8",
        "--config.dp.clip_norm=0.5",
        "--config.dp.noise_seed=5",
        "--config.rounds=2",
    ],  # fmt: skip
    # Secure aggregation (issue 29) with distributed client-level DP: each client clips, adds its share
    # of the noise, quantizes and masks; keys, shares and answers go through the store; the server
    # unmasks only the sum (the rounding and noise secrets as the simulator's)
    "parablock_secagg_dp": [
        "--config.secagg.on=True",
        "--config.dp.level=client",
        "--config.dp.noise=distributed",
        "--config.dp.noise_multiplier=0.8",
        "--config.dp.clip_norm=0.05",
        "--config.dp.noise_seed=11",
        "--config.rounds=2",
    ],
}


@pytest.mark.parametrize("algorithm", sorted(CASES))
def test_server_and_client_processes_equal_the_simulator_bitwise(algorithm, tmp_path, report):
    common = [*CASES[algorithm], "--config.num_clients=2", "--config.comm.timeout_s=120"]
    store = f"file://{tmp_path}/store"
    procs = [_start("server.py", *common, "--store", store, "--workdir", str(tmp_path / "server"))]
    for i in range(2):
        procs.append(
            _start("client.py", *common, "--store", store, "--client-id", str(i), "--workdir", str(tmp_path / "c"))
        )
    procs.append(_start("train.py", *common, "--workdir", str(tmp_path / "sim"), "--no-progress"))
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-2000:]
        errs.append(err)
    # The deployment shows its progress as it runs: a line per round from the server and from each client.
    assert "server: end of round 0: merged " in errs[0]
    assert "client 0: round 0: block " in errs[1] and "client 1: round 1: block " in errs[2]
    (step_a, deployed), (step_b, simulated) = (
        final_params(str(tmp_path / "server")),
        final_params(str(tmp_path / "sim")),
    )
    assert step_a == step_b
    assert jax.tree.structure(deployed) == jax.tree.structure(simulated)
    for x, y in zip(jax.tree.leaves(deployed), jax.tree.leaves(simulated), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with open(tmp_path / "server" / "metrics.jsonl") as f:
        merges = [json.loads(line) for line in f]
    merged = {r: clients for row in merges for r, clients in row["merged"]}
    sim_rounds, sim_clips = {}, {}
    with open(tmp_path / "sim" / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            sim_rounds[row["round"]] = row["clients"]
            sim_clips[row["round"]] = row.get("clip_norm")
    assert merged == sim_rounds  # the same clients merged in every round (FedCyBGD: one, in turn)
    # the clip norm each round's plan announced (adaptive clipping; None without it), as the simulator's
    assert {row["round"]: row.get("clip_norm") for row in merges if row["round"] in sim_rounds} == sim_clips
    if "adaptive" in algorithm:
        assert sim_clips[0] == sim_clips[1] == 0.05 != sim_clips[2], sim_clips
    summaries = [json.load(open(tmp_path / d / "summary.json")) for d in ("server", "sim")]  # noqa: SIM115
    assert summaries[0].get("dp") == summaries[1].get("dp")  # the same budget spent (DP runs)
    if algorithm.endswith("_dp"):  # the server's rows say what the merged rounds have spent
        assert [m["epsilon"] for m in merges][-1] == summaries[0]["dp"]["epsilon"] > merges[0]["epsilon"] > 0
    assert ("dp" in summaries[0]) == algorithm.endswith("_dp")
    report(f"deployment {algorithm}: server + 2 client processes vs the simulator, final model bitwise equal "
           f"({len(jax.tree.leaves(deployed))} leaves, {step_a} rounds)")  # fmt: skip


def _wait_for(path, procs, timeout=120.0):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline, f"{path} never appeared"
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-1500:] for p in procs if p.poll() is not None]
        time.sleep(0.2)


def test_a_second_process_with_a_live_client_id_is_refused_at_once_and_the_run_goes_on(tmp_path):
    """Issue 27 items 1 and 2: a duplicate --client-id, in the same workdir (its lock) or another (the store's
    lease), is one line and exit 2 while client 0 waits for round 0; the run then completes; a client pointed at
    the finished store is told so at once, exit 2, and writes nothing (no workdir, no ready key)."""
    common = ["--config.num_clients=2", "--config.rounds=2", "--config.comm.timeout_s=120"]
    store, clients = f"file://{tmp_path}/store", str(tmp_path / "c")
    server = _start("server.py", *common, "--store", store, "--workdir", str(tmp_path / "server"))
    first = _start("client.py", *common, "--store", store, "--client-id", "0", "--workdir", clients)
    procs = [server, first]
    try:
        _wait_for(tmp_path / "store" / "lease" / "0", procs)  # client 0 holds its id; round 0 waits for client 1
        for workdir, says in (
            (clients, "is already running in this workdir"),
            (str(tmp_path / "other"), "is already running at "),
        ):
            dup = _start("client.py", *common, "--store", store, "--client-id", "0", "--workdir", workdir)
            _, err = dup.communicate(timeout=120)
            lines = [line for line in err.splitlines() if line.strip()]
            assert (
                dup.returncode == 2 and lines[-1].startswith("error: client 0: --client-id 0 ") and says in lines[-1]
            ), err[-1500:]
            assert "Traceback" not in err
        assert first.poll() is None  # the first goes on undisturbed
        procs.append(_start("client.py", *common, "--store", store, "--client-id", "1", "--workdir", clients))
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert final_params(str(tmp_path / "server"))[0] == 2
    late = tmp_path / "late"
    proc = _start("client.py", *common, "--store", store, "--client-id", "1", "--workdir", str(late))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == (
        f"error: client 1: --store {store} holds a finished run (server/done): start a new run on an empty store"
    )
    assert (
        not late.exists()
        and not (tmp_path / "store" / "ready" / "1").exists()
        and not (tmp_path / "store" / "lease" / "1").exists()
    )
    # The finished store holds server/done only (the server took its config away); the server rerun on it
    # is told so in one line and touches nothing.
    assert sorted(p.name for p in (tmp_path / "store" / "server").iterdir()) == ["done"]
    before = sorted((tmp_path / "server").rglob("*"))
    again = _start("server.py", *common, "--store", store, "--workdir", str(tmp_path / "server"))
    _, err = again.communicate(timeout=120)
    assert again.returncode == 2 and err.strip().splitlines()[-1] == (
        f"error: --store {store} holds a finished run: use an empty store"
    ), err[-1500:]
    assert sorted((tmp_path / "server").rglob("*")) == before
