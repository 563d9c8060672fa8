"""Plans a run from abstract shapes: per-device memory and FLOPs of every local step, and the whole run's time.

    python scripts/plan.py --config configs/llama3_2_3b.py
    python scripts/plan.py --config configs/llama3_2_3b.py --devices 8 --config.mesh.fsdp=4 --config.mesh.tensor=2
    python scripts/plan.py --config configs/llama3_8b.py --accelerator h100 --bandwidth 100MBps --levers some

No weight is read and nothing is allocated: each distinct local step is compiled ahead of time for
the config's mesh (`--devices N` makes N fake CPU devices; without it, the machine's own devices, so
on a GPU box the figures are the GPU compiler's). It prints, per algorithm and block, XLA's
per-device argument / temp / peak bytes and FLOPs per step, the delta bytes on the wire, whether it
fits the accelerator (and, if not, which lever in `config.memory` would make it fit); then each
algorithm's projected wall time for the config's run (jaxblock/plan.py says how); `--steps-from
plan.json` re-projects a saved plan (other K, links, wire dtype, accelerator, MFU) without compiling. `--levers`
compiles steps under each memory lever (some: the first and last layer blocks and full FT; all:
every step). Writes plan.json and plan.png (the paper's Figure 2 at 50/100/150 MB/s) to --out.
"""

import os
import sys


def _early_devices(argv: list[str]) -> int:
    """--devices, read before JAX is imported (fake CPU devices must be asked for first)."""
    for i, a in enumerate(argv):
        if a == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1]) if argv[i + 1].isdigit() else 0
        if a.startswith("--devices="):
            return int(a.split("=", 1)[1]) if a.split("=", 1)[1].isdigit() else 0
    return 0


if _early_devices(sys.argv[1:]):
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_early_devices(sys.argv[1:])}"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import tqdm  # noqa: E402

from jaxblock import model  # noqa: E402
from jaxblock.run import plan, plots, runtime  # noqa: E402
from jaxblock.run.config import model_config  # noqa: E402

NAMES = {"parablock": "ParaBlock", "fedbcd": "FedBCD", "fedcybgd": "FedCyBGD", "fedavg_full": "Fed full FT",
         "fedit": "FedIT", "ffa_lora": "FFA-LoRA", "flora": "FLoRA"}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=0, help="fake CPU devices (0: the machine's own)")
    parser.add_argument("--accelerator", default="a100", help=f"one of {', '.join(plan.ACCELERATORS)}")
    parser.add_argument("--memory-gb", type=float, default=0.0, help="memory in place of the table's")
    parser.add_argument("--mfu", type=float, default=plan.DEFAULT_MFU, help="model FLOPs utilisation assumed")
    parser.add_argument("--bandwidth", default="100MBps", help="each client's link, e.g. 100MBps, 1Gbps")
    parser.add_argument("--algorithms", default=",".join(plan.ALGORITHMS), help="comma-separated algorithms to plan")
    parser.add_argument(
        "--levers", choices=("none", "some", "all"), default="none", help="memory levers to compile and compare"
    )
    parser.add_argument("--steps-from", default=None, help="a plan.json whose compiled steps to reuse (no compiling)")
    parser.add_argument("--out", default=None, help="default: runs/plan/<config>-<devices>")
    config, args = runtime.parse_args(parser)
    if args.accelerator not in plan.ACCELERATORS:
        parser.error(f"--accelerator {args.accelerator}: choose one of {', '.join(plan.ACCELERATORS)}")
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu {args.mfu}: must be in (0, 1]")
    algorithms = [a for a in args.algorithms.split(",") if a]
    unknown = [a for a in algorithms if a not in NAMES]
    if unknown:
        parser.error(f"--algorithms: unknown {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    try:
        bandwidth = plan.parse_bandwidth(args.bandwidth)
        layout = runtime.make_layout(config)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    acc = plan.ACCELERATORS[args.accelerator]
    if args.memory_gb:
        acc = plan.Accelerator(acc.name, acc.peak_tflops, args.memory_gb)
    name = os.path.splitext(os.path.basename(runtime.config_path()))[0]
    out = args.out or os.path.join("runs", "plan", f"{name}-{jax.device_count()}dev")
    try:
        runtime.check_dir_arg(out, "--out")
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    os.makedirs(out, exist_ok=True)
    cfg = model_config(config)
    n_params = model.count_params(jax.eval_shape(lambda: model.init(cfg, jax.random.key(0))))
    mesh = dict(layout.mesh.shape)
    print(
        f"plan: {runtime.config_path()}, {n_params / 1e9:.2f}B params, mesh {mesh} on {jax.device_count()} "
        f"{jax.devices()[0].platform} devices; batch {config.batch_size} x {config.seq_len}, K={config.local_steps}, "
        f"{config.num_clients} clients, {config.rounds} rounds; memory levers {config.memory.to_dict()}"
        + (
            f"; shapes from config.model (hf_checkpoint {config.hf_checkpoint} is not read)"
            if config.hf_checkpoint
            else ""
        )  # fmt: skip
    )

    cache: dict = {}
    bar = tqdm.tqdm(desc="compiling steps", unit="step", disable=bool(args.steps_from))

    def progress(label):
        bar.set_postfix_str(label)
        bar.update()

    start = time.perf_counter()
    try:
        if args.steps_from:
            rows = plan.saved_steps(args.steps_from, config, algorithms, jax.device_count())
        else:
            rows = plan.step_rows(config, algorithms, layout, cache, progress)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    compile_s = time.perf_counter() - start
    bar.close()
    wire = 2 if config.wire_dtype == "bfloat16" else 4
    if args.steps_from:
        print(f"steps from {args.steps_from} (nothing compiled)")
    else:
        print(f"compiled {len(cache)} distinct steps in {compile_s:.0f} s on this machine "
              f"(XLA's compile time alone: {sum(c['compile_s'] for c in cache.values()):.0f} s)")  # fmt: skip
    print(f"\nper device, one local step ({acc.name}: {acc.memory_gb:g} GB):")
    print(f"{'algorithm':<12} {'block':<14} {'GFLOP':>9} {'args GB':>8} {'temp GB':>8} {'peak GB':>8} "
          f"{'opt GB':>7} {'delta MB':>9}  fits")  # fmt: skip
    remedies = {}
    for a in algorithms:
        for i, r in enumerate(rows[a]):
            ok = plan.fits(r, acc)
            if not ok and (a, i) not in remedies:
                remedies[(a, i)] = plan.remedy(config, a, i, layout, cache, acc, config.memory.loss_chunk or 256)
            gb = {k: r[f"{k}_bytes"] / plan.GB for k in ("argument", "temp", "peak", "opt_state")}
            print(
                f"{NAMES[a]:<12} {r['block']:<14} {r['flops'] / 1e9:9.0f} {gb['argument']:8.2f} {gb['temp']:8.2f} "
                f"{gb['peak']:8.2f} {gb['opt_state']:7.2f} {r['block_params'] * wire / 1e6:9.1f}  "
                f"{'yes' if ok else 'NO: ' + remedies[(a, i)]}"
            )

    projections = {}
    for bw in sorted({50.0, 100.0, 150.0, bandwidth}):
        for a in algorithms:
            projections[f"{a}/{bw:g}"] = plan.project(config, a, rows[a], acc, args.mfu, bw)
    print(f"\nprojected run ({acc.name}, {acc.peak_tflops:g} TFLOP/s peak, MFU {args.mfu} assumed; "
          f"{bandwidth:g} MB/s links):")  # fmt: skip
    print(f"{'algorithm':<12} {'compute min':>12} {'exposed comm min':>17} {'wall min':>9}")
    for a in algorithms:
        p = projections[f"{a}/{bandwidth:g}"]
        print(f"{NAMES[a]:<12} {p['compute_s'] / 60:12.1f} {p['exposed_s'] / 60:17.1f} {p['wall_min']:9.1f}")
    if "parablock" in algorithms and "fedbcd" in algorithms:
        pb, bcd = (projections[f"{a}/{bandwidth:g}"]["wall_s"] for a in ("parablock", "fedbcd"))
        print(f"ParaBlock / FedBCD wall time: {pb / bcd:.2f}")

    levers = {}
    if args.levers != "none":
        layer_algo = next((a for a in algorithms if a in ("parablock", "fedbcd", "fedcybgd")), None)
        chunk = config.memory.loss_chunk or plan.LEVER_CHUNK
        for a in [x for x in (layer_algo, "fedavg_full" if "fedavg_full" in algorithms else None) if x]:
            n = len(rows[a])
            chosen = None if args.levers == "all" or a == "fedavg_full" else sorted({0, n - 1})
            levers[a] = plan.lever_rows(config, a, layout, cache, chunk, chosen, progress=lambda b: None)
        print("\nmemory levers, per-device peak GB (argument + output - aliased + temp) and GFLOP per step:")
        for a, variants in levers.items():
            for i, base in enumerate(variants["none"]):
                cells = "  ".join(f"{v}: {rs[i]['peak_bytes'] / plan.GB:.2f} GB {rs[i]['flops'] / 1e9:.0f} GF"
                                  for v, rs in variants.items())  # fmt: skip
                print(f"{NAMES[a]:<12} {base['block']:<14} {cells}")

    report = {
        "config": runtime.config_path(), "overrides": sys.argv[1:], "settings": config.to_dict(), "mesh": mesh,
        "params": n_params,
        "devices": jax.device_count(), "platform": jax.devices()[0].platform, "accelerator": acc.__dict__,
        "mfu": args.mfu, "bandwidth_mbps": bandwidth, "compile_s": compile_s, "steps": rows,
        "projections": projections, "levers": levers,
        "remedies": {f"{a}/{rows[a][i]['block']}": text for (a, i), text in remedies.items()},
    }  # fmt: skip
    with open(os.path.join(out, "plan.json"), "w") as f:
        json.dump(report, f, indent=1)
    panels = {
        f"{bw:g} MB/s": [{"label": NAMES[a], "compute_s": projections[f"{a}/{bw:g}"]["compute_s"],
                          "exposed_s": projections[f"{a}/{bw:g}"]["exposed_s"]} for a in algorithms]
        for bw in (50.0, 100.0, 150.0)
    }  # fmt: skip
    plots.figure2(
        panels, os.path.join(out, "plan.png"), f"{name}: projected wall time on {acc.name} (MFU {args.mfu})", columns=1
    )
    print(f"\nwrote {os.path.join(out, 'plan.json')} and plan.png")


if __name__ == "__main__":
    main()
