"""The exchange: how a round's uploads reach the server and its result comes back to the clients.

Every exchange is a callable

    exchange(round_, at, uploads: {client: tree}, server) -> Result

that delivers `uploads` (round `round_`'s, merged at the end of round `at`) to `server` (the one
server side, `server_side`: the transforms' reduce, validation, the algorithm's reduce) and returns
what the clients receive. `InMemory` hands them over (rounded to the wire dtype); `net.exchange`
sends them through a TensorStore store in one process; `net.server` / `net.client` are its two
halves in separate processes, calling the very same `server_side`. So every exchange validates an
upload on one path, and gives the same bits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxblock.fed import transforms as transforms_lib
from jaxblock.fed import validate, wire


@dataclasses.dataclass(frozen=True)
class Result:
    down: dict | None  # what the server sends down (rounded to the wire), None if nothing was merged
    merged: list[int]  # the clients whose uploads it holds
    rejected: dict[int, str]  # {client: reason} of the uploads validation left out
    # public figures of the merge a transform reports (client-level DP's noisy fraction of unclipped
    # uploads), for `transforms.observe`; the deployment publishes them with the aggregate
    report: dict = dataclasses.field(default_factory=dict)


Server = Callable[[dict[int, dict]], Result]


@dataclasses.dataclass(frozen=True)
class InMemory:
    """The simulator's exchange: the uploads as the wire rounds them, the result as it comes back."""

    wire_dtype: str = "float32"

    def __call__(self, round_: int, at: int, uploads: dict[int, dict], server: Server) -> Result:
        return server({c: on_wire(u, self.wire_dtype) for c, u in uploads.items()})


def on_wire(tree: dict, wire_dtype: str) -> dict:
    return tree if wire_dtype == "float32" else wire.to_wire(tree, wire_dtype)


def server_side(
    algorithm,
    round_: int,
    like: dict,
    weights_of: Callable[[list[int], list[int]], np.ndarray],
    policy: validate.Policy,
    transforms: tuple | None = None,
    announced: dict | None = None,
) -> Server:
    """The server's side of round `round_`'s merge, for every exchange: the transforms read the
    uploads back (`like`: a dense upload's shapes), validation screens them (`on_bad_update='stop'`
    raises before anything is merged), and the algorithm reduces the accepted ones with
    `weights_of(accepted, rejected)`. The result is rounded to the wire dtype. `transforms`: the
    run's (`fed.transforms`) as this exchange runs them (the deployment's secure aggregation);
    `announced`: what the server published with round `round_`'s plan (`transforms.announce`), which
    sets them for the round (client-level DP's adaptive clip norm, its noise and its norm bound)."""
    fed = algorithm.fed
    chain = fed.transforms if transforms is None else transforms
    if announced:  # the round's transforms (their reduce, validation and aggregate)
        chain = transforms_lib.for_round(chain, announced)
        policy = transforms_lib.policy(chain, policy)
    merging = transforms_lib.for_round(fed.transforms, announced) if announced else fed.transforms

    def server(received: dict[int, dict]) -> Result:
        def reduce(dense: dict[int, dict]) -> Result:
            bad = validate.screen(dense, policy)
            validate.stop_if_asked(policy, round_, bad)
            # An upload a transform did not pass on (secure aggregation: not in the unmasked sum) is
            # left out by name, so that the weights renormalise over those merged.
            bad.update({c: "not passed on: outside the round's secure aggregation" for c in received if c not in dense})
            kept = [c for c in dense if c not in bad]
            if not kept:
                return Result(None, [], bad)
            uploads, weights = [dense[c] for c in kept], weights_of(kept, list(bad))
            down = transforms_lib.aggregate(merging, algorithm, uploads, weights, kept, round_)
            return Result(on_wire(down, fed.wire_dtype), kept, bad)

        return transforms_lib.reduce(chain, received, like, reduce, round_)

    return server
