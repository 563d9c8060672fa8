"""FedBCD: FedAvg over one block. Every hook is `Algorithm`'s default; the other methods say how
they differ from it."""

from jaxblock.fed.algorithms.base import Algorithm


class FedBCD(Algorithm):
    """Round t: all sampled clients train block b_t; the server adds their mean delta to b_t at the
    end of round t, before round t+1 starts (communication and computation serialized)."""

    transforms_ok = True
