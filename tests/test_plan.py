"""scripts/plan.py and the memory levers: abstract-shape plans equal what bench_local measures, and
remat / the chunked loss / donation keep the numbers and cut XLA's planned memory."""

import json
import os
import subprocess
import sys

import jax
import pytest
from test_train import ROOT, SMALL, small_config

from jaxblock import model
from jaxblock.fed import blocks, local
from jaxblock.run import compare, plan, runtime
from jaxblock.run.config import model_config

SHAPES = ["model.num_layers=3", "model.vocab_size=4096", "seq_len=64", "batch_size=2"]  # logits matter at this size


def _loss_and_grads(config, block_id=0):
    cfg = model_config(config)
    params = model.init(cfg, jax.random.key(0))
    part = runtime.layer_partition(config, cfg, params)
    block, frozen = part.split(params, block_id)
    k1, k2 = jax.random.split(jax.random.key(1))
    batch = {"tokens": jax.random.randint(k1, (2, 64), 0, cfg.vocab_size),
             "loss_mask": (jax.random.uniform(k2, (2, 64)) > 0.3).astype("float32")}  # fmt: skip
    loss_fn = local.lm_loss(cfg, None, config.memory.loss_chunk)
    return jax.value_and_grad(lambda b: loss_fn(blocks.merge(b, frozen), batch))(block)


@pytest.mark.parametrize("lever", [["memory.remat=True"], ["memory.loss_chunk=20"], ["memory.remat=True",
                                   "memory.loss_chunk=16"]])  # fmt: skip
def test_remat_and_chunked_loss_keep_loss_and_gradients(lever, report):
    """20 does not divide the 63 predicting positions: the padded last chunk counts nothing."""
    loss, grads = _loss_and_grads(small_config(*SHAPES))
    loss2, grads2 = _loss_and_grads(small_config(*SHAPES, *lever))
    err = max(float(abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True))
    report(f"memory lever {' '.join(lever)}: |loss diff| {abs(float(loss - loss2)):.1e}, max |grad diff| {err:.1e}")
    assert abs(float(loss - loss2)) <= 1e-5 and err <= 1e-5


def test_each_lever_cuts_xlas_planned_memory():
    costs = {}
    for name, memory in plan.lever_variants(16).items():
        config = plan.with_memory(small_config(*SHAPES), memory)
        costs[name] = compare.block_costs(config, "parablock", only=[0])[2][0]  # block 0: backward through all
    none = costs["none"]
    assert costs["remat"]["temp_bytes"] < none["temp_bytes"]
    assert costs["loss_chunk=16"]["temp_bytes"] < 0.8 * none["temp_bytes"]  # [B,T,V] float32 logits never formed
    assert costs["donate"]["alias_bytes"] > 0 and costs["donate"]["peak_bytes"] < none["peak_bytes"]
    assert costs["all"]["peak_bytes"] < min(c["peak_bytes"] for n, c in costs.items() if n != "all")
    assert costs["remat"]["flops"] > none["flops"]  # recomputation is not free, and XLA counts it

    # A step that does not fit is told which lever makes it fit, and that none does below that.
    between = plan.Accelerator("test", 100.0, (costs["all"]["peak_bytes"] + none["peak_bytes"]) / 2 / plan.GB)
    config = plan.with_memory(small_config(*SHAPES), plan.lever_variants(16)["none"])
    text = plan.remedy(config, "parablock", 0, None, {}, between, 16)
    assert text.startswith("fits with ") and "--config.memory." in text
    tiny = plan.Accelerator("test", 100.0, costs["all"]["peak_bytes"] / 2 / plan.GB)
    assert plan.remedy(config, "parablock", 0, None, {}, tiny, 16).startswith("no lever makes it fit")


def test_sharded_plan_is_per_device():
    """FSDP over 8 devices: each holds an eighth of the weights and does an eighth of the work."""
    config = small_config("mesh.data=1", "mesh.fsdp=-1", "model.num_layers=1")
    one = compare.block_costs(config, "fedavg_full", runtime.make_layout(config, jax.devices()[:1]))[2][0]
    eight = compare.block_costs(config, "fedavg_full", runtime.make_layout(config))[2][0]
    assert jax.device_count() == 8 and eight["argument_bytes"] < one["argument_bytes"] / 4
    assert eight["flops"] < one["flops"] / 4


def _run(args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_plan_equals_bench_local_on_the_same_steps(tmp_path):
    """plan.py (abstract shapes, the config's 1-device mesh) and bench_local.py (real arrays, no mesh)
    compile the same local steps: the same FLOPs and XLA bytes, block by block and for full FT."""
    flags = [f"--config.{o}" for o in SMALL if not o.startswith(("seq_len", "batch_size"))]
    out = _run([os.path.join(ROOT, "scripts", "plan.py"), "--config", "configs/tiny.py", *flags, "--config.seq_len=64",
                "--config.batch_size=4", "--algorithms", "parablock,fedbcd,fedavg_full", "--out", str(tmp_path)])  # fmt: skip
    assert "ParaBlock / FedBCD wall time:" in out and "compiled 3 distinct steps" in out  # 2 blocks + full, once
    planned = json.loads((tmp_path / "plan.json").read_text())
    bench = json.loads(_run([os.path.join(ROOT, "scripts", "bench_local.py"), "--config", "configs/tiny.py", *flags,
                             "--layers", "0", "--seq-len", "64", "--batch-size", "4", "--local-steps", "2", "--json"]
                            ).strip().splitlines()[-1])  # fmt: skip
    steps = planned["steps"]["parablock"]
    assert len(steps) == len(bench["blocks"]) == 2
    for p, b in zip(steps, bench["blocks"], strict=True):
        assert (p["flops"], p["temp_bytes"], p["peak_bytes"]) == (b["flops"], b["temp_bytes"], b["peak_bytes"])
    assert planned["steps"]["fedavg_full"][0]["flops"] == bench["full_flops"]
    p = planned["projections"]["parablock/100"]
    assert p["wall_s"] == pytest.approx(p["compute_s"] + p["exposed_s"]) and p["compute_s"] > 0
    assert (tmp_path / "plan.png").exists()

    # A saved plan re-projected with 5x the local steps: nothing compiles, compute scales by 5.
    again = [os.path.join(ROOT, "scripts", "plan.py"), "--config", "configs/tiny.py", *flags, "--config.seq_len=64",
             "--config.batch_size=4", "--algorithms", "parablock,fedbcd", "--steps-from", str(tmp_path / "plan.json")]  # fmt: skip
    out = _run([*again, "--config.local_steps=10", "--out", str(tmp_path / "k10")])
    assert "nothing compiled" in out
    k10 = json.loads((tmp_path / "k10" / "plan.json").read_text())["projections"]["parablock/100"]
    assert k10["compute_s"] == pytest.approx(5 * p["compute_s"])  # SMALL has local_steps=2
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run([sys.executable, *again, "--config.seq_len=32", "--out", str(tmp_path / "bad")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: --steps-from {tmp_path / 'plan.json'}: settings that change a step differ: seq_len"
    ]
