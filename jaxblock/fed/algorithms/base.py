"""What every algorithm shares, with FedBCD's behaviour as the default of each hook.

A federated method is a subclass of `Algorithm` that overrides only the hooks where the paper says
it differs from FedBCD; `loop.run_round` is the one round loop that calls them:

    server_params   the server model at round 0, from the base model (LoRA: adapters added)
    partition       which leaves train, as blocks (FedBCD: the layer blocks of `config.blocks`)
    participants    who trains in round t (FedBCD: the seeded sample; FedCyBGD: client t mod N)
    choose_block    which block round t trains (FedBCD: `schedule`; FedCyBGD: the client's own)
    staleness       rounds between an upload and its aggregation (FedBCD 0, ParaBlock s or s_i)
    own_weight      the weight of a client's own pending delta in its model until it is merged
                    (FedBCD, Algorithm 2: 1; ParaBlock's `self_weight`)
    client_model    the model a client trains from (FLoRA: the server's plus a fresh adapter)
    upload          what a client sends up (FedBCD: its block delta)
    reduce          what the server sends down, from the uploads (FedBCD: their weighted mean)
    private_reduce  reduce with client-level DP's noise (on the weighted sum)
    apply           how the server and every client fold that into the model (FedBCD: block += eta * mean)
    wire_params     how many values cross the wire, up per client and down, for the link model

An algorithm's own settings are its `Options` (a frozen dataclass, `fed/config.py`), registered
with it by name in `algorithms.REGISTRY`; `transforms_ok` says whether update transforms (top-k)
may wrap its uploads. An asynchronous method (FedBuff) replaces the round itself:
`asynchronous = True` and its own `init_state(params, links)` and `run_round(trainer, state)`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxblock.fed import blocks as blocks_lib
from jaxblock.fed import schedule
from jaxblock.fed.config import Options
from jaxblock.fed.merge import apply_aggregate, weighted_sum
from jaxblock.model import lora as lora_lib
from jaxblock.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """FedBCD: every sampled client trains block b_t for K steps; the server adds the mean delta to
    b_t in the same round (communication after computation)."""

    fed: object  # FedConfig
    cfg: ModelConfig | None = None  # the model (LoRA methods need its dims and lora_alpha)
    lora: lora_lib.LoraConfig | None = None

    name = "fedbcd"
    Options = Options  # its own settings: FedBCD has none
    uses_lora = False
    turns = False  # clients take turns, one per round, each training a block of its own (FedCyBGD)
    transforms_ok = False  # update transforms (top-k) may wrap its uploads (the paper's Table 10: FedBCD, ParaBlock)
    asynchronous = False  # True: the algorithm runs its own rounds (init_state, run_round)
    uploads_deltas = True  # its upload is a delta the server sums (client-level DP clips and noises it)

    def __post_init__(self):  # subclasses check what they need here (the dataclass __init__ calls it)
        pass

    def server_params(self, params: dict) -> dict:
        return params

    def partition(self, params: dict, layer_partition: blocks_lib.Partition) -> blocks_lib.Partition:
        return layer_partition

    def own_weight(self, client: int, round_: int, client_sizes=None) -> float:
        """lambda in the lean form: a client's model is the server's plus eta * sum_r lambda_r * its own
        pending delta of round r (`lean.client_params`). `client_sizes`: for weights by sample count."""
        return 1.0

    def client_model(self, params: dict, client: int, round_: int) -> dict:
        return params

    def upload(self, block: dict, delta: dict) -> dict:
        return delta

    def reduce(self, uploads: list[dict], weights: np.ndarray, clients: list[int]) -> dict:
        return weighted_sum(uploads, jnp.asarray(weights, jnp.float32))

    def private_reduce(self, uploads: list[dict], weights: np.ndarray, clients: list[int], noise) -> dict:
        """`reduce` with the Gaussian noise of client-level DP: `noise(tree)` draws N(0, (zC)^2) per
        coordinate. A weighted sum gets it on the sum, so the mean (weights 1/M) gets noise / M."""
        down = self.reduce(uploads, weights, clients)
        scale = float(weights[0]) if len(weights) else 0.0  # DP weights are all 1/M
        return jax.tree.map(lambda d, n: d + scale * n, down, noise(down))

    def apply(self, params: dict, partition: blocks_lib.Partition, block_id: int, down: dict, eta: float) -> dict:
        return apply_aggregate(params, partition, block_id, down, eta)

    # Who trains and what, as classmethods of the settings alone: the server plans rounds without
    # building the algorithm (a LoRA method needs the model config for that).
    @classmethod
    def participants(cls, fed, round_: int) -> list[int]:
        return schedule.participants(fed, round_)

    @classmethod
    def choose_block(cls, fed, round_: int, num_blocks: int, gradient_norms=None) -> int:
        return schedule.choose_block(fed, round_, num_blocks, gradient_norms)

    def wire_params(
        self, partition: blocks_lib.Partition, block_id: int, clients: list[int], round_: int
    ) -> tuple[list[int], int | dict[int, int]]:
        """(values each participant uploads, values a client downloads: an int for every client,
        or {client: values} for the clients that download anything) in round `round_`."""
        n = partition.blocks[block_id].params
        return [n] * len(clients), n
