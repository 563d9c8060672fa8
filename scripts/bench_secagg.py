"""Measures secure aggregation's cost (jaxblock/fed/secagg.py) per client and per server round.

Four sections, each from rounds driven through the protocol's steps in memory (client_keys,
collect_keys, share_keys, relay, quantize, masked_input, requests, answer, unmask_round), timed one
step at a time in wall seconds (time.perf_counter; every step is single-threaded Python/NumPy/
OpenSSL); every figure is the median over --repeats rounds (a round's per-client figure is the mean
over its clients). Every round's unmasked sum is checked against the sum of the quantized inputs.

1. Per client per round at the config's largest block (configs/tiny.py: layers 0-1, 811,776
   values) with the config's M = clients_per_round (tiny: 10), complete graph, bits 32: client
   seconds per step, server seconds (relay, sum, unmask with 0 and with 1 dropout; the dropout
   shared its keys and never uploaded, so the server also regenerates its dangling pairwise masks),
   and bytes per client (share bytes only: no framing, no signatures).
2. Projection to a Llama 3.2-3B 2-layer block (201,338,880 values, counted from its dims) from
   throughputs measured on --prg-values values: ChaCha20 expansion, mask (expand + add per stream),
   quantize, and the server's sum.
3. Growth: N clients, all participating, one dropout before upload, on --growth-values values:
   complete graph against SecAgg+'s k = ceil(log2 N) + --margin (degree rounded up to even).
4. A cost model (not a measurement) of FedBCD's and ParaBlock's round time at the config's block
   with and without secure aggregation, from section 1's figures, a compute time per round
   (--compute-s, default 0.5 s: a given figure, close to bench_overlap's calibrated 0.51 s on tiny),
   links of --links MB/s and --latency-ms per message.

    python scripts/bench_secagg.py                      # about 70 s on the 2-core CI machine
    python scripts/bench_secagg.py --repeats 3 --growth-n 10,50 --json
    python scripts/bench_secagg.py --block-params 100000 --clients 4   # without loading a config
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

from jaxblock.fed import secagg as sa
from jaxblock.fed import wire

BITS = 32
BOUND = 1.0  # the clip norm C bounds every coordinate
# Llama 3.2-3B (its HF config.json); a 2-layer block as configs/llama3_2_3b.py's blocks.
LLAMA_3B = {"hidden": 3072, "intermediate": 8192, "heads": 24, "kv_heads": 8, "head_dim": 128}


def llama_block_params(hidden, intermediate, heads, kv_heads, head_dim, layers=2) -> int:
    """Values in `layers` Llama decoder layers: q, k, v, o, gate, up, down (no biases), two RMSNorms."""
    attention = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    return layers * (attention + 3 * hidden * intermediate + 2 * hidden)


def config_block(argv: list[str]) -> tuple[int, int, str]:
    """(values in the config's largest block, its clients per round, a description) from shapes alone."""
    from jaxblock.run import runtime
    from jaxblock.run.config import model_config

    parser = argparse.ArgumentParser(add_help=False)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", "configs/tiny.py", *argv]
    config, _ = runtime.parse_args(parser, argv)
    part = runtime.make_partition(config, model_config(config))
    block = max(part.blocks, key=lambda b: b.params)
    fed = runtime.fed_config(config)
    return block.params, fed.clients_per_round, f"largest block '{block.name}' of the config"


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def setup_for(round_: int, parties: list[int], k: int) -> sa.Setup:
    """The round's public parameters as the simulator's transform makes them (t just above half)."""
    return sa.SecureAggregation(clients_per_round=len(parties), bits=BITS, neighbors=k).setup(round_, parties)


def run_round(setup: sa.Setup, inputs: dict[int, np.ndarray], num_clients: int, drop=(), time_prg=False) -> dict:
    """One round, every step timed: {'client': {step: [s per client]}, 'server': {step: s}, 'bytes': {...}}.

    `drop`: clients that share keys and never upload. `time_prg`: also time `sa.mask` alone on each
    client's quantized input with as many streams as its masked_input used (the PRG part of it)."""
    client: dict[str, list[float]] = {}
    server: dict[str, float] = {}
    sent: dict[str, list[int]] = {}

    def note(table, name, value):
        table.setdefault(name, []).append(value)

    states, publics, outboxes, masked, quantized, answers = {}, {}, {}, {}, {}, {}
    for u in setup.parties:
        (states[u], publics[u]), s = timed(sa.client_keys, setup, u)
        note(client, "keys", s)
        note(sent, "public keys", sum(len(x) for x in publics[u]))
    keys_server, s = timed(sa.collect_keys, setup, publics)
    server["relay"] = s
    for u in setup.parties:
        peers, s = timed(sa.peer_keys, keys_server, u)
        server["relay"] += s
        (states[u], outboxes[u]), s = timed(sa.share_keys, states[u], peers)
        note(client, "share_keys", s)
        note(sent, "encrypted shares", sum(len(x) for x in outboxes[u].values()))
        note(sent, "peer keys received", sum(len(c_pk) + len(s_pk) for c_pk, s_pk in peers.values()))
    (keys_server, inboxes), s = timed(sa.relay, keys_server, outboxes)
    server["relay"] += s
    for u in setup.parties:
        note(sent, "shares received", sum(len(x) for x in inboxes[u].values()))
    for u in setup.parties:
        if u in drop:
            continue
        flat = inputs[u]
        quantized[u], s = timed(sa.quantize, flat, BOUND, num_clients, BITS, np.random.default_rng([7, u]))
        note(client, "quantize", s)
        (states[u], masked[u]), s = timed(sa.masked_input, states[u], quantized[u], inboxes[u])
        note(client, "masked_input", s)
        note(sent, "masked payload", masked[u].nbytes)
        if time_prg:
            seeds = {p: os.urandom(32) for p in states[u].masked_with}
            _, prg = timed(sa.mask, quantized[u], u, os.urandom(32), seeds, BITS)
            note(client, "mask (PRG)", prg)
            note(client, "agree + open", max(s - prg, 0.0))
    asks, s = timed(sa.requests, keys_server, masked)
    server["requests"] = s
    for v, ask in asks.items():
        (states[v], answers[v]), s = timed(sa.answer, states[v], ask)
        note(client, "answer", s)
        note(sent, "answers", sum(len(data) for _, _, data in answers[v]))
    _, server["sum"] = timed(sa.add, list(masked.values()), BITS)
    total, server["unmask_round"] = timed(sa.unmask_round, keys_server, masked, answers)
    if not np.array_equal(total, sa.add(list(quantized.values()), BITS)):
        raise AssertionError(f"round {setup.round_}: the unmasked sum is not the sum of the quantized inputs")
    server["unmask (excl. sum)"] = max(server["unmask_round"] - server["sum"], 0.0)
    server["total"] = server["relay"] + server["requests"] + server["unmask_round"]
    steps = ("keys", "share_keys", "quantize", "masked_input", "answer")
    client["total"] = sum(statistics.fmean(client[k]) for k in steps)  # of a client that uploads and answers
    return {"client": client, "server": server, "bytes": sent}


def median_of(rounds: list[dict], part: str, key: str) -> float:
    """Median over rounds of (the mean over clients of) one figure."""
    values = [r[part][key] for r in rounds]
    return statistics.median(statistics.fmean(v) if isinstance(v, list) else v for v in values)


def per_client(n: int, m: int, repeats: int, seed: int = 0) -> dict:
    """Section 1: `repeats` rounds without and with one dropout, interleaved, M clients, complete graph."""
    rng = np.random.default_rng(seed)
    inputs = {u: (1e-3 * rng.standard_normal(n)).astype(np.float32) for u in range(m)}
    run_round(setup_for(-1, [0, 1, 2], 0), {u: inputs[u][:1000] for u in range(3)}, 3, time_prg=True)  # warm-up
    clean, dropped = [], []
    for r in range(repeats):
        clean.append(run_round(setup_for(2 * r, list(range(m)), 0), inputs, m, time_prg=True))
        dropped.append(run_round(setup_for(2 * r + 1, list(range(m)), 0), inputs, m, drop=(m - 1,)))
    client = {k: median_of(clean, "client", k) for k in clean[0]["client"]}
    client["keygen + agreement"] = client["keys"] + client["agree + open"]
    server = {k: median_of(clean, "server", k) for k in clean[0]["server"]}
    server.update({f"{k}, 1 dropout": median_of(dropped, "server", k) for k in ("unmask_round", "total")})
    sizes = {k: statistics.fmean(v) for k, v in clean[0]["bytes"].items()}
    return {"values": n, "clients": m, "threshold": setup_for(0, list(range(m)), 0).threshold,
            "client_s": client, "server_s": server, "bytes": sizes}  # fmt: skip


def throughput(n: int, m: int, repeats: int) -> dict:
    """Values per second of expand (one stream), mask (per stream: expand + add), quantize, and the
    server's add (per upload summed), on n values."""
    rng = np.random.default_rng(1)
    x = (1e-3 * rng.standard_normal(n)).astype(np.float32)
    q = sa.quantize(x, BOUND, m, BITS, rng)
    seeds = {p: os.urandom(32) for p in range(1, m)}
    ups = [q] * m
    times = {"expand": [], "mask": [], "quantize": [], "add": []}
    for _ in range(repeats):
        times["expand"].append(timed(sa.expand, os.urandom(32), n, BITS)[1])
        times["mask"].append(timed(sa.mask, q, 0, os.urandom(32), seeds, BITS)[1])
        times["quantize"].append(timed(sa.quantize, x, BOUND, m, BITS, rng)[1])
        times["add"].append(timed(sa.add, ups, BITS)[1])
    per = {"expand": n, "mask": n * m, "quantize": n, "add": n * m}  # mask: self + (m - 1) pairs
    return {k: per[k] / statistics.median(v) for k, v in times.items()}


def projection(rates: dict, n: int, m: int) -> dict:
    """Seconds at n values, M clients, complete graph, from the measured rates (no measurement at n)."""
    mask_s = n * m / rates["mask"]  # self + M - 1 pairs
    sum_s = n * m / rates["add"]
    return {
        "values": n,
        "clients": m,
        "client quantize s": n / rates["quantize"],
        "client mask s": mask_s,
        "server sum s": sum_s,
        "server unmask s, 0 dropouts": sum_s + n * m / rates["mask"],  # M self-masks
        "server unmask s, 1 dropout": n * (m - 1) / rates["add"] + n * 2 * (m - 1) / rates["mask"],
        "payload bytes": n * np.dtype(sa.word_dtype(BITS)).itemsize,
        "quantize peak bytes": n * 3 * 8,  # its three float64 copies
    }


def growth(ns: list[int], values: int, margin: int, repeats: int) -> list[dict]:
    """Section 3: per N, complete graph and SecAgg+ k, one dropout before upload."""
    rows = []
    for n_clients in ns:
        rng = np.random.default_rng(n_clients)
        inputs = {u: (1e-3 * rng.standard_normal(values)).astype(np.float32) for u in range(n_clients)}
        k_plus = math.ceil(math.log2(n_clients)) + margin
        for k in (0, k_plus):
            parties = list(range(n_clients))
            setup = setup_for(0, parties, k)
            degree = len(setup.graph()[0])
            rounds = [run_round(setup_for(r, parties, k), inputs, n_clients, drop=(0,)) for r in range(repeats)]
            row = {
                "clients": n_clients,
                "neighbors": k,
                "degree": degree,
                "threshold": setup.threshold,
                "client_s": median_of(rounds, "client", "total"),
                "server_s": median_of(rounds, "server", "total"),
                "shares_bytes": statistics.fmean(rounds[0]["bytes"]["encrypted shares"]),
            }
            rows.append(row)
            print(f"  N={n_clients:4d} k={k:3d} (degree {degree:3d}, t={setup.threshold:3d}): client "
                  f"{row['client_s'] * 1e3:8.1f} ms  server {row['server_s'] * 1e3:8.1f} ms  "
                  f"shares sent {row['shares_bytes'] / 1e3:6.1f} KB", flush=True)  # fmt: skip
    return rows


def cost_model(pc: dict, block_bytes: int, compute_s: float, links: list[float], latency_ms: float) -> list[dict]:
    """Section 4 (a model): modelled seconds per round, plain and secure, FedBCD and ParaBlock.

    plain comm = upload + download of the block, a message each. Secure adds, per client: 4 messages
    before the upload (keys up, peers' keys down, shares up, shares in), 2 after it (requests down,
    answers up), their bytes, the client's CPU (keys, share_keys, quantize, masked_input, answer)
    and the server's (relay, requests, unmask_round with its sum; the plain server's own sum is not
    counted, so the secure overhead is overstated by it). FedBCD runs it all in series. ParaBlock
    overlaps the comm thread with compute: round t's key agreement can run during round t's
    compute, beside round t-1's upload path, so T = max(compute, upload path, key-agreement path);
    the 'serial' variant puts the key agreement on the upload path too."""
    c, b, s = pc["client_s"], pc["bytes"], pc["server_s"]
    rows = []
    for mbps in links:
        link = wire.Link(bandwidth_mbps=mbps, latency_ms=latency_ms)
        plain_comm = 2 * link.seconds(block_bytes)
        keyagree = (
            c["keys"] + c["share_keys"] + s["relay"]
            + link.seconds(b["public keys"]) + link.seconds(b["encrypted shares"])
            + link.seconds(b["peer keys received"]) + link.seconds(b["shares received"])
        )  # fmt: skip
        upload = (
            c["quantize"] + c["masked_input"] + link.seconds(b["masked payload"]) + s["requests"]
            + link.seconds(0) + c["answer"] + link.seconds(b["answers"]) + s["unmask_round"]
            + link.seconds(block_bytes)  # the aggregate down
        )  # fmt: skip
        fedbcd, fedbcd_sa = compute_s + plain_comm, compute_s + keyagree + upload
        para, para_sa = max(compute_s, plain_comm), max(compute_s, upload, keyagree)
        para_serial = max(compute_s, upload + keyagree)
        row = {"link_mbps": mbps, "comm_s": plain_comm, "keyagree_s": keyagree, "upload_path_s": upload,
               "fedbcd_s": fedbcd, "fedbcd_secure_s": fedbcd_sa, "parablock_s": para, "parablock_secure_s": para_sa,
               "parablock_serial_secure_s": para_serial}  # fmt: skip
        for name in ("fedbcd", "parablock", "parablock_serial"):
            base = para if name == "parablock_serial" else row[f"{name}_s"]
            row[f"{name}_exposed_pct"] = 100 * (row[f"{name}_secure_s"] - base) / row[f"{name}_secure_s"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds per figure (medians reported)")
    parser.add_argument("--block-params", type=int, default=0, help="values per upload (0: the config's largest block)")
    parser.add_argument("--clients", type=int, default=0, help="M for section 1 (0: the config's clients per round)")
    parser.add_argument("--prg-values", type=int, default=1 << 24, help="values the throughputs are measured on")
    parser.add_argument("--growth-n", default="10,50,100", help="client counts of section 3 ('' = skip it)")
    parser.add_argument("--growth-values", type=int, default=100_000, help="values per upload in section 3")
    parser.add_argument("--margin", type=int, default=2, help="SecAgg+'s k = ceil(log2 N) + margin")
    parser.add_argument("--compute-s", type=float, default=0.5, help="compute seconds per round in the model")
    parser.add_argument("--links", default="10,100", help="link MB/s of the model")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="per message in the model")
    parser.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: at least 1")
    n, m, what = args.block_params, args.clients, f"--block-params {args.block_params}"
    if not n or not m:  # the config's (configs/tiny.py unless --config is given)
        config_n, config_m, config_what = config_block(rest)
        n, what = (n, what) if n else (config_n, config_what)
        m = m or config_m
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    word = np.dtype(sa.word_dtype(BITS)).itemsize
    print(f"secure aggregation, bits {BITS}, {os.cpu_count()} cores, medians of {args.repeats} rounds")

    pc = per_client(n, m, args.repeats)
    print(
        f"\n1. per round at {n:,} values ({what}, {n * word / 1e6:.2f} MB), M={m}, complete graph, t={pc['threshold']}"
    )
    print(f"  {'client step':34} {'ms':>9}")
    for key in ("keygen + agreement", "keys", "agree + open", "share_keys", "quantize", "mask (PRG)",
                "masked_input", "answer", "total"):  # fmt: skip
        print(f"  {key:34} {pc['client_s'][key] * 1e3:9.2f}")
    print(f"  {'server step':34} {'ms':>9}")
    for key in ("relay", "requests", "sum", "unmask (excl. sum)", "unmask_round", "unmask_round, 1 dropout",
                "total", "total, 1 dropout"):  # fmt: skip
        print(f"  {key:34} {pc['server_s'][key] * 1e3:9.2f}")
    print(f"  {'bytes per client':34} {'bytes':>12}")
    for key, value in pc["bytes"].items():
        print(f"  {key:34} {value:12,.0f}")

    rates = throughput(args.prg_values, m, args.repeats)
    big = llama_block_params(**LLAMA_3B)
    proj = projection(rates, big, m)
    print(f"\n2. throughput on {args.prg_values:,} values (M values/s): "
          + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in rates.items())
          + f"\n   projected to Llama 3.2-3B's 2-layer block ({big:,} values), M={m}, complete graph:")  # fmt: skip
    for key, value in proj.items():
        if key.endswith(" s") or ", " in key:
            print(f"  {key:34} {value:9.2f} s")
        elif key not in ("values", "clients"):
            print(f"  {key:34} {value / 1e6:9.1f} MB")

    ns = [int(x) for x in args.growth_n.split(",") if x]
    if ns:
        print(f"\n3. growth on {args.growth_values:,} values, one dropout before upload, k = ceil(log2 N) + "
              f"{args.margin} (degree rounded up to even; 0: complete); client: mean over clients")  # fmt: skip
    grow = growth(ns, args.growth_values, args.margin, args.repeats)

    links = [float(x) for x in args.links.split(",")]
    model = cost_model(pc, n * word, args.compute_s, links, args.latency_ms)
    print(f"\n4. MODEL (not measured): round seconds at {n * word / 1e6:.2f} MB, compute {args.compute_s} s "
          f"(--compute-s), {args.latency_ms:g} ms per message, the secure figures from section 1")  # fmt: skip
    print(f"  {'MB/s':>5} {'FedBCD':>7} {'+SA':>7} {'exp %':>6} {'ParaBl':>7} {'+SA':>7} {'exp %':>6} "
          f"{'+SA ser':>7} {'exp %':>6}  (upload path {'/'} key agreement s)")  # fmt: skip
    for r in model:
        print(f"  {r['link_mbps']:5.0f} {r['fedbcd_s']:7.3f} {r['fedbcd_secure_s']:7.3f} "
              f"{r['fedbcd_exposed_pct']:6.1f} "
              f"{r['parablock_s']:7.3f} {r['parablock_secure_s']:7.3f} {r['parablock_exposed_pct']:6.1f} "
              f"{r['parablock_serial_secure_s']:7.3f} {r['parablock_serial_exposed_pct']:6.1f}  "
              f"({r['upload_path_s']:.3f} / {r['keyagree_s']:.3f})")  # fmt: skip
    inputs = {"compute_s": args.compute_s, "latency_ms": args.latency_ms, "block_bytes": n * word}
    out = {"bits": BITS, "repeats": args.repeats, "cores": os.cpu_count(), "per_client": pc, "rates": rates,
           "projection": proj, "growth": grow, "margin": args.margin, "model": model,
           "model_inputs": inputs}  # fmt: skip
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
