"""ParaBlock (paper Algorithm 2): FedBCD whose exchange of round t's deltas overlaps round t+1's
compute. The only difference is when a delta is aggregated."""

from jaxblock.fed.algorithms.base import Algorithm


class ParaBlock(Algorithm):
    """Round r's deltas are aggregated at the end of round r + s (s = `fed.staleness` >= 1); the
    client's correction for b_r happens then (the server model now holds the aggregate and the
    client drops its own pending delta). After the last round a flush drains the s rounds in flight."""

    name = "parablock"

    @classmethod
    def staleness(cls, fed) -> int:
        return fed.staleness
