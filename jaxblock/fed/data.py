"""Client datasets as fixed-shape batches, and the pure `batches_fn` the federated core reads.

A client's data is a dict of equal-length NumPy arrays (`tokens` [n, T] int32, `loss_mask` [n, T]).
`batches_fn(client, position, k)` returns its next k batches from an example position: epoch e
of client c is a permutation seeded by (seed, c, e), so the stream is a pure function of the
position and a resumed run reads exactly the data an uninterrupted one would.
`make_sampled_batches_fn` is the same contract with the sampling and noise keys DP-SGD needs.
"""

from __future__ import annotations

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


def make_sampled_batches_fn(clients: list[dict[str, np.ndarray]], batch_size: int, seed: int):
    """`batches_fn(client, position, k)` as `make_batches_fn`'s, for DP-SGD (`local.DPSGD`): each
    step's batch is a fresh uniform sample without replacement of batch_size of the client's n
    examples, plus `noise_key` uint32 [k, 2], the step's Gaussian-noise key.

    Step s = position // batch_size + j draws its rows from default_rng([seed, client, s]) and its
    key from default_rng([seed, client, s, 1]): a pure function of the position, so a resumed run
    reads the same data and noise. This sampling is what the privacy accounting assumes,
    SampledWithoutReplacementDpEvent(n, batch_size, GaussianDpEvent(z)) per step. `seed` must be
    a secret of the client: whoever knows it knows which records each step used, and its noise.
    """
    sizes = [len(next(iter(c.values()))) for c in clients]
    for i, n in enumerate(sizes):
        if n < batch_size:
            raise ValueError(f"client {i} has {n} examples: fewer than batch_size={batch_size}")

    def batches_fn(client: int, position: int, k: int):
        data, n = clients[client], sizes[client]
        steps = range(position // batch_size, position // batch_size + k)
        rows = np.stack([np.random.default_rng([seed, client, s]).choice(n, batch_size, replace=False) for s in steps])
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
