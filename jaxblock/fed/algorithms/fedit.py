"""FedIT (Zhang et al. 2024): FedAvg of LoRA adapters, A and B averaged separately every round."""

import jax

from jaxblock.fed import blocks
from jaxblock.fed.algorithms.base import Algorithm
from jaxblock.model import lora as lora_lib


class FedIT(Algorithm):
    """The server model carries adapters (A from `lora.init_seed`, B = 0) on frozen base weights;
    every client trains A and B; the server adds the mean delta of each (so A and B become
    mean(A_i) and mean(B_i), and the model gets mean(B) mean(A), not mean(B A)). Only the adapters
    cross the wire."""

    name = "fedit"
    uses_lora = True
    trains = lora_lib.ADAPTERS  # a regex over leaf paths: the one block that trains

    def __post_init__(self):
        if self.cfg is None or self.lora is None:
            raise ValueError(f"algorithm={self.name!r} needs the model config and a lora section")
        if self.lora.client_ranks:  # averaging A and B needs one shape
            raise ValueError(f"lora.client_ranks is FLoRA's: algorithm={self.name!r} gives every client lora.rank")

    def server_params(self, params):
        return lora_lib.add(self.cfg, params, self.lora, jax.random.key(self.lora.init_seed))

    def partition(self, params, layer_partition):
        return blocks.partition(params, [(self.trains, "adapters"), (".*", None)])
