"""Benchmarks LocalBlockTraining per block against full fine-tuning.

By default on an 8-layer variant of the tiny model with 1-layer blocks, for every block and for
full fine-tuning: ms per step (median over repeated K-step calls, interleaved across cases),
tokens/s, XLA flops per step (`cost_analysis`), XLA temp memory per step (`memory_analysis`),
optimizer-state bytes, and the process's peak RSS (process-wide: mostly the XLA runtime here). The
step is compiled with the config's memory levers (`config.memory`), as `scripts/plan.py` compiles it.

    python scripts/bench_local.py --json
    python scripts/bench_local.py --config configs/tiny.py --layers 8 --batch-size 4 --seq-len 128 --repeats 10

With --json the last line is
`{"full_ms": ..., "blocks": [{"block": i, "first_layer": l, "ms": ..., "flops": ...}, ...], ...}`.
"""

import argparse
import json
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import tqdm

from jaxblock import model
from jaxblock.fed import blocks, local
from jaxblock.run import runtime
from jaxblock.run.config import model_config


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_interleaved(cases, batches, repeats: int) -> list[float]:
    """Median seconds per local step of each (train, block, frozen) case.

    Every case is compiled and warmed up first; then each repeat times one K-step call of every
    case in turn, so that drift in machine load (shared CPUs) hits all cases alike and the
    ratios between them stay honest.
    """
    for train, block, frozen in cases:
        jax.block_until_ready(train(block, frozen, batches))  # compile + warm-up
    k = jax.tree.leaves(batches)[0].shape[0]
    times: list[list[float]] = [[] for _ in cases]
    for _ in tqdm.trange(repeats, desc="timing (interleaved)", leave=False):
        for i, (train, block, frozen) in enumerate(cases):
            start = time.perf_counter()
            jax.block_until_ready(train(block, frozen, batches))
            times[i].append((time.perf_counter() - start) / k)
    return [statistics.median(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="override model.num_layers (0 = keep the config's)")
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--local-steps", type=int, default=4, help="K steps per timed call")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per block (the median is reported)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    argv = sys.argv[1:]
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", "configs/tiny.py", *argv]
    config, args = runtime.parse_args(parser, argv)
    if args.layers:
        config.model.num_layers = args.layers
    config.blocks.layers_per_block = args.layers_per_block
    if args.repeats < 10:
        parser.error(f"--repeats={args.repeats}: use at least 10 for a stable median")

    cfg = model_config(config)
    params = runtime.init_params(cfg, jax.random.key(config.seed))
    part = runtime.make_partition(config, cfg)
    loss_fn = local.lm_loss(cfg, None, config.memory.loss_chunk)
    optimizer = local.make_optimizer(runtime.optimizer_config(config), args.local_steps)
    k, b, t = args.local_steps, args.batch_size, args.seq_len
    tokens = jax.random.randint(jax.random.key(1), (k, b, t), 0, cfg.vocab_size)
    batches = {"tokens": tokens, "loss_mask": jnp.ones((k, b, t), jnp.float32)}
    one_batch = jax.tree.map(lambda x: x[0], batches)
    tokens_per_step = b * t
    print(
        f"model: {cfg.num_layers} layers, d={cfg.hidden_size}, {model.count_params(params) / 1e6:.2f}M params; "
        f"{part.num_blocks} blocks; batch {b} x {t} tokens; K={k}; {args.repeats} timed calls each; "
        f"devices: {jax.devices()[0].platform} x{jax.device_count()}"
    )

    names, cases, costs = [], [], []
    for name, part_, b_ in [("full FT", blocks.full_partition(params), 0)] + [
        (f"block {blk.id} ({blk.name})", part, blk.id) for blk in part.blocks
    ]:
        block, frozen = part_.split(params, b_)
        names.append(name)
        cases.append((local.make_local_train(loss_fn, optimizer), block, frozen))
        costs.append(local.step_cost(loss_fn, optimizer, block, frozen, one_batch, donate=config.memory.donate))
    seconds = measure_interleaved(cases, batches, args.repeats)
    rss = peak_rss_mb()

    table = []
    for name, sec, cost in zip(names, seconds, costs, strict=True):
        row = {
            "ms": sec * 1e3,
            "tokens_per_s": tokens_per_step / sec,
            "flops": cost["flops"],
            "temp_mb": cost["temp_bytes"] / 2**20,
            "temp_bytes": cost["temp_bytes"],
            "peak_bytes": cost["peak_bytes"],
            "opt_state_mb": cost["opt_state_bytes"] / 2**20,
        }
        table.append(row)
        print(
            f"{name:<16} {row['ms']:9.1f} ms/step {row['tokens_per_s']:10.0f} tok/s "
            f"{row['flops'] / 1e9:8.2f} GFLOP/step {row['temp_mb']:6.1f} MB XLA temp "
            f"{row['opt_state_mb']:6.1f} MB opt state"
        )
    print(f"peak RSS of the process (all cases, XLA runtime included): {rss:.0f} MB")
    full = table[0]
    rows = [
        {"block": blk.id, "first_layer": blk.layers[0] if blk.layers else None, **row}
        for blk, row in zip(part.blocks, table[1:], strict=True)
    ]

    first, last = rows[0], rows[-1]
    falling = all(a["flops"] > c["flops"] for a, c in zip(rows, rows[1:], strict=False))
    print(
        f"first block / full: {first['ms'] / full['ms']:.2f}x time, {first['flops'] / full['flops']:.2f}x flops; "
        f"last block / full: {last['ms'] / full['ms']:.2f}x time, {last['flops'] / full['flops']:.2f}x flops; "
        f"flops fall with depth: {falling}"
    )
    if args.json:
        summary = {
            "full_ms": full["ms"],
            "full_flops": full["flops"],
            "full_opt_state_mb": full["opt_state_mb"],
            "blocks": [
                {
                    k_: r[k_]
                    for k_ in (
                        "block",
                        "first_layer",
                        "ms",
                        "flops",
                        "tokens_per_s",
                        "temp_mb",
                        "opt_state_mb",
                        "temp_bytes",
                        "peak_bytes",
                    )
                }  # fmt: skip
                for r in rows
            ],
            "first_over_full": first["ms"] / full["ms"],
            "last_over_full": last["ms"] / full["ms"],
            "flops_fall_with_depth": falling,
            "peak_rss_mb": rss,
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
