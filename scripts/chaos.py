"""Chaos test of a server + N client deployment: random kills and restarts, a server kill, bad uploads.

    python scripts/chaos.py --clients 10 --rounds 30 --workdir runs/chaos

Runs scripts/server.py and scripts/client.py as OS processes on a file:// store with signed
traffic (scripts/keys.py), a small random model on synthetic data (override with --config.*). The
last client's slot is an attacker holding that client's key: round 0 it sends a small honest
update, then every round one of: unsigned, signed with another client's key, NaN, oversized,
wrong shape, a 1e6-scaled update, a replay of its round-0 upload. Meanwhile real clients are
killed (kill -9) and restarted at random, and the server once. At the end it prints the faults
injected and survived, the uploads rejected by reason, the rounds completed, and whether the
server's final model equals a replay of exactly the deltas its log says it accepted (read back
from the store, which keeps every round), applied with the server's own functions. Bounded by
--max-minutes: past it everything is killed and the script exits 1.

    python scripts/chaos.py --secagg --clients 6 --rounds 12 --workdir runs/chaos_sa

With --secagg every party runs secure aggregation (`secagg.on`, `secagg.clip_norm`, each party its
own secret; without `comm.max_norm_ratio`, which secure aggregation refuses), and the server gets its
own public key (scripts/keys.py does not hand it out; see BENCHMARKS).
The attacker then takes part in every round's key agreement honestly (net/secure.py's ClientSide:
signed key adverts, sealed shares), so that the server never waits for it there, and uploads
garbage: unsigned, signed with another key, oversized, wrong shape, wrong dtype (float32 for uint32)
or its round-0 upload replayed (NaN and a scaled update mean nothing for words mod 2^32). A rejected
upload is a dropout after key sharing: the server rebuilds the attacker's mask key from the
survivors' shares. It answers no ask (after round 0 it is never a survivor, and is not asked). It
advertises its keys only once an honest client has: one advertising the moment a plan appears
starts the server's `timeout_s` window before honest clients, who advertise after their previous
round's compute, and a first try that did so left them out of U1 and stopped the run in round 1.
--wrapped adds the attack the server cannot see: uniform random words, masked and signed properly,
which wrap the sum and turn the model to garbage (docs/deployment.md, trust model); off by default.
--outsider adds a round in which it sits out the key agreement and uploads signed words of the
right shape and dtype: the server drops that upload from the sum without leaving it out, so the
round's weights still count it (the end check reports it and exits 1; BENCHMARKS). Client
kills are paced to what the protocol survives: at most (honest clients - t) of them down at once
(killed, restarting, or sitting out the rounds they had advertised keys for, until they upload
again), so a kill may wait, and one still waiting near the end of the run is not injected. The
replay unmasks every merged round again from the store (secure.replay_unmask: U1's keys, U2, the
ask, the answers) before the algorithm's reduce. Both modes also check that every planned upload of
every merged round was merged or left out with a reason (nothing lost).
"""

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "hf_checkpoint=", "data.source=synthetic", "model.vocab_size=256", "model.hidden_size=64",
    "model.intermediate_size=128", "model.num_layers=2", "model.head_dim=16", "blocks.layers_per_block=1",
    "seq_len=32", "batch_size=4", "local_steps=2", "data.examples_per_client=16", "blocks.head_block=False",
    "optimizer.learning_rate=0.003", "comm.keep_rounds=True", "comm.max_norm_ratio=20", "checkpoint.max_to_keep=2",
]  # fmt: skip
ATTACKS = ("unsigned", "other key", "nan", "oversized", "wrong shape", "scaled 1e6", "replay")
SECURE_ATTACKS = ("unsigned", "other key", "oversized", "wrong shape", "wrong dtype", "replay")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10, help="N (the last one is the attacker's slot)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--timeout-s", type=float, default=8.0, help="comm.timeout_s of every party")
    parser.add_argument("--kills", type=int, default=6, help="client kills (each restarted)")
    parser.add_argument("--seed", type=int, default=0, help="of the fault schedule")
    parser.add_argument("--workdir", default="runs/chaos")
    parser.add_argument("--max-minutes", type=float, default=30.0)
    parser.add_argument("--secagg", action="store_true", help="every party runs secure aggregation")
    parser.add_argument("--clip-norm", type=float, default=1.0, help="secagg.clip_norm (with --secagg)")
    wrapped = "with --secagg the attacker also sends properly masked random words (the model is garbage)"
    parser.add_argument("--wrapped", action="store_true", help=wrapped)
    outsider = "with --secagg the attacker also sends, in rounds it sits out of the key agreement, signed words"
    parser.add_argument("--outsider", action="store_true", help=outsider)
    args, extra = parser.parse_known_args()
    if args.clients < 3:
        parser.error("--clients must be >= 3 (two honest clients and the attacker's slot)")
    rng = random.Random(args.seed)
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    import jax

    from jaxblock.net import signing  # after argparse: --help needs no JAX
    from jaxblock.run import experiment
    from jaxblock.run.config import load_config

    signing.make_keys(os.path.join(args.workdir, "keys"), args.clients)
    own = os.path.join(args.workdir, "keys", "server", "server.pub")
    if args.secagg and not os.path.exists(own):  # a restarted server reads back the U1, U2 and ask it signed:
        # it needs its own public key, which signing.make_keys (scripts/keys.py) does not give it
        shutil.copy(os.path.join(args.workdir, "keys", "client_0", "server.pub"), own)
    store = f"file://{os.path.abspath(args.workdir)}/store"
    overrides = [*SMALL, f"num_clients={args.clients}", f"rounds={args.rounds}", f"comm.timeout_s={args.timeout_s}",
                 "comm.server_timeout_s=180"]  # fmt: skip
    if args.secagg:  # the server cannot norm-check a masked upload: secagg refuses max_norm_ratio
        overrides = [o for o in overrides if not o.startswith("comm.max_norm_ratio=")]
        overrides += ["secagg.on=True", f"secagg.clip_norm={args.clip_norm}"]
    flags = ["--config", os.path.join(ROOT, "configs", "tiny.py"), *[f"--config.{o}" for o in overrides], *extra]
    config = load_config(flags[1], [*overrides, *[f.removeprefix("--config.") for f in extra]])
    run = experiment.setup(config)  # the attacker's block shapes
    block_shapes = lambda b: jax.eval_shape(lambda: run.partition.block(run.params, b))  # noqa: E731
    logs = os.path.join(args.workdir, "logs")
    os.makedirs(logs)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    starts = collections.Counter()

    def start(script: str, name: str, *more: str) -> subprocess.Popen:
        starts[name] += 1
        log = open(os.path.join(logs, f"{name}.{starts[name]}.log"), "w")  # noqa: SIM115 - the process owns it
        cmd = [sys.executable, os.path.join(ROOT, "scripts", script), *flags, "--store", store, *more]
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def server():
        keys = os.path.join(args.workdir, "keys", "server")
        return start(
            "server.py", "server", "--workdir", os.path.join(args.workdir, "server"), f"--config.comm.keys={keys}"
        )

    def client(i: int):
        keys = os.path.join(args.workdir, "keys", f"client_{i}")
        workdir = os.path.join(args.workdir, "clients")
        return start(
            "client.py", f"client_{i}", "--client-id", str(i), "--workdir", workdir, f"--config.comm.keys={keys}"
        )

    honest = list(range(args.clients - 1))
    deadline = time.time() + 60 * args.max_minutes
    procs = {"server": server(), **{i: client(i) for i in honest}}
    injected = collections.Counter()
    if args.secagg:
        from jaxblock.fed import secagg
        from jaxblock.net.protocol import CommConfig

        sa = secagg.of(run.fed.transforms)
        comm = CommConfig(timeout_s=args.timeout_s, server_timeout_s=180)
        attacker = SecureAttacker(store, os.path.join(args.workdir, "keys"), args.clients - 1, rng, block_shapes,
                                  sa, comm, args.wrapped, args.outsider)  # fmt: skip
        # survivors must answer for t of every secret: a client down while another dies between its
        # upload and its answer leaves honest - 2 answerers, so at most honest - t down at once
        budget = len(honest) - sa.setup(0, list(range(args.clients))).threshold
    else:
        attacker = Attacker(store, os.path.join(args.workdir, "keys"), args.clients - 1, rng, block_shapes)
        budget = len(honest)
    down: dict = {}  # client -> the newest round planned when it was killed, until it uploads a later one
    # The fault schedule, in rounds: client kills spread over the run, the server's in the middle.
    kill_rounds = sorted(rng.sample(range(2, max(3, args.rounds - 2)), min(args.kills, max(1, args.rounds - 4))))
    server_kill_round = args.rounds // 2
    restart_at: dict = {}
    not_injected = 0
    try:
        while procs["server"].poll() is None or "server" in restart_at:
            if time.time() > deadline:
                raise TimeoutError(f"not finished after {args.max_minutes:g} minutes")
            t = attacker.step(injected)
            now = time.time()
            for who, since in list(down.items()):  # back: it uploaded in a round planned after its kill
                commits = (f"{attacker.transport.delta_prefix(r, who)}/COMMIT" for r in range(since + 1, t + 1))
                if who not in restart_at and any(attacker.store.get_json(k) is not None for k in commits):
                    del down[who]
            if args.secagg and kill_rounds and t >= max(3, args.rounds - 2):  # deferred past the schedule,
                not_injected, kill_rounds = len(kill_rounds), []  # where a restart could find the run finished
            if kill_rounds and t >= kill_rounds[0] and len(down) < budget:
                kill_rounds.pop(0)
                live = [i for i in honest if i not in restart_at and i not in down and procs[i].poll() is None]
                if live:
                    victim = rng.choice(live)
                    procs[victim].send_signal(signal.SIGKILL)
                    injected["client kill -9"] += 1
                    restart_at[victim] = now + rng.uniform(0, 2 * args.timeout_s)
                    if args.secagg:
                        down[victim] = t
            if server_kill_round is not None and t >= server_kill_round:
                server_kill_round = None
                procs["server"].send_signal(signal.SIGKILL)
                procs["server"].wait()
                injected["server kill -9"] += 1
                restart_at["server"] = now + 2.0
            for who, when in list(restart_at.items()):
                if now >= when:
                    del restart_at[who]
                    procs[who].wait()
                    procs[who] = server() if who == "server" else client(who)
            time.sleep(0.2)
        dead = {who for who in restart_at if who != "server"}  # killed, the run ended before their restart
        for i in honest:
            procs[i].wait(timeout=max(1.0, deadline - time.time()))
        procs = {who: p for who, p in procs.items() if who not in dead}
        attacker.close()
    except (TimeoutError, subprocess.TimeoutExpired) as e:
        for p in procs.values():
            p.kill()
        parser.exit(1, f"chaos: {e}; logs in {logs}\n")
    report(args, procs, injected, starts, store, not_injected=not_injected + len(kill_rounds))


class Attacker:
    """Plays the last client's slot with its key: an honest round 0, then one bad upload per round."""

    def __init__(self, store_url: str, keys_dir: str, me: int, rng: random.Random, block_shapes):
        from jaxblock.net import signing, transport

        self.block_shapes = block_shapes  # block id -> its leaves' ShapeDtypeStructs
        self.transport, self.signing = transport, signing
        self.store = transport.Store(store_url)
        self.me, self.rng, self.round, self.first = me, rng, 0, None
        self.mine = signing.Keys(os.path.join(keys_dir, f"client_{me}"))
        self.other = signing.Keys(os.path.join(keys_dir, "client_0"))
        self.store.put_json(transport.ready_key(me), self.mine.seal({"kind": "ready", "client": me}))

    def close(self) -> None:
        pass

    def step(self, injected: collections.Counter) -> int:
        """Uploads into round t's slot once round t's plan is out; returns the newest round planned."""
        import numpy as np

        t = self.round
        plan = self.store.get_json(self.transport.plan_key(t))
        if plan is None:
            return t - 1
        import jax

        signed = {"kind": "delta", "round": t, "block": plan["block"], "client": self.me}
        honest = jax.tree.map(lambda x: np.full(x.shape, 1e-4, np.float32), self.block_shapes(plan["block"]))
        each = lambda f: jax.tree.map(f, honest)  # noqa: E731
        seal = lambda m: self.mine.seal({**m, **signed})  # noqa: E731
        prefix = self.transport.delta_prefix(t, self.me)
        kind = "honest" if t == 0 else ATTACKS[(t - 1) % len(ATTACKS)]
        if kind == "honest":
            self._publish(prefix, honest, seal)
            self.first = (prefix, self.store.get_json(f"{prefix}/COMMIT"))
        elif kind == "unsigned":
            self._publish(prefix, honest, None)
        elif kind == "other key":
            self._publish(prefix, honest, lambda m: self.other.seal({**m, **signed}))
        elif kind == "nan":
            self._publish(prefix, each(lambda v: np.full_like(v, np.nan)), seal)
        elif kind == "oversized":
            self._publish(prefix, each(lambda v: np.zeros((v.shape[0] * 4, *v.shape[1:]), np.float32)), seal)
        elif kind == "wrong shape":
            self._publish(prefix, each(lambda v: np.zeros((1, 3), np.float32)), seal)
        elif kind == "scaled 1e6":
            self._publish(prefix, each(lambda v: v * 1e10), seal)
        elif kind == "replay":  # its round-0 upload, arrays and signed manifest copied to round t
            old_prefix, manifest = self.first
            tree, _ = self.store.fetch(old_prefix, manifest)
            self._publish(prefix, tree, None, manifest=manifest)
        if kind != "honest":
            injected[f"upload: {kind}"] += 1
        self.round += 1
        return t

    def _publish(self, prefix, tree, seal, manifest=None):
        if manifest is None:
            self.store.publish(prefix, tree, seal=seal)
        else:  # another upload's signed manifest over these arrays
            self.store.publish(prefix, tree)
            self.store.put_json(f"{prefix}/COMMIT", manifest)


class SecureAttacker(Attacker):
    """With secure aggregation: the last client's slot agrees keys honestly every round (the very
    messages a client writes: net/secure.py's ClientSide), uploads an honest masked update in round 0,
    then one garbage masked upload per round (SECURE_ATTACKS, and 'wrapped' if asked). Its key
    agreement runs in ClientSide's thread, its uploads in one of its own: `step` never blocks."""

    def __init__(self, store_url, keys_dir, me, rng, block_shapes, transform, comm, wrapped: bool, outsider: bool):
        import concurrent.futures

        import numpy as np

        from jaxblock.net import secure

        super().__init__(store_url, keys_dir, me, rng, block_shapes)
        self.secure, self.transform = secure, transform
        self.side = secure.ClientSide(self.store, self.mine, transform, comm, me)
        self.uploader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="attacker-upload")
        self.jobs: list = []
        self.attacks = SECURE_ATTACKS + (("wrapped",) if wrapped else ()) + (("outsider",) if outsider else ())
        self.words = np.random.default_rng(rng.getrandbits(63))

    def step(self, injected: collections.Counter) -> int:
        t = self.round
        plan = self.store.get_json(self.transport.plan_key(t))
        if plan is None:
            return t - 1
        parties = self.secure.parties_of(plan)
        peers = [self.secure.key(t, f"keys/{c}") for c in parties if c != self.me]
        if not any(self.store.get_json(k) is not None for k in peers):
            return t - 1  # as a client would: not before the first honest one (the module docstring says why)
        kind = "honest" if t == 0 else self.attacks[(t - 1) % len(self.attacks)]
        if kind != "outsider":
            self.side.start(t, parties)  # (a)-(b) in ClientSide's thread
        self.jobs.append(self.uploader.submit(self._upload, t, plan["block"], kind))
        if kind != "honest":
            injected[f"upload: {kind}"] += 1
        self.round += 1
        return t

    def _upload(self, t: int, block: int, kind: str) -> None:
        import jax
        import numpy as np

        honest = jax.tree.map(lambda x: np.full(x.shape, 1e-4, np.float32), self.block_shapes(block))
        q = self.transform.encode({}, self.me, block, honest)[0]["q"]  # clipped, quantized
        if kind == "wrapped":  # any words in [0, 2^32): the sum wraps, and nothing can tell
            q = self._random(q)
        # its masked input: waits for its key agreement (None: it was left out of it, or stayed out)
        masked = None if kind == "outsider" else self.side.masked(t, {"q": q})
        words = masked["q"] if masked is not None else self._random(q)
        signed = {"kind": "delta", "round": t, "block": block, "client": self.me}
        seal = lambda m: self.mine.seal({**m, **signed})  # noqa: E731
        prefix = self.transport.delta_prefix(t, self.me)
        if kind in ("honest", "wrapped"):
            self._publish(prefix, {"q": words}, seal)
            if kind == "honest":
                self.first = (prefix, self.store.get_json(f"{prefix}/COMMIT"))
            if masked is not None:
                self.side.answer_later(t)  # a survivor: the server needs its shares
        elif kind == "outsider":  # words of the right shape and dtype, signed, from outside the key agreement
            self._publish(prefix, {"q": self._random(q)}, seal)
        elif kind == "unsigned":
            self._publish(prefix, {"q": words}, None)
        elif kind == "other key":
            self._publish(prefix, {"q": words}, lambda m: self.other.seal({**m, **signed}))
        elif kind == "oversized":
            self._publish(prefix, {"q": np.zeros(4 * words.size, words.dtype)}, seal)
        elif kind == "wrong shape":
            self._publish(prefix, {"q": np.zeros((1, 3), words.dtype)}, seal)
        elif kind == "wrong dtype":
            self._publish(prefix, {"q": words.astype(np.float32)}, seal)
        elif kind == "replay":
            old_prefix, manifest = self.first
            tree, _ = self.store.fetch(old_prefix, manifest)
            self._publish(prefix, tree, None, manifest=manifest)

    def _random(self, like):
        import numpy as np

        return self.words.integers(0, 2**32, like.shape, dtype=np.uint64).astype(like.dtype)

    def close(self) -> None:
        for job in self.jobs:
            job.result(timeout=60)  # an attacker's own failure is the script's
        self.side.close()
        self.uploader.shutdown(wait=False, cancel_futures=True)


def report(args, procs, injected, starts, store_url, not_injected=0):
    """Prints the summary and the replay check; exits 1 if the replay differs, a planned upload is
    neither merged nor left out, or a party failed."""
    import dataclasses

    import jax
    import numpy as np

    from jaxblock.fed import exchange, schedule, secagg, transforms, validate
    from jaxblock.net import receive, secure, signing, transport
    from jaxblock.run import checkpoint, compare, experiment

    config = experiment.read_config(os.path.join(args.workdir, "server"))
    run = experiment.setup(config)
    fed, part = run.fed, run.partition
    store = transport.Store(store_url)
    rows = compare.read_jsonl(os.path.join(args.workdir, "server", "metrics.jsonl"))
    algo = run.algorithm
    plans = {t: {"block": algo.choose_block(fed, t, part.num_blocks), "clients": algo.participants(fed, t)}
             for t in range(fed.rounds)}  # fmt: skip
    sa = secagg.of(fed.transforms)
    server_keys = signing.Keys(os.path.join(args.workdir, "keys", "server"))

    def chain_for(r: int, merged: list[int]) -> tuple:
        """The run's transforms as the server ran them in round r: secure aggregation unmasks again
        from the store (the round's parties as the plan it published names them)."""
        if sa is None:
            return fed.transforms
        parties = secure.parties_of(store.get_json(transport.plan_key(r)))

        def unmasker(round_, masked):
            total, survivors = secure.replay_unmask(store, sa, round_, parties, masked, server_keys)
            if survivors != sorted(merged):
                raise AssertionError(f"round {round_}: the replay's survivors {survivors}, the log's merged {merged}")
            return total, survivors

        return tuple(dataclasses.replace(t, unmasker=unmasker) if t is sa else t for t in fed.transforms)

    params, lost, accounted, unmasked = run.params, {}, {}, 0
    for row in rows:  # exactly the accepted deltas, in the server's order, with its own functions
        for r, c, _ in row["left_out"]:
            lost.setdefault(r, []).append(c)
            accounted.setdefault(r, set()).add(c)
        for r, merged in row["merged"]:
            accounted.setdefault(r, set()).update(merged)
            if not merged:
                continue
            block = plans[r]["block"]
            shapes = jax.eval_shape(lambda b=block, p=params: part.block(p, b))
            expected = transforms.wire_leaves(fed.transforms, shapes, fed.wire_dtype)
            deltas = [
                receive.read_checked(store, transport.delta_prefix(r, c), store.get_json(
                    f"{transport.delta_prefix(r, c)}/COMMIT"), expected, validate.upload_bytes(expected))
                for c in merged
            ]  # fmt: skip
            weights = schedule.merge_weights(fed, plans[r]["clients"], merged, run.client_sizes, lost.get(r, []))
            dense = transforms.reduce(
                chain_for(r, merged), dict(zip(merged, deltas, strict=True)), shapes, lambda d: list(d.values()), r
            )
            unmasked += sa is not None
            agg = jax.device_get(exchange.on_wire(run.algorithm.reduce(dense, weights, merged), fed.wire_dtype))
            params = run.algorithm.apply(params, part, block, agg, fed.eta)
    # nothing lost: every planned upload of every round the server merged is merged or left out with a reason
    unaccounted = {r: sorted(set(plans[r]["clients"]) - who) for r, who in sorted(accounted.items())}
    unaccounted = {r: cs for r, cs in unaccounted.items() if cs}
    mgr = checkpoint.manager(os.path.join(args.workdir, "server"), read_only=True)
    state, _, _ = checkpoint.restore_newest(mgr, run.abstract_params(), part)
    mine, theirs = jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(jax.device_get(state["params"]))
    equal = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(mine, theirs, strict=True))
    reasons = collections.Counter(why.split(":")[0] for row in rows for _, _, why in row["left_out"])
    failed = {who: p.returncode for who, p in procs.items() if p.returncode}
    summary = {
        "clients": args.clients,
        "secure aggregation": bool(sa),
        "rounds completed": f"{state['round']} of {fed.rounds}",
        "faults injected": dict(injected),
        "faults survived": sum(injected.values()) if not failed and state["round"] == fed.rounds else 0,
        "client kills not injected (dropout budget)": not_injected,
        "restarts": {k: v - 1 for k, v in starts.items() if v > 1},
        "uploads left out by reason": dict(sorted(reasons.items())),
        "planned uploads neither merged nor left out": {str(r): cs for r, cs in unaccounted.items()},
        "rounds unmasked again from the store": unmasked,
        "final model equals a replay of the accepted deltas": equal,
        "parties that failed": failed,
    }
    if sa is None:
        del summary["secure aggregation"], summary["rounds unmasked again from the store"]
        del summary["client kills not injected (dropout budget)"]
    print(json.dumps(summary, indent=1))
    with open(os.path.join(args.workdir, "chaos.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if not equal or failed or unaccounted or state["round"] != fed.rounds:
        sys.exit(1)


if __name__ == "__main__":
    main()
