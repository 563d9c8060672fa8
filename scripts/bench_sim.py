"""The simulator's speed: client-steps per second with clients trained one by one and batched.

Runs the config's first `--rounds` rounds from the same start, once per mode and `--repeats` times,
interleaved (one-by-one, batched, one-by-one, ...), each mode with its own trainer, so the first
repeat compiles (or loads from the persistent cache) every executable the rounds need and later
repeats reuse them. Reports client-steps per second (participants x K x rounds / seconds) for the
first repeat (with compilation) and the median of the later ones (steady state), their ratio, and
how far the final models of the two modes are apart.

    python scripts/bench_sim.py --config configs/tiny.py --rounds 10 --repeats 3 [--json]
"""

import argparse
import json
import statistics
import time

import jax
import numpy as np

from jaxblock.fed import local, loop
from jaxblock.run import experiment, runtime


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a = jax.numpy.ones((n, n), jax.numpy.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the rounds per mode (the first compiles)")
    parser.add_argument("--batch", type=int, default=0, help="clients per batch (0: every participant)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    config, args = runtime.parse_args(parser)
    if args.repeats < 2:
        parser.error(f"--repeats={args.repeats}: need 2 or more (the first one compiles)")
    config.rounds = args.rounds
    run = experiment.setup(config)
    batch = args.batch or run.fed.clients_per_round
    modes = {"one by one": 1, f"batched ({batch})": batch}
    base = vars(run.trainer())
    trainers = {name: loop.Trainer(**{**base, "client_batch": size}) for name, size in modes.items()}
    seconds = {name: [] for name in modes}
    finals, steps, blocks = {}, 0, []
    for repeat in range(args.repeats):
        for name, trainer in trainers.items():
            state, steps = trainer.init_state(run.params), 0
            start = time.perf_counter()
            while state["round"] < args.rounds:
                state, metrics = loop.run_round(trainer, state)
                steps += len(metrics["clients"]) * run.fed.local_steps
                blocks += [metrics["block"]] * len(metrics["clients"]) if repeat == 0 and name == "one by one" else []
            jax.block_until_ready(state["params"])
            seconds[name].append(time.perf_counter() - start)
            finals[name] = state["params"]
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {seconds[name][-1]:.2f} s, "
                  f"{steps / seconds[name][-1]:.1f} client-steps/s", flush=True)  # fmt: skip
    summary = {"rounds": args.rounds, "client_steps": steps, "clients_per_round": run.fed.clients_per_round}
    for name in modes:
        key = "batched" if name != "one by one" else "one_by_one"
        summary[f"{key}_first_steps_per_s"] = steps / seconds[name][0]
        summary[f"{key}_steps_per_s"] = steps / statistics.median(seconds[name][1:])
    pairs = zip(*(jax.tree.leaves(finals[name]) for name in modes), strict=True)
    gap = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)
    summary["max_abs_diff"] = gap
    # How close each mode runs to the machine: XLA's flops of the steps the rounds ran, against a
    # large matmul's rate (what the CPU's matmul kernels reach at best).
    batch1 = jax.tree.map(lambda x: x[0], run.batches_fn(0, 0, 1)[0])
    flops = {b: local.step_cost(run.loss_fn, run.optimizer, *run.partition.split(run.params, b), batch1)["flops"]
             for b in set(blocks)}  # fmt: skip
    summary["gflop_per_client_step"] = float(np.mean([flops[b] for b in blocks])) / 1e9
    summary["matmul_peak_gflop_s"] = matmul_gflops()
    for key in ("first_steps_per_s", "steps_per_s"):
        one, many = summary[f"one_by_one_{key}"], summary[f"batched_{key}"]
        label = "first repeat (compiles)" if key.startswith("first") else "steady state (median)"
        print(f"{label:<24} one by one {one:7.1f}, batched {many:7.1f} client-steps/s: {many / one:.2f}x")
    rate = lambda steps_per_s: steps_per_s * summary["gflop_per_client_step"]  # noqa: E731
    print(f"XLA flops: {summary['gflop_per_client_step']:.2f} GFLOP per client-step; steady state one by one "
          f"{rate(summary['one_by_one_steps_per_s']):.0f}, batched {rate(summary['batched_steps_per_s']):.0f} GFLOP/s; "
          f"a 2048^3 float32 matmul on this machine: {summary['matmul_peak_gflop_s']:.0f} GFLOP/s")  # fmt: skip
    print(f"final models after {args.rounds} rounds differ by at most {gap:.2e} (float rounding, amplified by AdamW)")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
