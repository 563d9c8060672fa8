"""The federated algorithms, one module each; `loop.run_round` is the round loop they share.

Each module says only how its method differs from FedBCD (`base.Algorithm`'s defaults).
"""

from jaxblock.fed.algorithms.base import Algorithm, apply_aggregate, axpy, weighted_sum
from jaxblock.fed.algorithms.fedavg_full import FedAvgFull
from jaxblock.fed.algorithms.fedbcd import FedBCD
from jaxblock.fed.algorithms.fedbuff import FedBuff
from jaxblock.fed.algorithms.fedcybgd import FedCyBGD
from jaxblock.fed.algorithms.fedit import FedIT
from jaxblock.fed.algorithms.ffa_lora import FFALoRA
from jaxblock.fed.algorithms.flora import FLoRA
from jaxblock.fed.algorithms.parablock import ParaBlock

REGISTRY: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (ParaBlock, FedBCD, FedAvgFull, FedIT, FFALoRA, FLoRA, FedCyBGD, FedBuff)
}
NAMES = tuple(REGISTRY)


def make(fed, cfg=None, lora=None) -> Algorithm:
    """The algorithm `fed.algorithm`, bound to the run (LoRA methods need `cfg` and `lora`)."""
    return REGISTRY[fed.algorithm](fed, cfg, lora)


__all__ = ["NAMES", "REGISTRY", "Algorithm", "apply_aggregate", "axpy", "make", "weighted_sum"]
