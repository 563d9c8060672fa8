"""The communication runtime: a server loop and a client loop that exchange deltas through a Store.

Each runs in its own OS process (`scripts/server.py`, `scripts/client.py`) or, for benchmarks,
in threads of one process. A client keeps the lean state of `loop.py`: a replica of the
server model, advanced by applying every aggregate with the very function the server uses
(`loop.apply_aggregate`), plus its own pending deltas. Its model is the replica plus eta x its
pending deltas (each x `Algorithm.own_weight`: ParaBlock's self_weight, 1 by default), so server
and clients agree bitwise and the runtime reproduces the one-process
simulator exactly.

ParaBlock round t on a client with staleness s_i (the same for all, or one per client): the main
thread dispatches LocalBlockTraining for b_t (JAX's async dispatch returns at once) while an
upload thread copies Delta_{t-1}^i off the device and publishes it, and a download thread waits
for and fetches the aggregates the server merges at the end of round t (every client's delta of
round r with r + s_c = t). When both the compute and those downloads are done, the client applies
the aggregates to its replica and drops its own deltas among them (Algorithm 2's correction).
Uploads queue in their own thread, so a slow client's upload may take up to s_i rounds without
holding up its compute, and the fast clients never wait for it: the merges they need do not
include it. FedBCD (and FedCyBGD) run the same exchange after the compute, serially. Only block
leaves cross the wire (top-k: int32 indices and values).

Cleanup (unless `keep_rounds`): each client, once it has applied the merges of the end of round u,
writes `round/<u>/ack/<client>`; a client that then sees acks from all `num_clients` clients
deletes `round/<u - S>/` (S = the largest staleness), and after the last merge F = T - 1 + S every
round left. Nobody reads or writes round r = u - S after that:
  - every delta of round r was merged by the end of round r + s_c <= u, so the server read it
    before publishing round u's merges, which precede every ack of u;
  - every aggregate under round r was merged at some u' <= u, and a client acks u only once it
    has applied every merge up to u; its plan was read at the start of round r;
  - each client's acks are written in order, by one thread, so the client whose ack of r
    completed r's set had listed r's acks before anyone could ack u.
The client whose ack lands last sees all of them, so someone always deletes; two clients may
both delete, which is harmless. Deletion needs every client's ack, so a client that never acks
(it died, or runs with keep_rounds) keeps every round from then on: cleanup fails safe. Nobody
waits for it: the server never reads an ack, and a client acks and deletes in a thread of its
own, beside its next computation and its next upload (a file:// delete takes ~0.15 s); it returns
once its uploads and acks are done.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from jaxblock.fed import algorithms, schedule, transforms, validate
from jaxblock.fed.blocks import Partition
from jaxblock.fed.config import FedConfig
from jaxblock.net import receive, signing
from jaxblock.net.transport import Store


@dataclasses.dataclass(frozen=True)
class CommConfig:
    store: str = "memory://"
    timeout_s: float = 600.0  # a client silent this long after a round's first update is left out (see _collect)
    keep_rounds: bool = False  # keep every round's keys (default: clients delete round t once all hold its aggregate)
    keys: str = ""  # this party's key directory (scripts/keys.py); "" = nothing is signed or checked
    server_timeout_s: float = 1800.0  # how long a client waits for a silent server (a restart included)

    def load_keys(self) -> signing.Keys | None:
        return signing.Keys(self.keys) if self.keys else None

    @property
    def server_wait_s(self) -> float:
        """How long a client waits for the server: `server_timeout_s` (time for a killed server to be
        restarted and resume), and at least three times `timeout_s`, as the server itself may first
        wait up to that for its clients (`_collect`) before it publishes the round. A server that
        fails says so in `server/error`, which stops clients at once."""
        return max(self.server_timeout_s, 3 * self.timeout_s)


def check_supported(algorithm: algorithms.Algorithm) -> None:
    fed = algorithm.fed
    if algorithm.asynchronous:
        raise ValueError(f"algorithm={fed.algorithm!r} is asynchronous: net.asynchronous runs it, not these rounds")
    if fed.schedule == "gradient":
        raise ValueError("schedule='gradient' needs the server to see data: use the simulator")


def final_merge(fed: FedConfig) -> int:
    """F: the last round at whose end deltas are merged (the final flush runs the merges T .. F)."""
    return fed.rounds - 1 + fed.effective_staleness


def upload_shapes(algorithm, partition: Partition, params: dict, round_: int, block: int, client: int) -> dict:
    """The shapes of what `client` uploads in round `round_` before any transform (FLoRA: its adapter,
    of its own rank): what the server must receive from it."""

    def upload():
        trained = partition.block(algorithm.client_model(params, client, round_), block)
        return algorithm.upload(trained, trained)

    return _cached(("up", block, client), algorithm, partition, lambda: jax.eval_shape(upload))


def down_shapes(algorithm, partition: Partition, params: dict, round_: int, block: int, clients: list[int]) -> dict:
    """The shapes of what the server sends down for `clients`' uploads (FLoRA: their stacked adapters)."""

    def down():
        ups = [upload_shapes(algorithm, partition, params, round_, block, c) for c in clients]
        weights = np.full(len(clients), 1.0 / len(clients))
        return jax.eval_shape(lambda u: algorithm.reduce(u, weights, clients), ups)

    return _cached(("down", block, tuple(clients)), algorithm, partition, down)


_SHAPES: dict = {}


def _cached(key: tuple, algorithm, partition: Partition, make):
    """`make()`, once per (algorithm, partition, key): a shape is a function of the block and the
    clients, never of the round (FLoRA's rank is the client's), and tracing one (~8 ms) every round on
    the communication thread took CPU from the compute it overlaps. Entries hold their algorithm and
    partition, so an id is never mistaken for a later object's."""
    full = (id(algorithm), id(partition), *key)
    hit = _SHAPES.get(full)
    if hit is None or hit[0] is not algorithm or hit[1] is not partition:
        if len(_SHAPES) > 4096:  # many runs in one process (tests): start again
            _SHAPES.clear()
        hit = _SHAPES[full] = (algorithm, partition, make())
    return hit[2]


def merged_at(fed: FedConfig, t: int, plans: dict) -> list[tuple[int, list[int]]]:
    """[(round r, clients)] merged (not dropped) at the end of round t, from the plans."""
    pieces = schedule.merges_at(fed, t, lambda r: plans[r]["clients"])
    pieces = [(r, schedule.split_late(fed, arrived)[0]) for r, arrived in pieces]
    return [(r, merged) for r, merged in pieces if merged]


def read_aggregate(store: Store, prefix: str, manifest, shapes: dict, wire: str, verify) -> dict:
    """What the server sent down (of `shapes`) read through every check an upload passes."""
    expected = transforms.Transform().wire_leaves(shapes, wire)
    return receive.read_checked(store, prefix, manifest, expected, validate.upload_bytes(expected), verify)


def party(comm: CommConfig, name: str) -> CommConfig:
    """One party's settings in a one-process run: its own key directory under `comm.keys`."""
    return dataclasses.replace(comm, keys=os.path.join(comm.keys, name)) if comm.keys else comm
