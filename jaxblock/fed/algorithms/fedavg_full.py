"""Fed full FT: FedBCD over one block holding every parameter (FedAvg with local AdamW)."""

from jaxblock.fed import blocks
from jaxblock.fed.algorithms.base import Algorithm


class FedAvgFull(Algorithm):
    name = "fedavg_full"

    def partition(self, params, layer_partition):
        return blocks.full_partition(params)
