"""Timelines: the simulator's modelled rows per client per round, their totals and the run's
modelled wall time, and the writer both the simulator and the clients append rows with."""

from __future__ import annotations

import json
import os
import threading

from jaxblock.fed import wire
from jaxblock.fed.blocks import Partition
from jaxblock.fed.config import FedConfig
from jaxblock.fed.wire import Link


def modeled_timeline(fed: FedConfig, partition: Partition, links: list[Link], history: list[dict]) -> list[dict]:
    """Timeline rows of round `history[-1]` for the one-process simulator, one per client.

    Compute is measured (clients run one after another; with `sim.client_batch` > 1 each client of a
    batch is given its share of the batch's time, so the modelled compute is the machine time per
    client, and differs from one by one by the batching speed-up); communication is modelled from the
    exact bytes each client sends and receives over its link (the rounds' `bytes_up` and
    `bytes_down`, from what each algorithm puts on the wire). Client i's exchange of round r's delta
    (its upload and the download of round r's aggregate) overlaps the compute of its next s_i rounds
    and ends in round r + s_i: the row of round t shows the exchange of round t - s_i, exposed as
    far as those s_i rounds' compute does not cover it. With s_i = 0 (FedBCD, FedCyBGD, ...) the
    exchange follows the compute and is all exposed. The exchanges of the last s_i rounds end after
    the last round: `flush_timeline`'s rows. An asynchronous algorithm (FedBuff) models its own rows.
    """
    m = history[-1]
    if "modeled_rows" in m:
        return m["modeled_rows"]
    rows = []
    for c in range(fed.num_clients):
        s = fed.stalenesses[c]
        up, down, comm_s = _exchange(fed, partition, links[c], history[-1 - s], c) if len(history) > s else (0, 0, 0.0)
        covered = sum(_of(h["client_compute_s"], c, 0.0) for h in history[len(history) - s :]) if s else 0.0
        rows.append(
            {"round": m["round"], "client": c, "block": m["block"], "compute_s": _of(m["client_compute_s"], c, 0.0),
             "comm_s": comm_s, "exposed_wait_s": max(0.0, comm_s - covered), "bytes_up": up, "bytes_down": down,
             "modeled": True}
        )  # fmt: skip
    return rows


def flush_timeline(fed: FedConfig, partition: Partition, links: list[Link], history: list[dict]) -> list[dict]:
    """The final flush's timeline rows (`"round": "flush"`, as a deployed client writes), one per client
    with s_i >= 1, after the rows of the whole run `history`: the exchanges of its last s_i rounds,
    which end after the last round (round T-1's upload, the downloads of the final aggregates).

    No compute runs in the flush: each exchange is exposed as far as the compute of the rounds after
    its own that did run does not cover it (as `modeled_timeline` would show it, with the rounds T,
    T+1, ... computing nothing), so with s_i = 1 all of it. FedBCD and the other s = 0 methods have
    no flush; an asynchronous run (FedBuff) ends with its last apply: none either.
    """
    if not history or "modeled_rows" in history[-1]:
        return []
    rows, last = [], len(history)
    for c in range(fed.num_clients):
        s = fed.stalenesses[c]
        if not s:
            continue
        row = {"round": "flush", "client": c, "block": history[-1]["block"], "compute_s": 0.0, "comm_s": 0.0,
               "exposed_wait_s": 0.0, "bytes_up": 0, "bytes_down": 0, "modeled": True}  # fmt: skip
        for r in range(max(0, last - s), last):
            up, down, comm_s = _exchange(fed, partition, links[c], history[r], c)
            covered = sum(_of(h["client_compute_s"], c, 0.0) for h in history[r + 1 :])
            row["bytes_up"] += up
            row["bytes_down"] += down
            row["comm_s"] += comm_s
            row["exposed_wait_s"] += max(0.0, comm_s - covered)
        rows.append(row)
    return rows


def _exchange(fed: FedConfig, partition: Partition, link: Link, ex: dict, client: int) -> tuple[int, int, float]:
    """(bytes up, bytes down, seconds over `link`) of `client`'s exchange of round `ex` (its metrics)."""
    itemsize = wire.WIRE_DTYPES[fed.wire_dtype].itemsize
    n = partition.blocks[ex["block"]].params  # metrics written before params_up existed
    ups = ex.get("bytes_up") or [itemsize * v for v in ex.get("params_up", [n] * len(ex["clients"]))]
    up = dict(zip(ex["clients"], ups, strict=True)).get(client, 0)
    if "bytes_down" in ex:
        down = ex["bytes_down"]
    else:  # values: an int for every client, or per client
        down = ex.get("params_down", n)
        down = {k: itemsize * v for k, v in down.items()} if isinstance(down, dict) else itemsize * down
    down = _of(down, client, 0) if isinstance(down, dict) else down
    return up, down, (link.seconds(up) if up else 0.0) + (link.seconds(down) if down else 0.0)


def _of(per_client: dict, client: int, default):
    """A per-client value of a metrics dict, whose keys are ints when fresh and strings once read back."""
    return per_client.get(client, per_client.get(str(client), default))


def replay(fed: FedConfig, partition: Partition, links: list[Link], history: list[dict]) -> list[dict]:
    """Every round's modelled timeline rows of a whole run's metrics and its flush's, as training writes
    them (metrics written before the flush had rows replay with them too)."""
    rows = [row for i in range(len(history)) for row in modeled_timeline(fed, partition, links, history[: i + 1])]
    return rows + flush_timeline(fed, partition, links, history)


def slowest_per_round(rows: list[dict]) -> tuple[float, float]:
    """(compute, exposed) seconds summed over rounds of each round's slowest client (compute +
    exposed communication): a run's modelled wall time, split. Clients run in parallel; a FedCyBGD
    turn has one client working, so its rounds add up to the sum of the turns."""
    slowest: dict = {}
    for r in rows:
        if r["compute_s"] + r["exposed_wait_s"] >= sum(slowest.get(r["round"], (0.0, 0.0))):
            slowest[r["round"]] = (r["compute_s"], r["exposed_wait_s"])
    return sum(c for c, _ in slowest.values()), sum(e for _, e in slowest.values())


def modeled_wall_s(timeline_path: str, history: list[dict]) -> float:
    """The run's modelled wall time: an asynchronous run's clock at its last apply; else
    `slowest_per_round` of its timeline."""
    if history and "modeled_time_s" in history[-1]:
        return float(history[-1]["modeled_time_s"])
    if not os.path.exists(timeline_path):
        return 0.0
    with open(timeline_path) as f:
        return float(sum(slowest_per_round([json.loads(line) for line in f])))


class TimelineWriter:
    """Appends timeline rows as JSON lines (safe across threads; one line per write across processes)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def __call__(self, row: dict) -> None:
        line = json.dumps(row) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
