"""Client datasets as fixed-shape batches, and the pure `batches_fn` the federated core reads.

A client's data is a dict of equal-length NumPy arrays (`tokens` [n, T] int32, `loss_mask` [n, T]).
`batches_fn(client, position, k)` returns its next k batches from an example position: epoch e
of client c is a permutation seeded by (seed, c, e), so the stream is a pure function of the
position and a resumed run reads exactly the data an uninterrupted one would.
`make_sampled_batches_fn` is the same contract with the sampling and noise keys DP-SGD needs.
"""

from __future__ import annotations

import math

import numpy as np


def make_batches_fn(clients: list[dict[str, np.ndarray]], batch_size: int, seed: int = 0):
    """`batches_fn(client, position, k) -> ({name: [k, batch_size, ...]}, position + k * batch_size)`."""
    sizes = [len(next(iter(c.values()))) for c in clients]
    for i, n in enumerate(sizes):
        if n < 1:
            raise ValueError(f"client {i} has no examples")

    def batches_fn(client: int, position: int, k: int):
        data, n = clients[client], sizes[client]
        idx = np.arange(position, position + k * batch_size)
        epochs, offsets = np.divmod(idx, n)
        order = {e: np.random.default_rng([seed, client, int(e)]).permutation(n) for e in np.unique(epochs)}
        rows = np.array([order[e][o] for e, o in zip(epochs, offsets, strict=True)])
        batch = {name: a[rows].reshape(k, batch_size, *a.shape[1:]) for name, a in data.items()}
        return batch, position + k * batch_size

    return batches_fn


OVERFLOW = 1e-12  # a Poisson step's chance of drawing more examples than its buffer holds (see poisson_cap)


def poisson_cap(batch_size: int, multiple: int = 1, tail: float = OVERFLOW) -> int:
    """The rows of a Poisson step's buffer: the smallest m with P(Poisson(batch_size) > m) <= tail,
    rounded up to a multiple of `multiple` (the data-parallel devices). A client's draw is
    Binomial(n_i, batch_size / n_i), whose tail above its mean + 1 is at most the Poisson one
    (Anderson and Samuels 1967), so one m serves every client. 1e-12: m = 25 rows for B = 4, 35 for 8,
    128 for 64, 376 for 256 (the per-example gradients cost m / B of a fixed batch's)."""
    log_pmf = lambda k: k * math.log(batch_size) - batch_size - math.lgamma(k + 1)  # noqa: E731
    m = batch_size
    while sum(math.exp(log_pmf(k)) for k in range(m + 1, m + 10 * batch_size + 50)) > tail:
        m += 1
    return -(-m // multiple) * multiple


def make_sampled_batches_fn(
    clients: list[dict[str, np.ndarray]],
    batch_size: int,
    seed: int,
    sampling: str = "without_replacement",
    multiple: int = 1,
    cap: int = 0,
):
    """`batches_fn(client, position, k)` as `make_batches_fn`'s, for DP-SGD (`local.DPSGD`): each
    step's batch is a fresh sample of the client's n examples, plus `noise_key` uint32 [k, 2], the
    step's Gaussian-noise key.

    `sampling='without_replacement'`: batch_size of the n, uniformly ([k, batch_size, ...]);
    the accounting's SampledWithoutReplacementDpEvent(n, batch_size, ...) per step.
    `sampling='poisson'`: each of the n independently with probability q = batch_size / n, so a
    step's count is random; it fills the first rows of a fixed buffer of m = `cap` rows (0:
    `poisson_cap`, overflow probability <= 1e-12 a step), in index order, the rest zeros, and
    `sample_mask` [k, m] float32 is 1 on the drawn rows. A step that draws more than m is not
    truncated: that call's buffer grows to hold it (a new shape, so one more compilation: the
    sample is exactly Poisson); the accounting's PoissonSampledDpEvent(q, ...) per step.

    Step s = position // batch_size + j draws its rows from default_rng([seed, client, s]) and its
    key from default_rng([seed, client, s, 1]): a pure function of the position, so a resumed run
    reads the same data and noise. `seed` must be a secret of the client: whoever knows it knows
    which records each step used, and its noise.
    """
    sizes = [len(next(iter(c.values()))) for c in clients]
    for i, n in enumerate(sizes):
        if n < batch_size:
            raise ValueError(f"client {i} has {n} examples: fewer than batch_size={batch_size}")
    if sampling not in ("without_replacement", "poisson"):
        raise ValueError(f"sampling={sampling!r}: choose without_replacement or poisson")
    cap = cap or poisson_cap(batch_size, multiple)

    def poisson_rows(client: int, n: int, steps: range) -> tuple[np.ndarray, np.ndarray]:
        """([k, width] row indices, [k, width] 0/1 mask): each step's draw, then padding."""
        drawn = [np.flatnonzero(np.random.default_rng([seed, client, s]).random(n) < batch_size / n) for s in steps]
        width = max(cap, -(-max(len(d) for d in drawn) // multiple) * multiple)  # an overflow: a wider buffer
        rows, mask = np.zeros((len(steps), width), np.int64), np.zeros((len(steps), width), np.float32)
        for j, d in enumerate(drawn):
            rows[j, : len(d)], mask[j, : len(d)] = d, 1.0
        return rows, mask

    def batches_fn(client: int, position: int, k: int):
        data, n = clients[client], sizes[client]
        steps = range(position // batch_size, position // batch_size + k)
        if sampling == "poisson":
            rows, mask = poisson_rows(client, n, steps)
            keep = lambda a: mask.reshape(*mask.shape, *[1] * (a.ndim - 1)) > 0  # noqa: E731
            batch = {name: np.where(keep(a), a[rows], 0).astype(a.dtype) for name, a in data.items()}  # padding: 0
            batch["sample_mask"] = mask
        else:
            rows = np.stack(
                [np.random.default_rng([seed, client, s]).choice(n, batch_size, replace=False) for s in steps]
            )
            batch = {name: a[rows] for name, a in data.items()}  # [k, batch_size, ...]
        batch["noise_key"] = np.stack(
            [np.random.default_rng([seed, client, s, 1]).integers(0, 2**32, 2, dtype=np.uint32) for s in steps]
        )
        return batch, position + k * batch_size

    return batches_fn


def synthetic_clients(
    num_clients: int,
    examples_per_client: int,
    seq_len: int,
    vocab_size: int,
    *,
    num_sources: int = 4,
    alphabet: int = 32,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Learnable token data with non-IID clients (a stand-in until real data is wired in).

    Each source is a sparse Markov chain over `alphabet` tokens (every token has 2 equally likely
    successors, so the best loss is ln 2); each client draws its examples from a Dirichlet(0.5)
    mixture of sources. The first half of every sequence is the prompt and the second half the
    response (the loss mask).
    """
    rng = np.random.default_rng(seed)
    lo = 3  # keep ids 0-2 for pad / bos / eos
    hi = min(vocab_size, lo + alphabet)
    successors = rng.integers(lo, hi, (num_sources, vocab_size, 2))
    mix = rng.dirichlet(np.full(num_sources, 0.5), num_clients)
    clients = []
    for c in range(num_clients):
        source = rng.choice(num_sources, examples_per_client, p=mix[c])
        tokens = np.empty((examples_per_client, seq_len), np.int32)
        tokens[:, 0] = rng.integers(lo, hi, examples_per_client)
        for t in range(1, seq_len):
            pick = rng.integers(0, 2, examples_per_client)
            tokens[:, t] = successors[source, tokens[:, t - 1], pick]
        loss_mask = np.zeros((examples_per_client, seq_len), np.float32)
        loss_mask[:, seq_len // 2 :] = 1.0
        clients.append({"tokens": tokens, "loss_mask": loss_mask})
    return clients
