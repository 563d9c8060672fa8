"""The federated settings every method shares (`FedConfig`), and the base of each method's own.

An algorithm's own settings are a frozen dataclass subclass of `Options` declared beside it in
`fed/algorithms/` (Levanter's registered config subclasses): FedBuff's buffer, ParaBlock's
staleness. Update transforms (top-k, ...) are settings objects of their own (`fed/transforms.py`).
Config keys stay flat, as users type them (`--config.staleness=2`): `algorithms.configure` splits
them, and `FedConfig.flat()` gives them back (checkpoint metadata and summaries keep that form).
"""

from __future__ import annotations

import dataclasses
import math

SCHEDULES = ("random", "random_norepeat", "sequential", "reverse", "cyclic", "gradient")
LR_DECAYS = ("none", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class Options:
    """An algorithm's own settings; FedBCD has none. Every delta is merged in the round it was made."""

    # Late deltas (ParaBlock's per-client staleness, FedBuff): weight (1 + tau)^-a, a = staleness_weight
    # (None: the algorithm's default), and the lateness beyond which a delta is dropped (0: no limit).
    staleness_weight = None
    max_staleness = 0

    def check(self, fed: FedConfig) -> None:
        """ValueError, in one line, for a setting that does not fit the run (called by FedConfig)."""

    def stalenesses(self, num_clients: int) -> tuple[int, ...]:
        """Each client's rounds between an upload and its merge."""
        return (0,) * num_clients


@dataclasses.dataclass(frozen=True)
class FedConfig:
    algorithm: str = "parablock"  # a name of `algorithms.REGISTRY` (fed/algorithms/)
    rounds: int = 10  # T
    num_clients: int = 10  # N
    local_steps: int = 10  # K
    eta: float = 1.0  # global (server) learning rate
    participation: float = 1.0  # fraction of clients sampled each round (M = ceil(fraction * N))
    aggregation: str = "uniform"  # 'uniform' or 'samples' (weights proportional to client sizes)
    schedule: str = "random"  # which block each round trains, see `schedule.choose_block`
    wire_dtype: str = "float32"  # deltas and aggregates are rounded to this on the wire ('bfloat16')
    # The local learning rate across rounds: round t trains with eta_l * lr_factor(fed, t), see there.
    lr_decay: str = "none"  # 'none', 'linear' or 'cosine'
    lr_decay_alpha: float = 0.0  # the factor that the decay reaches at t = T
    seed: int = 0
    options: Options = Options()  # the algorithm's own settings (its `Options` subclass)
    transforms: tuple = ()  # update transforms, applied to an upload in this order (fed/transforms.py)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.aggregation not in ("uniform", "samples"):
            raise ValueError(f"aggregation={self.aggregation!r}: choose 'uniform' or 'samples'")
        for name in ("rounds", "num_clients", "local_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: need at least 1")
        if not 0 < self.participation <= 1:
            raise ValueError(f"participation={self.participation}: must be in (0, 1]")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay={self.lr_decay!r}: choose one of {', '.join(LR_DECAYS)}")
        if not 0 <= self.lr_decay_alpha <= 1:
            raise ValueError(f"lr_decay_alpha={self.lr_decay_alpha}: must be in [0, 1]")
        if self.wire_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"wire_dtype={self.wire_dtype!r}: choose 'float32' or 'bfloat16'")
        self.options.check(self)

    @property
    def stalenesses(self) -> tuple[int, ...]:
        """Each client's rounds between an upload and its merge: s_i for ParaBlock, 0 for the others."""
        return self.options.stalenesses(self.num_clients)

    @property
    def effective_staleness(self) -> int:
        """The most rounds an upload takes to be merged (the final flush drains that many)."""
        return max(self.stalenesses)

    @property
    def clients_per_round(self) -> int:
        return max(1, math.ceil(self.participation * self.num_clients - 1e-9))

    def flat(self) -> dict:
        """Every setting as the flat config keys users type (options and transforms inlined)."""
        own = ("options", "transforms")
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in own}
        options = dataclasses.asdict(self.options)
        transforms = {k: v for t in self.transforms for k, v in t.settings().items()}
        return {**shared, **options, **transforms}
