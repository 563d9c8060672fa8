"""A run planned from abstract shapes: what each local step costs per device, whether it fits an
accelerator, and how long the whole run takes (`scripts/plan.py`).

Nothing is allocated and no weight is read: every distinct local step (each block of the layer
algorithms, full fine-tuning, the LoRA methods' adapters) is lowered and compiled ahead of time for
the run's mesh (`compare.block_costs` -> `local.step_cost`), and XLA's own figures are reported:
argument, output, aliased and temp bytes per device, and FLOPs per step per device. On this
machine the mesh is made of fake CPU devices, so the bytes are XLA's CPU plan (its fusion and
buffer reuse differ from the GPU compiler's; the arguments, outputs and optimizer state do not).

The projection: a step takes FLOPs / (accelerator peak x MFU) seconds (`ACCELERATORS`, the MFU an
assumption stated beside the numbers), a round K steps of the block it trains, and the run's
communication comes from the link model, through the same `compare.modeled_run` as the paper's
Figure 2 in `scripts/reproduce.py`.
"""

from __future__ import annotations

import dataclasses

from jaxblock.fed import algorithms
from jaxblock.run import compare

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    peak_tflops: float  # dense bf16 with float32 accumulation, the vendor's figure
    memory_gb: float


# Known accelerators (vendor datasheets, dense bf16). The paper's runs used A100s.
ACCELERATORS = {
    a.name: a
    for a in (
        Accelerator("a100", 312.0, 80.0),
        Accelerator("a100-40gb", 312.0, 40.0),
        Accelerator("h100", 989.0, 80.0),
        Accelerator("l4", 121.0, 24.0),
        Accelerator("a10g", 125.0, 24.0),
        Accelerator("rtx4090", 165.0, 24.0),
    )
}
DEFAULT_MFU = 0.4  # model FLOPs utilisation assumed for a local step (an assumption; --mfu overrides it)

# The algorithms a plan covers by default (FedBuff is simulator-only; its steps are Fed full FT's).
ALGORITHMS = ("parablock", "fedbcd", "fedcybgd", "fedavg_full", "fedit", "ffa_lora", "flora")

# Each lever alone, from all of them off, and all together: what `--levers` compiles.
LEVER_CHUNK = 256


def lever_variants(chunk: int) -> dict[str, dict]:
    off = {"remat": False, "loss_chunk": 0, "donate": False}
    return {
        "none": off,
        "remat": {**off, "remat": True},
        f"loss_chunk={chunk}": {**off, "loss_chunk": chunk},
        "donate": {**off, "donate": True},
        "all": {"remat": True, "loss_chunk": chunk, "donate": True},
    }


def parse_bandwidth(text: str) -> float:
    """MB/s from '100MBps' or '100' (megabytes), '1GBps', or '800Mbps' / '1Gbps' (bits)."""
    t = text.strip()
    for suffix, scale in (("GBps", 1000.0), ("MBps", 1.0), ("Gbps", 125.0), ("Mbps", 0.125)):
        if t.endswith(suffix):
            t, value_scale = t[: -len(suffix)], scale
            break
    else:
        value_scale = 1.0
    try:
        value = float(t) * value_scale
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"--bandwidth {text}: expected MB/s as e.g. 100MBps, 100, 1GBps or 800Mbps")
    return value


def for_algorithm(config, name: str):
    """The config as algorithm `name` runs it. Turns (FedCyBGD) give each client one block (the paper: "the
    model is partitioned into 10 blocks" for 10 clients): the fewest layers per block that leave at
    most num_clients blocks."""
    config = config.copy_and_resolve_references()
    config.algorithm = name
    if algorithms.REGISTRY[name].turns:
        layers = config.model.num_layers
        while -(-layers // config.blocks.layers_per_block) + config.blocks.head_block > config.num_clients:
            config.blocks.layers_per_block += 1
    return config


def step_rows(config, algorithms, layout, cache: dict, progress=None) -> dict[str, list[dict]]:
    """{algorithm: [one row per block: label, flops, bytes]}, steps shared across algorithms compiled once."""
    out = {}
    for name in algorithms:
        _, part, costs = compare.block_costs(for_algorithm(config, name), name, layout, cache, progress)
        out[name] = [{"block": b.name, **c} for b, c in zip(part.blocks, costs, strict=True)]
    return out


def project(config, name: str, rows: list[dict], accelerator: Accelerator, mfu: float, bandwidth: float) -> dict:
    """A whole run of `name`: compute per round from its blocks' FLOPs, communication from the link."""
    step_s = [r["flops"] / (accelerator.peak_tflops * 1e12 * mfu) for r in rows]
    run = compare.modeled_run(for_algorithm(config, name), name, bandwidth, [config.local_steps * s for s in step_s])
    return {**run, "wall_min": run["wall_s"] / 60, "step_s": step_s}


def fits(row: dict, accelerator: Accelerator) -> bool:
    return row["peak_bytes"] <= accelerator.memory_gb * GB


def with_memory(config, memory: dict):
    c = config.copy_and_resolve_references()
    c.memory.update(memory)
    return c


def lever_rows(config, name: str, layout, cache: dict, chunk: int, blocks: list[int] | None, progress=None):
    """{variant: [row of each chosen block]}: the steps of `name` under each lever variant."""
    out = {}
    for variant, memory in lever_variants(chunk).items():
        c = for_algorithm(with_memory(config, memory), name)
        _, part, costs = compare.block_costs(c, name, layout, cache, progress, blocks)
        chosen = range(part.num_blocks) if blocks is None else blocks
        out[variant] = [{"block": part.blocks[b].name, **costs[b]} for b in chosen]
    return out


def remedy(config, name: str, row_index: int, layout, cache: dict, accelerator: Accelerator, chunk: int) -> str:
    """Which lever (or combination) makes a step that does not fit fit, or what else to do."""
    for variant, memory in lever_variants(chunk).items():
        if variant == "none" or all(config.memory[k] == v for k, v in memory.items()):
            continue
        c = for_algorithm(with_memory(config, memory), name)
        _, _, costs = compare.block_costs(c, name, layout, cache, only=[row_index])
        if fits(costs[row_index], accelerator):
            keys = " ".join(f"--config.memory.{k}={v}" for k, v in memory.items() if config.memory[k] != v)
            return f"fits with {variant} ({costs[row_index]['peak_bytes'] / GB:.1f} GB): {keys}"
    return "no lever makes it fit: shard it over more devices (--config.mesh.fsdp) or use a larger accelerator"


# Settings that change a compiled step: a saved plan's steps serve another run only if these agree.
STEP_KEYS = ("model.", "blocks.", "lora.", "memory.", "mesh.", "rules", "batch_size", "seq_len", "optimizer.name")


def saved_steps(path: str, config, algorithms, devices: int) -> dict[str, list[dict]]:
    """The step rows of a saved plan.json, after checking that it compiled the same steps."""
    import json

    from jaxblock.run.paper import _flat

    with open(path) as f:
        saved = json.load(f)
    old, new = _flat(saved["settings"]), _flat(json.loads(json.dumps(config.to_dict(), default=str)))
    diff = [k for k in sorted(set(old) | set(new)) if k.startswith(STEP_KEYS) and old.get(k) != new.get(k)]
    if saved["devices"] != devices:
        diff.append(f"devices ({saved['devices']} there, {devices} here)")
    missing = [a for a in algorithms if a not in saved["steps"]]
    if diff or missing:
        why = f"settings that change a step differ: {', '.join(diff)}" if diff else f"no steps for {', '.join(missing)}"
        raise ValueError(f"--steps-from {path}: {why}")
    return {a: saved["steps"][a] for a in algorithms}
