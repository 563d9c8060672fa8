"""Every round-based algorithm runs in the deployment: `scripts/server.py` + `scripts/client.py` as
separate OS processes over a file:// store give the one-process simulator's final model bit for bit.
(ParaBlock and FedBCD: tests/test_comm.py.) The deployment calls the algorithm's own hooks, so FLoRA's
per-client ranks and stacked download, FedCyBGD's turns and FedIT's adapters need nothing of their own."""

import json
import subprocess

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
    for p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-2000:]
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
    sim_rounds = {}
    with open(tmp_path / "sim" / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            sim_rounds[row["round"]] = row["clients"]
    assert merged == sim_rounds  # the same clients merged in every round (FedCyBGD: one, in turn)
    report(f"deployment {algorithm}: server + 2 client processes vs the simulator, final model bitwise equal "
           f"({len(jax.tree.leaves(deployed))} leaves, {step_a} rounds)")  # fmt: skip
