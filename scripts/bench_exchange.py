"""Measures the host cost of one exchange of a block, step by step, in wall and CPU seconds.

A block of float32 leaves shaped like transformer layers (Llama-3.2 proportions: q and o [D, D],
k and v [D, D/3], gate and up [D, 8D/3], down [8D/3, D], two norms [D]; two layers, D chosen so
that the block is about each of --sizes MB; D = 3072 is a Llama-3.2-3B 2-layer block of 805 MB)
goes through what a round does on the host:

    device_get     the client's delta, device -> host
    publish        Store.publish: arrays + COMMIT (with keys: + SHA-256 digests and a signature)
    fetch          Store.fetch: the arrays back, no checks (the first read after the publishes: it
                   also pays for the fresh memory the kernel zeroes, which later reads reuse)
    read_checked   receive.read_checked: every check the server makes (with keys: the signature, the digests)
    screen         validate.screen: the server's finiteness and norm check of every accepted update
    reduce         the algorithms' weighted sum of --clients copies of the delta (+ device_get of the result)

on a memory:// and a file:// store. Each is timed --repeats times (after one exchange not
counted); the medians are printed, with MB/s of block per core = block MB / CPU seconds
(time.process_time: every thread of this process, TensorStore's too). CPU seconds leave out the
time spent waiting for a core, so they move much less than wall seconds on a shared machine.

    python scripts/bench_exchange.py              # 13 and 805 MB, about a minute
    python scripts/bench_exchange.py --sizes 13,201,805 --repeats 5 --json
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxblock.fed import merge, transforms, validate
from jaxblock.net import receive, signing, transport

SIGNED = {"kind": "delta", "round": 0, "block": 0, "client": 0}


def layer_shapes(d: int) -> dict:
    """One transformer layer's leaves with model width d (Llama-3.2 proportions)."""
    kv, f = d // 3, d * 8 // 3
    return {
        "q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d),
        "gate": (d, f), "up": (d, f), "down": (f, d), "norm_attn": (d,), "norm_mlp": (d,),
    }  # fmt: skip


def width_for(megabytes: float, layers: int = 2) -> int:
    """The model width (a multiple of 48, so that D/3 and 8D/3 are whole) whose block is closest to `megabytes`."""
    per_d2 = layers * sum(np.prod(s) for s in layer_shapes(48).values()) / 48**2 * 4 / 1e6  # MB per D^2
    return max(48, int(round((megabytes / per_d2) ** 0.5 / 48)) * 48)


def make_block(d: int, seed: int = 0) -> dict:
    """Two layers of float32 values ~ N(0, 1e-3): a delta, on the default device."""
    rng = np.random.default_rng(seed)
    return {
        f"layers_{i}": {
            k: jax.device_put(rng.standard_normal(s, np.float32) * 1e-3) for k, s in layer_shapes(d).items()
        }
        for i in range(2)
    }


def measure(store: transport.Store, delta: dict, repeats: int, clients: int, keys) -> dict[str, list]:
    """{step: [(wall s, CPU s), ...]} over `repeats` exchanges of `delta` through `store`, after one
    more that is not counted (it compiles the jitted checks and the reduce)."""
    client, server = keys
    expected = transforms.wire_leaves((), jax.eval_shape(lambda: delta), "float32")
    limit = validate.upload_bytes(expected)
    weights = jnp.full(clients, 1.0 / clients, jnp.float32)
    seal = lambda m: client.seal({**m, **SIGNED})  # noqa: E731
    verify = lambda m: server.check(m, "client_0", SIGNED)  # noqa: E731
    times: dict[str, list] = {}

    def step(name, fn, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        times.setdefault(name, []).append((time.perf_counter() - wall, time.process_time() - cpu))
        return out

    for r in range(repeats + 1):
        plain, signed = transport.delta_prefix(r, 0), transport.delta_prefix(r, 1)
        host = step("device_get", jax.device_get, delta)
        step("publish", store.publish, plain, host)
        step("publish+keys", store.publish, signed, host, seal=seal)
        del host
        plain_manifest, signed_manifest = store.get_json(f"{plain}/COMMIT"), store.get_json(f"{signed}/COMMIT")
        step("fetch", store.fetch, plain, plain_manifest)
        step("read_checked", receive.read_checked, store, plain, plain_manifest, expected, limit)
        got = step("read_checked+keys", receive.read_checked, store, signed, signed_manifest, expected, limit, verify)
        step("screen", validate.screen, {0: got}, validate.Policy())
        step("reduce", lambda got: jax.device_get(merge.weighted_sum([got] * clients, weights)), got)
        del got
        store.delete_round(r)
    return {name: pairs[1:] for name, pairs in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="13,805", help="block sizes in MB (each rounded to a layer width)")
    parser.add_argument("--repeats", type=int, default=3, help="exchanges per size and store (medians reported)")
    parser.add_argument("--clients", type=int, default=2, help="deltas the reduce sums")
    parser.add_argument("--stores", default="memory,file", help="memory and/or file")
    parser.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        signing.make_keys(os.path.join(tmp, "keys"), 1)
        keys = tuple(signing.Keys(os.path.join(tmp, "keys", p)) for p in ("client_0", "server"))
        rows = []
        for mb in (float(s) for s in args.sizes.split(",")):
            d = width_for(mb)
            delta = make_block(d)
            nbytes = sum(x.nbytes for x in jax.tree.leaves(delta))
            for kind in args.stores.split(","):
                url = "memory://" if kind == "memory" else f"file://{tmp}/store_{d}/"
                times = measure(transport.Store(url), delta, args.repeats, args.clients, keys)
                print(f"\nblock {nbytes / 1e6:.1f} MB (D={d}), {kind}:// store, medians of {args.repeats}")
                print(f"  {'step':18} {'wall s':>8} {'CPU s':>8} {'MB/s per core':>14}")
                for name, pairs in times.items():
                    wall, cpu = statistics.median(w for w, _ in pairs), statistics.median(c for _, c in pairs)
                    rate = nbytes / 1e6 / cpu if cpu > 0 else float("inf")
                    print(f"  {name:18} {wall:8.4f} {cpu:8.4f} {rate:14.0f}", flush=True)
                    rows.append({"mb": nbytes / 1e6, "width": d, "store": kind, "step": name, "wall_s": wall,
                                 "cpu_s": cpu, "mb_per_cpu_s": rate})  # fmt: skip
            del delta
    if args.json:
        print(json.dumps({"rows": rows, "repeats": args.repeats, "clients": args.clients, "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
