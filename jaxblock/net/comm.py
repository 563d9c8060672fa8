"""The deployment's entry points: the server loop (`net/server.py`), a client's loop
(`net/client.py`) and both in threads of one process (`run_in_threads`, for benchmarks and tests).
The protocol they speak, and why cleanup is safe, is written down in `net/protocol.py`."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

from jaxblock.fed import algorithms, loop, validate
from jaxblock.fed.blocks import Partition
from jaxblock.fed.config import FedConfig
from jaxblock.fed.wire import Link
from jaxblock.net import signing, transport
from jaxblock.net.client import run_client
from jaxblock.net.protocol import CommConfig, check_supported, final_merge, party
from jaxblock.net.server import serve
from jaxblock.net.transport import Store

__all__ = ["CommConfig", "check_supported", "final_merge", "party", "run_client", "run_in_threads", "serve"]


def run_in_threads(
    fed: FedConfig,
    params: dict,
    partition: Partition,
    local_train: Callable,
    batches_fn: loop.BatchesFn,
    store: Store,
    comm: CommConfig,
    links: list[Link] | None = None,
    *,
    clients: list[int] | None = None,
    client_sizes=None,
    policy: validate.Policy | None = None,
    on_round: Callable[[dict], None] | None = None,
    on_merge: Callable[[dict], None] | None = None,
    on_aggregate: Callable[[dict], None] | None = None,
    on_absorb: Callable[[int, int, dict], None] | None = None,
    algorithm: algorithms.Algorithm | None = None,
) -> tuple[dict, dict[int, dict]]:
    """The server and each client in threads of this process (benchmarks, tests, one-box runs).

    Returns (the server's theta_T, {client: its final model replica}). The first client error,
    or the server's, is re-raised. With `comm.keys` set, it is a directory of scripts/keys.py's: each
    party signs with its own subdirectory (server/, client_<i>/).
    """
    clients = list(range(fed.num_clients)) if clients is None else clients
    links = links or [Link()] * fed.num_clients
    replicas: dict[int, dict] = {}
    errors: list[BaseException] = []

    def client_main(i: int) -> None:
        try:
            absorbed = None if on_absorb is None else functools.partial(on_absorb, i)
            mine = party(comm, signing.client_name(i))
            replicas[i] = run_client(
                i, fed, params, partition, local_train, batches_fn, transport.Store(store.source, store.context), mine,
                links[i], on_round=on_round, on_absorb=absorbed, algorithm=algorithm, client_sizes=client_sizes,
            )  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=client_main, args=(i,), name=f"client-{i}") for i in clients]
    for th in threads:
        th.start()
    try:
        server_params = serve(
            fed, params, partition, store, party(comm, "server"), client_sizes=client_sizes, policy=policy,
            on_merge=on_merge, on_aggregate=on_aggregate, algorithm=algorithm,
        )  # fmt: skip
    finally:
        for th in threads:
            th.join()
    if errors:
        raise errors[0]
    return server_params, replicas


# ----------------------------------------------------------------------------- timelines
