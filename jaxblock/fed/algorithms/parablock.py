"""ParaBlock (paper Algorithm 2): FedBCD whose exchange of round t's deltas overlaps round t+1's
compute. The only difference is when a delta is aggregated."""

from __future__ import annotations

import dataclasses

from jaxblock.fed import schedule
from jaxblock.fed.algorithms.base import Algorithm
from jaxblock.fed.config import Options


@dataclasses.dataclass(frozen=True)
class ParaBlockOptions(Options):
    # s: round r's deltas are aggregated at the end of round r + s. A tuple gives each client its own
    # s_i (a slow link): client i's delta of round r is merged at the end of r + s_i.
    staleness: int | tuple[int, ...] = 1
    # Weights of late deltas, (1 + tau)^-a with tau the delta's lateness beyond the fastest client's;
    # None = 0, no weights. A delta later than max_staleness (tau > max) is dropped; 0 = no limit.
    staleness_weight: float | None = None
    max_staleness: int = 0
    # The weight of a client's own pending delta in its model until the round's aggregate is merged:
    # 1 = Algorithm 2 (the client trains on its whole un-merged delta), 'w' = the weight that delta
    # gets in the aggregate (w_i, e.g. 1/M: the client holds its own share of the coming aggregate),
    # 0 = the server model (every client of a round trains from the same model), or any number in
    # [0, 1]. The correction stays exact: it takes off self_weight * the own delta and adds the aggregate.
    self_weight: float | str = 1.0

    def __post_init__(self):
        if isinstance(self.self_weight, int) and not isinstance(self.self_weight, bool):  # 1 is 1.0
            object.__setattr__(self, "self_weight", float(self.self_weight))

    def check(self, fed) -> None:
        if isinstance(self.staleness, tuple) and len(self.staleness) != fed.num_clients:
            raise ValueError(f"staleness lists {len(self.staleness)} values for num_clients={fed.num_clients}")
        if min(self.stalenesses(fed.num_clients)) < 1:
            raise ValueError(f"staleness={self.staleness}: ParaBlock needs staleness >= 1 (0 is FedBCD)")
        check_lateness(self)
        w = self.self_weight
        if w != "w" and not (isinstance(w, float) and 0.0 <= w <= 1.0):
            raise ValueError(f"self_weight={w!r}: must be a number in [0, 1] or 'w' (the delta's aggregation weight)")

    def stalenesses(self, num_clients: int) -> tuple[int, ...]:
        s = self.staleness
        return tuple(s) if isinstance(s, tuple) else (s,) * num_clients


def check_lateness(options) -> None:
    """The checks of the late-delta settings ParaBlock and FedBuff share."""
    if options.staleness_weight is not None and not options.staleness_weight >= 0:
        raise ValueError(f"staleness_weight={options.staleness_weight}: must be >= 0")
    if options.max_staleness < 0:
        raise ValueError(f"max_staleness={options.max_staleness}: must be >= 0 (0 = no limit)")


class ParaBlock(Algorithm):
    """Round r's deltas are aggregated at the end of round r + s (s = `staleness` >= 1); the client's
    correction for b_r happens then (the server model now holds the aggregate and the client drops
    its own pending delta, which its model held at `self_weight`). After the last round a flush
    drains the s rounds in flight."""

    name = "parablock"
    Options = ParaBlockOptions
    transforms_ok = True

    def own_weight(self, client: int, round_: int, client_sizes=None) -> float:
        w = self.fed.options.self_weight
        if w != "w":
            return w
        # Its weight among the round's participants (as the server will weigh it, but for uploads
        # rejected later, which the client cannot know), with the late-delta weight if set.
        return float(schedule.merge_weights(self.fed, self.participants(self.fed, round_), [client], client_sizes)[0])
