"""The federated algorithms, one module each, registered by name; `fed.loop.run_round` is the round
loop they share.

Each module says only how its method differs from FedBCD (`base.Algorithm`'s defaults), and owns
its settings (`Algorithm.Options`). `configure(**flat)` builds the run's `FedConfig` from the flat
keys users type (`algorithm='parablock', staleness=2, compression='topk', ...`).
"""

from __future__ import annotations

import dataclasses

from jaxblock.fed import transforms
from jaxblock.fed.algorithms.base import Algorithm
from jaxblock.fed.algorithms.fedavg_full import FedAvgFull
from jaxblock.fed.algorithms.fedbcd import FedBCD
from jaxblock.fed.algorithms.fedbuff import FedBuff
from jaxblock.fed.algorithms.fedcybgd import FedCyBGD
from jaxblock.fed.algorithms.fedit import FedIT
from jaxblock.fed.algorithms.ffa_lora import FFALoRA
from jaxblock.fed.algorithms.flora import FLoRA
from jaxblock.fed.algorithms.parablock import ParaBlock
from jaxblock.fed.config import FedConfig
from jaxblock.fed.merge import apply_aggregate, axpy, weighted_sum

REGISTRY: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (ParaBlock, FedBCD, FedAvgFull, FedIT, FFALoRA, FLoRA, FedCyBGD, FedBuff)
}
NAMES = tuple(REGISTRY)
SHARED = tuple(f.name for f in dataclasses.fields(FedConfig) if f.name not in ("options", "transforms"))
# Every algorithm's own keys (a key may be several algorithms': staleness_weight is ParaBlock's and FedBuff's)
OWN_KEYS = {f.name for cls in REGISTRY.values() for f in dataclasses.fields(cls.Options)}


def make(fed: FedConfig, cfg=None, lora=None) -> Algorithm:
    """The algorithm `fed.algorithm`, bound to the run (LoRA methods need `cfg` and `lora`)."""
    cls = REGISTRY[fed.algorithm]
    if type(fed.options) is not cls.Options:  # e.g. dataclasses.replace(fed, algorithm=...) kept the old options
        raise ValueError(
            f"algorithm={fed.algorithm!r} takes {cls.Options.__name__}, not {type(fed.options).__name__}: "
            f"build the settings with algorithms.configure(**{{**fed.flat(), 'algorithm': ...}})"
        )
    return cls(fed, cfg, lora)


def configure(**settings) -> FedConfig:
    """The `FedConfig` of flat settings: the shared ones, the algorithm's own (`Options`) and the
    update transforms'. Another algorithm's keys are ignored (a run config holds every key); a
    key nobody reads is a one-line error."""
    name = settings.get("algorithm", FedConfig.algorithm)
    if name not in REGISTRY:
        raise ValueError(f"algorithm={name!r}: choose one of {', '.join(NAMES)}")
    cls = REGISTRY[name]
    unknown = set(settings) - set(SHARED) - OWN_KEYS - set(transforms.SETTINGS)
    if unknown:
        raise ValueError(f"unknown federated setting(s) {sorted(unknown)}")
    own = {f.name for f in dataclasses.fields(cls.Options)}
    lists = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}  # a config's lists
    for key in sorted(set(lists) & OWN_KEYS - own):  # another algorithm's key, set: it would be ignored
        owners = [c for c in REGISTRY.values() if key in {f.name for f in dataclasses.fields(c.Options)}]
        if all(lists[key] != _default(c.Options, key) for c in owners):
            value = list(lists[key]) if isinstance(lists[key], tuple) else lists[key]
            raise ValueError(f"{key}={value}: a setting of {' and '.join(c.name for c in owners)}, which "
                             f"algorithm={name!r} does not use")  # fmt: skip
    options = cls.Options(**{k: v for k, v in lists.items() if k in own})
    chain = transforms.from_settings(**{k: v for k, v in lists.items() if k in transforms.SETTINGS})
    if chain and not cls.transforms_ok:
        takes = " and ".join(c.name for c in REGISTRY.values() if c.transforms_ok)
        raise ValueError(f"compression={settings['compression']!r}: update transforms are for {takes}, not {name}")
    shared = {k: v for k, v in lists.items() if k in SHARED}
    return FedConfig(**shared, options=options, transforms=chain)


def _default(options: type, key: str):
    return next(f.default for f in dataclasses.fields(options) if f.name == key)


__all__ = ["NAMES", "REGISTRY", "Algorithm", "apply_aggregate", "axpy", "configure", "make", "weighted_sum"]
