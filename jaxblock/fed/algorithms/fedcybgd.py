"""FedCyBGD (Wang et al. 2024a, cycle block gradient descent): clients train one after another, each
its own block, each from the model the previous client left.

Round t is one client's turn: client t mod N trains the block it owns, block (c mod B) of the layer
partition (the authors' code's "ascending" assignment, cid % block_num), and the server adds its
delta to that block at once (with one participant of weight 1, adding the delta is replacing the
block). Before its turn the client fetches the blocks that changed since its last turn, the ones
trained in the turns between (every turn before it in the first cycle); after it, it uploads its
block. Nothing overlaps and nobody else works meanwhile, so the run's wall time is the sum of the
turns (the paper's Figure 2). A cycle is N turns: with N = B every block trains once per cycle.
"""

from jaxblock.fed.algorithms.base import Algorithm


class FedCyBGD(Algorithm):
    name = "fedcybgd"
    turns = True

    def __post_init__(self):  # the turn order decides who trains and what: these settings would be ignored
        if self.fed.participation != 1.0:
            raise ValueError(f"participation={self.fed.participation}: FedCyBGD's clients take turns, one per round")
        if self.fed.schedule != "random":
            raise ValueError(f"schedule={self.fed.schedule!r}: FedCyBGD trains each client's own block, in turn")

    @staticmethod
    def owner_block(client: int, num_blocks: int) -> int:
        return client % num_blocks

    @classmethod
    def participants(cls, fed, round_):
        return [round_ % fed.num_clients]

    def partition(self, params, layer_partition):
        if self.fed.num_clients < layer_partition.num_blocks:  # blocks N..B-1 would never train
            raise ValueError(
                f"algorithm='fedcybgd' gives each client one block: num_clients={self.fed.num_clients} < "
                f"{layer_partition.num_blocks} blocks (raise blocks.layers_per_block or num_clients)"
            )
        return layer_partition

    @classmethod
    def choose_block(cls, fed, round_, num_blocks, gradient_norms=None):
        return cls.owner_block(round_ % fed.num_clients, num_blocks)

    def wire_params(self, partition, block_id, clients, round_):
        """Up: the turn's block. Down, for the turn's client only: every block changed since its
        last turn (the turns since then, or since the start in the first cycle)."""
        (client,) = clients
        n, turn = self.fed.num_clients, round_
        changed = {self.owner_block(t % n, partition.num_blocks) for t in range(max(0, turn - n + 1), turn)}
        return [partition.blocks[block_id].params], {client: sum(partition.blocks[b].params for b in changed)}
