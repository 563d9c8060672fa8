"""The exchange through a TensorStore store, in one process: the simulator's default (`comm.store`,
memory:// unless set), so that every simulated run exercises the store's wire format.

Clients publish their uploads under `round/<r>/client/<c>/`, the server fetches them, runs the one
server side (`fed.exchange.server_side`), publishes what it sends down under
`round/<r>/aggregate/<at>/`, and the clients fetch that; the round's keys are deleted afterwards.
The multi-process deployment splits these same steps between `net.server` and `net.client`.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxblock.fed.exchange import Result, Server
from jaxblock.net import transport

WAIT_S = 60.0  # one process: everything is already written when it is read


@dataclasses.dataclass(frozen=True)
class ThroughStore:
    store: transport.Store
    wire_dtype: str = "float32"

    def __call__(self, round_: int, at: int, uploads: dict[int, dict], server: Server) -> Result:
        for c, u in uploads.items():
            self.store.publish(transport.delta_prefix(round_, c), jax.device_get(u), self.wire_dtype)
        received = {
            c: self.store.wait_fetch(transport.delta_prefix(round_, c), WAIT_S, f"round {round_}: client {c}")[0]
            for c in uploads
        }
        result = server(received)
        prefix = transport.aggregate_prefix(round_, at)
        self.store.publish(prefix, {} if result.down is None else jax.device_get(result.down), self.wire_dtype)
        down, _ = self.store.wait_fetch(prefix, WAIT_S, f"round {round_}: aggregate")
        self.store.delete_round(round_)
        return dataclasses.replace(result, down=None if result.down is None else down)
