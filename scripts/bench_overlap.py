"""Measures how much communication ParaBlock hides behind computation, in real wall-clock time.

A server thread and a client thread exchange block deltas through a memory:// TensorStore, with
the link model set so that one round's communication (upload + download of the block) takes
about 0.5x, 1x and 2x the round's computation. For each setting, FedBCD and ParaBlock run the
same rounds, alternating (--repeats runs each); seconds per round is the median over all rounds
but each run's first (which has no exchange to hide).

    python scripts/bench_overlap.py --json
    python scripts/bench_overlap.py --config configs/tiny.py --rounds 8 --ratios 0.5,1,2 --plot runs/bench_overlap.png

overlap efficiency = (T_fedbcd - T_parablock) / min(T_comp, T_comm): 1.0 when ParaBlock hides all
of the shorter of the two. A perfect overlap makes a round last max(compute, exchange) of that
round, and when both vary from round to round the median of that max is above the max of the two
medians (most at comm/comp 1, where they are equal): `ideal_s` is the median over FedBCD's rounds
of max(compute_s, comm_s), the same round's pair, and `parablock_over_ideal` ParaBlock against it.

--device-core emulates the box ParaBlock is built for, an accelerator beside a host CPU: the
client's XLA computation is pinned to core 0 (the "device"), its host threads (dispatch, the
exchange) to the other cores, and the server runs in a process of its own on those cores (its
store file:// under /dev/shm), as deployed. Without it, everything shares every core, as on a
CPU-only box, and the server is a thread of this process. With --json the last line is
`{"settings": [{"comm_over_comp": r, "comp_s", "comm_s", "fedbcd_s", "parablock_s", "overlap_efficiency",
"parablock_over_max", "ideal_s", "parablock_over_ideal"}, ...]}`.
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time

import jax
import numpy as np

from jaxblock.fed import algorithms, wire
from jaxblock.net import comm, signing, transport
from jaxblock.run import experiment, plots, runtime


def run(setup, train, fed, link, rounds, argv, host):
    """Per-round timeline rows of one client, round 0 left out; the server in a thread beside it, or
    (`host`: the host's cores) in a process of its own on them."""
    rows, fed = [], dataclasses.replace(fed, rounds=rounds)
    cc = comm.CommConfig(timeout_s=600)
    if not host:
        comm.run_in_threads(
            fed, setup.params, setup.partition, train, setup.batches_fn, transport.Store("memory://"), cc, [link],
            on_round=rows.append,
        )  # fmt: skip
    else:
        url = f"file:///dev/shm/jaxblock_bench_overlap_{os.getpid()}_{time.monotonic_ns()}/"
        server = multiprocessing.get_context("spawn").Process(target=_serve, args=(argv, fed.flat(), url, host))
        server.start()
        try:
            comm.run_client(0, fed, setup.params, setup.partition, train, setup.batches_fn, transport.Store(url),
                            comm.party(cc, signing.client_name(0)), link, on_round=rows.append)  # fmt: skip
        finally:
            server.join(60)
            if server.exitcode is None:  # the client failed, or the server hangs: nothing may outlive us
                server.terminate()
                server.join()
            shutil.rmtree(url.removeprefix("file://"), ignore_errors=True)
        if server.exitcode != 0:
            raise SystemExit(f"error: the server process failed or hung (exit code {server.exitcode})")
    return [r for r in rows if r["round"] != "flush" and r["round"] >= 1]  # round 0 has no exchange to hide


def _serve(argv, fed_flat, url, host):
    """The server process of --device-core: on the host's cores, the same model as the client's."""
    os.sched_setaffinity(0, host)
    setup = experiment.setup(_config(argv)[0])
    fed = algorithms.configure(**fed_flat)
    comm.serve(
        fed, setup.params, setup.partition, transport.Store(url), comm.party(comm.CommConfig(timeout_s=600), "server")
    )


def _config(argv):
    """The benchmark's config (one client, one block spanning every layer, so that every round
    computes the same thing) and its arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds per run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating FedBCD/ParaBlock runs per setting")
    parser.add_argument("--ratios", default="0.5,1,2", help="target comm/comp ratios")
    parser.add_argument("--plot", default="runs/bench_overlap.png", help="Figure-2 style PNG ('' = none)")
    parser.add_argument("--device-core", action="store_true", help="XLA on core 0, host work and server elsewhere")
    parser.add_argument("--json", action="store_true")
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", "configs/tiny.py", *argv]
    config, args = runtime.parse_args(parser, argv)
    config.num_clients = 1
    config.blocks.layers_per_block = config.model.num_layers
    config.blocks.head_block = config.blocks.embed_block = False  # (the tiny config trains its head as a block)
    return config, args


def main():
    argv = sys.argv[1:]
    host = None
    if "--device-core" in argv:  # before XLA starts: its executor threads take the mask of the thread that makes them
        cores = os.sched_getaffinity(0)
        if len(cores) < 2:
            raise SystemExit("error: --device-core needs at least 2 cores (one for the device, one for the host)")
        device, host = min(cores), cores - {min(cores)}
        os.sched_setaffinity(0, {device})
        jax.block_until_ready(jax.numpy.ones(1) + 1)
        os.sched_setaffinity(0, host)  # this thread and the exchange threads it starts: the host
        print(f"device: core {device} (XLA); host: cores {sorted(host)} (dispatch, exchange, the server process)")
    config, args = _config(argv)
    setup = experiment.setup(config)
    fed = dataclasses.replace(setup.fed, schedule="sequential")
    as_algorithm = lambda name: algorithms.configure(**{**fed.flat(), "algorithm": name})  # noqa: E731
    block_bytes = setup.partition.blocks[0].params * wire.WIRE_DTYPES[fed.wire_dtype].itemsize
    print(
        f"model {setup.cfg.num_layers} layers, block = {block_bytes / 1e6:.2f} MB on the wire, K={fed.local_steps}, "
        f"batch {config.batch_size}x{config.seq_len}, {args.rounds} rounds per run, {jax.devices()[0].platform}"
    )

    # Calibrate: compute time per round with an unlimited link (FedBCD, nothing to hide).
    train = setup.local_train()  # one executable for every run
    calib = run(setup, train, as_algorithm("fedbcd"), wire.Link(), max(args.rounds // 2, 3), argv, host)
    comp_s = statistics.median(r["compute_s"] for r in calib)
    print(f"calibration: compute {comp_s:.3f} s/round")

    settings, bars = [], []
    for ratio in [float(x) for x in args.ratios.split(",")]:
        # Two transfers of the block per round (up, down): bandwidth for comm = ratio x compute.
        link = wire.Link(bandwidth_mbps=2 * block_bytes / (ratio * comp_s) / 1e6)
        fedbcd, para = [], []
        for _ in range(args.repeats):  # alternate, so that drift in machine speed hits both alike
            fedbcd += run(setup, train, as_algorithm("fedbcd"), link, args.rounds, argv, host)
            para += run(setup, train, as_algorithm("parablock"), link, args.rounds, argv, host)
        t_comp = statistics.median(r["compute_s"] for r in fedbcd)
        t_comm = statistics.median(r["comm_s"] for r in fedbcd)
        t_fedbcd = statistics.median(r["compute_s"] + r["exposed_wait_s"] for r in fedbcd)
        t_para = statistics.median(r["compute_s"] + r["exposed_wait_s"] for r in para)
        t_ideal = statistics.median(max(r["compute_s"], r["comm_s"]) for r in fedbcd)
        row = {
            "comm_over_comp": ratio,
            "bandwidth_mbps": link.bandwidth_mbps,
            "comp_s": t_comp,
            "comm_s": t_comm,
            "measured_comm_over_comp": t_comm / t_comp,
            "fedbcd_s": t_fedbcd,
            "parablock_s": t_para,
            "overlap_efficiency": (t_fedbcd - t_para) / min(t_comp, t_comm),
            "parablock_over_max": t_para / max(t_comp, t_comm),
            "ideal_s": t_ideal,
            "parablock_over_ideal": t_para / t_ideal,
        }
        settings.append(row)
        print(
            f"comm/comp {ratio:>4}: link {link.bandwidth_mbps:7.1f} MB/s  comp {t_comp:.3f}s  comm {t_comm:.3f}s  "
            f"FedBCD {t_fedbcd:.3f} s/round  ParaBlock {t_para:.3f} s/round  "
            f"efficiency {row['overlap_efficiency']:.2f}  ParaBlock/max(comp,comm) {row['parablock_over_max']:.2f}  "
            f"ParaBlock/ideal {row['parablock_over_ideal']:.2f}",
            flush=True,
        )
        for name, rows in (("FedBCD", fedbcd), ("ParaBlock", para)):
            bars.append(
                {
                    "label": f"{name}\n{link.bandwidth_mbps:.0f} MB/s",
                    "compute_s": float(np.median([r["compute_s"] for r in rows])),
                    "exposed_s": float(np.median([r["exposed_wait_s"] for r in rows])),
                }
            )
    if args.plot:
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        plots.runtime_bars(
            bars, args.plot, "Seconds per round: compute vs exposed communication (tiny model, 1 client)"
        )
        print(f"plot: {args.plot}")
    if args.json:
        print(
            json.dumps(
                {"settings": settings, "block_bytes": block_bytes, "rounds": args.rounds, "repeats": args.repeats}
            )
        )


if __name__ == "__main__":
    main()
