"""FLoRA (Wang et al. 2024d): fresh adapters every round, merged into the base weights by stacking.

Round t: client i starts from the server's merged base with a new adapter of its own rank r_i (A
from a seed of (lora.init_seed, t, i), B = 0) and trains it. It uploads the trained adapter; the
server stacks them, A_i scaled by p_i * alpha / r_i, along the rank axis (rank sum_i r_i), which
makes the stacked product exactly sum_i p_i (alpha / r_i) A_i B_i, whatever the ranks. It sends the
stack down and every model does W += eta * A_stack @ B_stack. The download grows with the number
of clients: the cost the paper measures.
"""

import jax

from jaxblock.fed import blocks
from jaxblock.fed.algorithms.base import Algorithm
from jaxblock.model import lora as lora_lib


class FLoRA(Algorithm):
    name = "flora"
    uses_lora = True
    uploads_deltas = False  # the trained adapter itself, stacked (no client-level DP: privacy.check)

    def __post_init__(self):
        if self.cfg is None or self.lora is None:
            raise ValueError("algorithm='flora' needs the model config and a lora section")
        if self.lora.client_ranks and len(self.lora.client_ranks) != self.fed.num_clients:
            raise ValueError(
                f"lora.client_ranks has {len(self.lora.client_ranks)} ranks for num_clients={self.fed.num_clients}"
            )

    def rank(self, client: int) -> int:
        return self.lora.rank_of(client)

    def client_model(self, params, client, round_):
        key = jax.random.key(self.lora.init_seed)
        key = jax.random.fold_in(jax.random.fold_in(key, round_), client)
        return lora_lib.add(self.cfg, params, self.lora, key, self.rank(client))

    def partition(self, params, layer_partition):
        # Labels only depend on the tree's structure; the block's sizes are client 0's rank
        # (`wire_params` counts each client's own).
        adapters = jax.eval_shape(lambda: lora_lib.init(self.cfg, self.lora, jax.random.key(0), self.rank(0)))
        return blocks.partition(blocks.merge(params, adapters), [(lora_lib.ADAPTERS, "adapters"), (".*", None)])

    def upload(self, block, delta):  # the trained adapter itself
        return jax.tree.map(lambda x, d: x.astype(d.dtype) + d, block, delta)

    def reduce(self, uploads, weights, clients):
        scales = [self.cfg.lora_alpha / self.rank(c) for c in clients]
        return lora_lib.stack(uploads, weights, scales)

    def apply(self, params, partition, block_id, down, eta):
        return lora_lib.add_products(params, down, eta)

    def wire_params(self, partition, block_id, clients, round_):
        up = [self.adapter_params(c) for c in clients]
        return up, sum(up)  # the stack holds every participant's adapter

    def adapter_params(self, client: int) -> int:
        r = self.rank(client)
        return self.cfg.num_layers * sum(r * sum(lora_lib.dims(self.cfg, t)) for t in self.lora.targets)
