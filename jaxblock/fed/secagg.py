"""Secure aggregation's pure core: the server learns the sum of a round's uploads and nothing else.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017),
with SecAgg+'s sparse masking graph (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020). A client uploads its clipped update as fixed-point integers
plus masks, mod 2^bits: a self-mask expanded from its own seed b_u, and for each neighbour v a
pairwise mask from a seed s_uv that u and v agree on (X25519), added by the smaller id and
subtracted by the larger, so that pairwise masks cancel in the sum. Both b_u and u's mask private
key are Shamir-shared t-of-n among u's neighbours (and u), encrypted to each, so that the server can
remove what is left after dropouts: the self-masks of the survivors (from b-shares) and the
dangling pairwise masks of clients that shared keys but never uploaded (from their mask keys'
shares). A client reveals, for each peer, one kind of share or the other, never both: both would
unmask that peer's single upload.

One round, as the steps a transport calls in order (each party's state is a frozen dataclass of
bytes, ints, tuples and dicts of them, so that a later step can put it through a store):

    client                                        server
    (a) state, public = client_keys(setup, me) -> server = collect_keys(setup, {u: public})    U1
        <- peer_keys(server, me)
    (b) state, outbox = share_keys(state, keys) -> server, inboxes = relay(server, {u: outbox})  U2
    (c) state, masked = masked_input(state, q, inbox) -> asks = requests(server, uploaded)      U3
    (d) state, shares = answer(state, asks[me]) -> total = unmask_round(server, masked, answers)

`simulate` runs them in memory (the simulator's path). Authentication is the caller's: it signs and
checks every message with the parties' Ed25519 identities (jaxblock.net.signing), which this core
may not import; here everything is bytes.

Choices:
- Quantization: coordinates clipped to [-B, B] (an L2 clip norm C bounds each by C) map to
  integers in [0, L], L = floor((2^bits - 1) / num_clients), with stochastic rounding (unbiased);
  the sum of num_clients of them never wraps. Error per coordinate per client: at most one step
  2B/L (plus float64 rounding, < 2^-50 L steps: `error_bound`).
- Masks: ChaCha20 keystream keyed by the 32-byte seed with a zero nonce: every seed is fresh
  (b_u random, s_uv from per-round key pairs through HKDF whose info names the round and the
  purpose) and keys one stream, so a (key, nonce) pair never repeats. A client must therefore
  upload once per round: a second, different input under the same masks reveals the difference
  (`masked_input` forgets its seeds after one use; a retry resends the same bytes).
- Keys: per round and party, two X25519 pairs (Bonawitz's c for encrypting shares, s for masks);
  seeds and encryption keys are HKDF-SHA256 of the shared secret with info binding round and purpose.
- Shamir over the Mersenne prime 2^521 - 1; a share of party p sits at x = p + 1.
- Shares travel sealed with ChaCha20-Poly1305 under the pairwise c-key, associated data naming
  round, sender and recipient, so the relay can neither read, alter nor redirect them.
- Threshold: m/2 < t <= m, m the smallest closed neighbourhood (a client and its neighbours). t
  above half keeps a server that tells half the holders a peer dropped and the other half it
  survived from collecting both kinds of that peer's shares from two disjoint halves.
- SecAgg+ graph: a ring ordered by SHA-256(round seed, party), each party joined to its
  ceil(k/2) nearest on each side (degree k rounded up to even); k = 0 or k >= n - 1: all pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import secrets
from collections.abc import Iterable

import jax
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from jaxblock.fed import privacy
from jaxblock.fed.transforms import Transform

PRIME = 2**521 - 1  # Shamir's field: a Mersenne prime above any 64-byte secret
SELF_MASK, MASK_KEY = "self_mask", "mask_key"  # the two kinds of share: of b_u, of u's mask private key
KINDS = (SELF_MASK, MASK_KEY)


class Refused(ValueError):
    """A client's refusal of an unmasking request that could reveal a single upload."""


class CannotUnmask(ValueError):
    """Too few parties are left for the round's sum to be unmasked (the caller: a missed quorum)."""


class BadCiphertext(ValueError):
    """A sealed share that does not open: a wrong key, or bytes altered on the way."""


# ----------------------------------------------------------------------------- quantization


def word_dtype(bits: int) -> np.dtype:
    """The unsigned integer type that holds values mod 2^bits."""
    if not 1 <= bits <= 64:
        raise ValueError(f"secagg.bits={bits}: must be in [1, 64]")
    return np.dtype(np.uint32 if bits <= 32 else np.uint64)


def levels(num_clients: int, bits: int) -> int:
    """L: the largest integer one client's coordinate maps to; num_clients * L < 2^bits."""
    word_dtype(bits)
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients}: need at least 1")
    top = (2**bits - 1) // num_clients
    if top < 1:
        raise ValueError(f"secagg.bits={bits} cannot hold a sum of {num_clients} clients")
    return top


def error_bound(bound: float, num_clients: int, bits: int) -> float:
    """The largest |dequantized - clipped| of one coordinate of one client: one step 2B/L, plus the
    float64 rounding of (x + B) * L / 2B and of the way back (< 2^-50 L steps; 2^-18 at 32 bits)."""
    top = levels(num_clients, bits)
    return 2 * bound / top * (1 + top * 2.0**-50)


def _wrap(x: np.ndarray, bits: int) -> np.ndarray:
    """x mod 2^bits, in place (the word type already wraps at 32 and 64 bits)."""
    if bits not in (32, 64):
        np.bitwise_and(x, x.dtype.type(2**bits - 1), out=x)
    return x


_QUANTIZE_CHUNK = 1 << 20


def quantize(flat: np.ndarray, bound: float, num_clients: int, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Fixed-point integers in [0, L] of values clipped to [-bound, bound], stochastically rounded.

    Unbiased: E[dequantized] = clipped value. Works through `flat` in chunks of 2^20 values (the
    rounding draws are the same as in one pass), so its scratch memory is a few MB at any size.

    Args:
      flat: float[n], e.g. a client's flattened, L2-clipped update.
      bound: B; an L2 clip norm C bounds every coordinate by C.
      num_clients: the most uploads that will be summed (their sum must not wrap).
      bits: the modulus 2^bits of the masked arithmetic.
      rng: the rounding's randomness; the caller seeds it from its own secret.
    Returns:
      uint32[n] (bits <= 32) or uint64[n].
    """
    if not bound > 0:
        raise ValueError(f"secagg bound={bound}: must be > 0 (the clip norm)")
    top, dtype = levels(num_clients, bits), word_dtype(bits)
    flat = np.asarray(flat).reshape(-1)
    ceiling = float(top) if float(top) <= top else float(np.nextafter(float(top), 0))  # float(L) may round up
    scale = top / (2 * bound)
    out = np.empty(flat.shape, dtype)
    for start in range(0, flat.size, _QUANTIZE_CHUNK):
        y = np.array(flat[start : start + _QUANTIZE_CHUNK], np.float64)  # a copy: worked on in place
        if np.isnan(y).any():
            raise ValueError("quantize: the update holds NaN")
        np.clip(y, -bound, bound, out=y)
        y += bound
        y *= scale
        np.clip(y, 0.0, ceiling, out=y)
        low = np.floor(y)
        y -= low  # frac(y)
        up = rng.random(y.shape) < y  # round up with probability frac(y): unbiased
        chunk = out[start : start + y.size]
        chunk[...] = low
        chunk += up
    return out


def dequantize_sum(total: np.ndarray, bound: float, num_clients: int, bits: int, count: int) -> np.ndarray:
    """float64[n]: the sum of `count` clients' clipped values from the sum of their quantized ones.

    float64 because a step (2B/L, 5e-10 B at 32 bits) is finer than float32 resolves near B; the
    caller casts. Its error is at most count * error_bound(bound, num_clients, bits) per coordinate.
    """
    if not 0 <= count <= num_clients:
        raise ValueError(f"count={count}: a sum of 0..{num_clients} clients (more could have wrapped)")
    top = levels(num_clients, bits)
    return np.asarray(total).astype(np.float64) * (2 * bound / top) - count * bound


# ----------------------------------------------------------------------------- masks


_CHUNK = 1 << 18  # bytes of keystream per call: the zeros it encrypts stay in cache
_ZEROS = bytes(_CHUNK)


def expand(seed: bytes, n: int, bits: int) -> np.ndarray:
    """n words mod 2^bits from the ChaCha20 keystream of the 32-byte `seed` (little-endian words).

    The nonce is zero: each seed is used for one round and one purpose, so no (key, nonce) pair
    repeats (see the module docstring). At most 256 GiB per seed (ChaCha20's 32-bit block counter).
    Throughput: 1.6-4 GB/s on one core of the 2-core CI machine (tests/test_secagg.py reports it).
    """
    if len(seed) != 32:
        raise ValueError(f"a mask seed is 32 bytes, got {len(seed)}")
    dtype = word_dtype(bits).newbyteorder("<")
    out = np.empty(n, dtype)
    size = out.nbytes
    if size > 64 * 2**32:
        raise ValueError(f"expand: {size} bytes exceed one ChaCha20 stream (256 GiB)")
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    view = memoryview(out).cast("B")
    for start in range(0, size, _CHUNK):
        part = min(_CHUNK, size - start)
        stream.update_into(_ZEROS if part == _CHUNK else _ZEROS[:part], view[start : start + part])
    return _wrap(out.astype(word_dtype(bits), copy=False), bits)


def add(arrays: Iterable[np.ndarray], bits: int) -> np.ndarray:
    """Their elementwise sum mod 2^bits (the server's sum of masked uploads)."""
    arrays = list(arrays)
    if not arrays:
        raise ValueError("add: nothing to sum")
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"add: uploads of different shapes {sorted(shapes)}")
    total = np.array(arrays[0], word_dtype(bits))
    for a in arrays[1:]:
        np.add(total, a, out=total)
    return _wrap(total, bits)


def mask(quantized: np.ndarray, me: int, self_seed: bytes, pair_seeds: dict[int, bytes], bits: int) -> np.ndarray:
    """A client's upload: quantized + PRG(b_me) + sum over peers j of +-PRG(s_me,j) mod 2^bits
    (+ if me < j, - if me > j, so each pair's masks cancel in the sum)."""
    n = np.shape(quantized)[0]
    out = np.array(quantized, word_dtype(bits)).reshape(-1)
    np.add(out, expand(self_seed, n, bits), out=out)
    for peer, seed in pair_seeds.items():
        if peer == me:
            raise ValueError(f"client {me} cannot mask with itself")
        (np.add if me < peer else np.subtract)(out, expand(seed, n, bits), out=out)
    return _wrap(out, bits)


def unmask(
    total_masked: np.ndarray,
    survivors: Iterable[int],
    self_seeds: dict[int, bytes],
    pair_seeds_of_dropped: dict[tuple[int, int], bytes],
    n: int,
    bits: int,
) -> np.ndarray:
    """The survivors' sum of quantized inputs mod 2^bits from the sum of their masked uploads.

    Args:
      total_masked: uint[n], `add` of the survivors' uploads.
      survivors: the clients whose uploads are in the sum.
      self_seeds: {survivor: b}, every survivor's self-mask seed.
      pair_seeds_of_dropped: {(survivor, dropped): s}: the pairwise seeds a survivor masked with
        whose partner's upload is missing (it shared keys, then dropped).
    """
    survivors = set(survivors)
    if set(self_seeds) != survivors:
        raise ValueError(f"unmask: self-mask seeds of {sorted(self_seeds)}, survivors {sorted(survivors)}")
    if np.shape(total_masked) != (n,):
        raise ValueError(f"unmask: a sum of shape {np.shape(total_masked)}, expected ({n},)")
    out = np.array(total_masked, word_dtype(bits))
    for seed in self_seeds.values():
        np.subtract(out, expand(seed, n, bits), out=out)
    for (survivor, dropped), seed in pair_seeds_of_dropped.items():
        if survivor not in survivors or dropped in survivors:
            raise ValueError(f"unmask: pair ({survivor}, {dropped}) is not (survivor, dropped)")
        (np.subtract if survivor < dropped else np.add)(out, expand(seed, n, bits), out=out)
    return _wrap(out, bits)


# ----------------------------------------------------------------------------- keys, shares, sealing


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw 32-byte (private, public)."""
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return raw, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_of(private: bytes) -> bytes:
    """The X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(my_private: bytes, their_public: bytes, info: bytes) -> bytes:
    """A 32-byte seed both ends derive alike: HKDF-SHA256 of the X25519 shared secret, bound to `info`."""
    if len(my_private) != 32 or len(their_public) != 32:
        raise ValueError(f"X25519 keys are 32 bytes, got {len(my_private)} and {len(their_public)}")
    shared = X25519PrivateKey.from_private_bytes(my_private).exchange(X25519PublicKey.from_public_bytes(their_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def info(round_: int, purpose: str) -> bytes:
    """HKDF info binding a seed to one round and one purpose ('mask' or 'shares')."""
    return f"jaxblock secagg round {round_} {purpose}".encode()


def _split_at(secret: bytes, t: int, xs: list[int], randbelow) -> list[tuple[int, int]]:
    """Shamir shares (x, f(x)) of `secret` at the given x, f a random polynomial of degree t - 1."""
    if len(secret) > 64:
        raise ValueError(f"Shamir: a secret of at most 64 bytes, got {len(secret)}")
    if not 1 <= t <= len(xs):
        raise ValueError(f"Shamir: threshold t={t} must be in [1, {len(xs)}] (the number of shares)")
    if len(set(xs)) != len(xs) or min(xs) < 1:
        raise ValueError(f"Shamir: share positions must be distinct and >= 1, got {xs}")
    coeffs = [int.from_bytes(b"\x01" + secret, "big")]  # the 0x01 prefix keeps leading zero bytes
    coeffs += [randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def split(secret: bytes, t: int, n: int, rng=None) -> list[tuple[int, int]]:
    """t-of-n Shamir shares [(x, y)] of a secret of up to 64 bytes, x = 1..n (party index + 1).

    rng: a `random.Random` for reproducible tests; None (use this): `secrets`.
    """
    return _split_at(secret, t, list(range(1, n + 1)), secrets.randbelow if rng is None else rng.randrange)


def combine(shares: Iterable[tuple[int, int]], t: int) -> bytes:
    """The secret behind t of the shares (the first t by x): Lagrange interpolation at 0."""
    points = dict(sorted(shares))
    if len(points) < t:
        raise ValueError(f"Shamir: {len(points)} distinct shares, fewer than the threshold t={t}")
    xs = list(points)[:t]
    value = 0
    for i in xs:
        num, den = 1, 1
        for j in xs:
            if j != i:
                num, den = num * j % PRIME, den * (j - i) % PRIME
        value = (value + points[i] * num * pow(den, -1, PRIME)) % PRIME
    size = (value.bit_length() - 1) // 8  # the secret's bytes after the 0x01 prefix
    if value == 0 or size > 64 or value >> (8 * size) != 1:
        raise ValueError("Shamir: the shares do not combine to a secret (too few, or altered)")
    return (value - (1 << (8 * size))).to_bytes(size, "big")


_SHARE_BYTES = 4 + 66  # x as 4 bytes, y < 2^521 as 66


def share_bytes(share: tuple[int, int]) -> bytes:
    x, y = share
    return x.to_bytes(4, "big") + y.to_bytes(66, "big")


def share_from_bytes(data: bytes) -> tuple[int, int]:
    if len(data) != _SHARE_BYTES:
        raise ValueError(f"a share is {_SHARE_BYTES} bytes, got {len(data)}")
    return int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big")


def seal(key32: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305 ciphertext of `plaintext`, its random 12-byte nonce first; `associated`
    is authenticated, not sent."""
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(key32).encrypt(nonce, plaintext, associated)


def open_(key32: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """The plaintext `seal` sealed; BadCiphertext for a wrong key, associated data or altered bytes."""
    try:
        return ChaCha20Poly1305(key32).decrypt(ciphertext[:12], ciphertext[12:], associated)
    except InvalidTag:
        raise BadCiphertext("a sealed share does not open: wrong key, or its bytes were altered") from None


# ----------------------------------------------------------------------------- SecAgg+ graph


def neighbors(parties: list[int], k: int, seed: bytes) -> dict[int, set[int]]:
    """The masking graph: symmetric, each party joined to its ceil(k/2) nearest on each side of a
    ring that `seed` (public, per round) shuffles, so degree k rounded up to even; k = 0 or
    k >= n - 1: all pairs. Server and clients compute the same graph from the same seed."""
    if len(set(parties)) != len(parties):
        raise ValueError(f"neighbors: parties repeat in {parties}")
    if k < 0:
        raise ValueError(f"secagg.neighbors={k}: must be >= 0 (0: all pairs)")
    n, half = len(parties), math.ceil(k / 2)
    if k == 0 or 2 * half >= n - 1:
        return {p: set(parties) - {p} for p in parties}
    ring = sorted(parties, key=lambda p: hashlib.sha256(seed + int(p).to_bytes(8, "big")).digest())
    out: dict[int, set[int]] = {p: set() for p in parties}
    for i, p in enumerate(ring):
        for d in range(1, half + 1):
            q = ring[(i + d) % n]
            out[p].add(q)
            out[q].add(p)
    return out


# ----------------------------------------------------------------------------- one round


@dataclasses.dataclass(frozen=True)
class Setup:
    """A round's public parameters; every party derives the same graph from them."""

    round_: int
    parties: tuple[int, ...]  # the round's participants (the plan)
    threshold: int  # t
    neighbors: int = 0  # k (SecAgg+); 0: all pairs
    seed: bytes = b""  # public round seed that shuffles the graph
    bits: int = 32

    def __post_init__(self):
        object.__setattr__(self, "parties", tuple(int(p) for p in self.parties))
        word_dtype(self.bits)
        if any(p < 0 for p in self.parties):
            raise ValueError(f"secagg parties {list(self.parties)}: ids must be >= 0 (a share sits at x = id + 1)")
        if len(self.parties) < 2:
            raise ValueError(f"secure aggregation of {len(self.parties)} client(s): a sum of one is its update")
        smallest = min(len(v) + 1 for v in self.graph().values())  # a closed neighbourhood: the client too
        if not smallest / 2 < self.threshold <= smallest:
            raise ValueError(
                f"secagg threshold t={self.threshold}: must be in ({smallest / 2:g}, {smallest}], above half of the "
                f"{smallest} share holders of each client, or one server could gather both kinds of a client's shares"
            )

    def graph(self) -> dict[int, set[int]]:
        return neighbors(list(self.parties), self.neighbors, self.seed)


@dataclasses.dataclass(frozen=True)
class ClientRound:
    """One client's state in one round. Secrets are emptied (b"") once used, shares kept to answer."""

    round_: int
    me: int
    threshold: int
    bits: int
    neighbors: tuple[int, ...]  # its graph neighbours
    c_sk: bytes  # X25519 private key that encrypts shares
    s_sk: bytes  # X25519 private key of the pairwise masks
    self_seed: bytes = b""  # b: the self-mask seed
    peer_keys: dict[int, tuple[bytes, bytes]] = dataclasses.field(default_factory=dict)  # {peer: (c_pk, s_pk)}
    held: dict[int, tuple[bytes, bytes]] = dataclasses.field(default_factory=dict)  # {owner: (b-share, s-share)}
    masked_with: tuple[int, ...] = ()  # the neighbours whose shares arrived: its pairwise masks
    uploaded: bool = False
    revealed: dict[int, str] = dataclasses.field(default_factory=dict)  # {peer: the kind revealed}


def _aad(round_: int, sender: int, recipient: int) -> bytes:
    return f"jaxblock secagg round {round_} shares {sender} to {recipient}".encode()


def client_keys(setup: Setup, me: int) -> tuple[ClientRound, tuple[bytes, bytes]]:
    """(a) A client's fresh key pairs: its state, and (c_pk, s_pk) to advertise (signed by the caller)."""
    if me not in setup.parties:
        raise ValueError(f"client {me} is not among round {setup.round_}'s parties {list(setup.parties)}")
    (c_sk, c_pk), (s_sk, s_pk) = generate_keypair(), generate_keypair()
    peers = tuple(sorted(setup.graph()[me]))
    state = ClientRound(setup.round_, me, setup.threshold, setup.bits, peers, c_sk, s_sk)
    return state, (c_pk, s_pk)


def share_keys(state: ClientRound, peer_keys: dict[int, tuple[bytes, bytes]]) -> tuple[ClientRound, dict[int, bytes]]:
    """(b) Draws the self-mask seed b, splits b and s_sk t-of-n among the client and its neighbours
    that advertised keys, and seals each neighbour's pair of shares to it.

    Returns:
      (state, {neighbour: sealed shares}) for the server to relay.
    """
    if state.self_seed or state.uploaded:  # a second b would be shared twice, and masks need one
        raise ValueError(f"client {state.me}: already shared its keys in round {state.round_}")
    strangers = set(peer_keys) - set(state.neighbors)
    if strangers:
        raise ValueError(f"client {state.me}: keys of {sorted(strangers)}, not its neighbours")
    holders = sorted([state.me, *peer_keys])
    if len(holders) < state.threshold:
        raise CannotUnmask(
            f"round {state.round_} cannot be unmasked: client {state.me} has {len(holders)} share holders "
            f"left, fewer than t={state.threshold}"
        )
    b = secrets.token_bytes(32)
    xs = [h + 1 for h in holders]
    b_shares = _split_at(b, state.threshold, xs, secrets.randbelow)
    s_shares = _split_at(state.s_sk, state.threshold, xs, secrets.randbelow)
    held, outbox = {}, {}
    for h, bs, ss in zip(holders, b_shares, s_shares, strict=True):
        if h == state.me:
            held[h] = (share_bytes(bs), share_bytes(ss))
        else:
            key = agree(state.c_sk, peer_keys[h][0], info(state.round_, "shares"))
            outbox[h] = seal(key, share_bytes(bs) + share_bytes(ss), _aad(state.round_, state.me, h))
    return dataclasses.replace(state, self_seed=b, peer_keys=dict(peer_keys), held=held), outbox


def masked_input(state: ClientRound, quantized: np.ndarray, inbox: dict[int, bytes]) -> tuple[ClientRound, np.ndarray]:
    """(c) Opens the shares its neighbours sealed to it and masks its quantized input with its
    self-mask and a pairwise mask per sender; then forgets its seeds and private keys (one upload).

    Args:
      quantized: uint[n] from `quantize`.
      inbox: {neighbour: sealed shares} as the server relayed them (the neighbours still in the round).
    Returns:
      (state, uint[n] masked upload).
    """
    if not state.self_seed:
        why = "already uploaded this round" if state.uploaded else "share keys first"
        raise ValueError(f"client {state.me}: {why}")
    strangers = set(inbox) - set(state.peer_keys)
    if strangers:
        raise ValueError(f"client {state.me}: shares from {sorted(strangers)}, who did not share keys with it")
    if len(inbox) + 1 < state.threshold:
        raise CannotUnmask(
            f"round {state.round_} cannot be unmasked: client {state.me} received shares from {len(inbox)} "
            f"neighbours, fewer than t - 1 = {state.threshold - 1}"
        )
    held = dict(state.held)
    for sender, sealed in inbox.items():
        key = agree(state.c_sk, state.peer_keys[sender][0], info(state.round_, "shares"))
        payload = open_(key, sealed, _aad(state.round_, sender, state.me))
        b_share, s_share = payload[:_SHARE_BYTES], payload[_SHARE_BYTES:]
        if {share_from_bytes(b_share)[0], share_from_bytes(s_share)[0]} != {state.me + 1}:
            raise ValueError(f"client {state.me}: client {sender}'s shares are not at x = {state.me + 1}")
        held[sender] = (b_share, s_share)
    seeds = {u: agree(state.s_sk, state.peer_keys[u][1], info(state.round_, "mask")) for u in inbox}
    masked = mask(quantized, state.me, state.self_seed, seeds, state.bits)
    forgotten = dict(c_sk=b"", s_sk=b"", self_seed=b"", uploaded=True)
    return dataclasses.replace(state, held=held, masked_with=tuple(sorted(inbox)), **forgotten), masked


def answer(state: ClientRound, request: list[tuple[int, str]]) -> tuple[ClientRound, list[tuple[int, str, bytes]]]:
    """(d) The shares a survivor reveals: per (peer, kind) asked, its share of the peer's self-mask
    seed (the peer survived) or of its mask key (the peer dropped).

    Refused, revealing nothing, if the request asks for both kinds of one peer, for a kind other
    than one it already revealed for that peer this round, for its own mask key, for a peer whose
    shares it does not hold, or before its own upload.
    """
    if not state.uploaded:
        raise Refused(f"client {state.me} answers only after its own upload in round {state.round_}")
    kinds: dict[int, str] = {}
    for peer, kind in request:
        if kind not in KINDS:
            raise Refused(f"client {state.me}: unknown share kind {kind!r} asked for client {peer}")
        if kinds.setdefault(peer, kind) != kind:
            raise Refused(f"client {state.me}: asked for both kinds of client {peer}'s shares in round {state.round_}")
    for peer, kind in kinds.items():
        if peer not in state.held:
            raise Refused(f"client {state.me} holds no shares of client {peer}")
        if peer == state.me and kind == MASK_KEY:
            raise Refused(f"client {state.me}: asked for its own mask key's shares, and it is alive")
        if state.revealed.get(peer, kind) != kind:
            raise Refused(f"client {state.me}: already revealed client {peer}'s {state.revealed[peer]} shares, "
                          f"asked for its {kind} shares in round {state.round_}")  # fmt: skip
    shares = [(peer, kind, state.held[peer][KINDS.index(kind)]) for peer, kind in kinds.items()]
    return dataclasses.replace(state, revealed={**state.revealed, **kinds}), shares


@dataclasses.dataclass(frozen=True)
class ServerRound:
    """The server's state in one round: who advertised keys (U1) and who shared them (U2)."""

    setup: Setup
    keys: dict[int, tuple[bytes, bytes]]  # U1: {client: (c_pk, s_pk)}
    shared: tuple[int, ...] = ()  # U2


def _cannot(setup: Setup, what: str, count: int) -> CannotUnmask:
    return CannotUnmask(f"round {setup.round_} cannot be unmasked: {count} {what}, fewer than t={setup.threshold}")


def collect_keys(setup: Setup, keys: dict[int, tuple[bytes, bytes]]) -> ServerRound:
    """(a) The server's record of the advertised (c_pk, s_pk) (the caller checked their signatures)."""
    strangers = set(keys) - set(setup.parties)
    if strangers:
        raise ValueError(f"round {setup.round_}: keys from {sorted(strangers)}, not among its parties")
    for c, (c_pk, s_pk) in keys.items():
        if len(c_pk) != 32 or len(s_pk) != 32:
            raise ValueError(f"round {setup.round_}: client {c}'s public keys are not 32 bytes each")
    if len(keys) < setup.threshold:
        raise _cannot(setup, "clients advertised keys", len(keys))
    return ServerRound(setup, dict(keys))


def peer_keys(server: ServerRound, me: int) -> dict[int, tuple[bytes, bytes]]:
    """The advertised keys of `me`'s neighbours, for its `share_keys`."""
    return {p: server.keys[p] for p in sorted(server.setup.graph()[me]) if p in server.keys}


Boxes = dict[int, dict[int, bytes]]  # {party: {peer: sealed shares}}


def relay(server: ServerRound, outboxes: Boxes) -> tuple[ServerRound, Boxes]:
    """(b) The sealed shares, readdressed: {recipient: {sender: sealed}} among the clients that
    shared (U2), each to a neighbour of its sender."""
    shared = sorted(outboxes)
    strangers = set(shared) - set(server.keys)
    if strangers:
        raise ValueError(f"round {server.setup.round_}: shares from {sorted(strangers)}, who advertised no keys")
    if len(shared) < server.setup.threshold:
        raise _cannot(server.setup, "clients shared their keys", len(shared))
    graph = server.setup.graph()
    inboxes: dict[int, dict[int, bytes]] = {v: {} for v in shared}
    for u, box in outboxes.items():
        for v, sealed in box.items():
            if v in inboxes and v in graph[u]:
                inboxes[v][u] = sealed
    return dataclasses.replace(server, shared=tuple(shared)), inboxes


def requests(server: ServerRound, uploaded: Iterable[int]) -> dict[int, list[tuple[int, str]]]:
    """(c) What the server asks each survivor (U3): for itself and each neighbour in U2, the
    self-mask share if that one uploaded, else the mask-key share."""
    survivors = set(uploaded)
    strangers = survivors - set(server.shared)
    if strangers:
        raise ValueError(f"round {server.setup.round_}: uploads from {sorted(strangers)}, who shared no keys")
    if len(survivors) < server.setup.threshold:
        raise _cannot(server.setup, "masked inputs arrived", len(survivors))
    graph, shared = server.setup.graph(), set(server.shared)
    return {
        v: [(p, SELF_MASK if p in survivors else MASK_KEY) for p in sorted(({v} | graph[v]) & shared)]
        for v in sorted(survivors)
    }


def unmask_round(
    server: ServerRound, masked: dict[int, np.ndarray], answers: dict[int, list[tuple[int, str, bytes]]]
) -> np.ndarray:
    """(d) The survivors' sum of quantized inputs mod 2^bits, from their masked uploads and the
    shares the answering survivors revealed; CannotUnmask if a secret has fewer than t shares.

    Only shares the server asked for, at the answerer's own x, are used. A mask key rebuilt from
    an altered share does not match the key its owner advertised: ValueError. A self-mask seed has
    no such check (Shamir is linear: y + d in one share moves the secret by a multiple of d), so an
    altered b-share gives a wrong sum, as a malicious client's wrong upload would; it reveals nothing.
    """
    setup = server.setup
    asked = requests(server, masked)
    shares: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for v, items in answers.items():
        wanted = set(asked.get(v, ()))
        for peer, kind, data in items:
            try:
                x, y = share_from_bytes(data)
            except ValueError:  # a malformed share counts as none (the others may still reach t)
                continue
            if (peer, kind) in wanted and x == v + 1:
                shares.setdefault((peer, kind), []).append((x, y))

    def recover(peer: int, kind: str) -> bytes:
        got = shares.get((peer, kind), [])
        if len(got) < setup.threshold:
            raise CannotUnmask(f"round {setup.round_} cannot be unmasked: client {peer}'s {kind} has {len(got)} "
                               f"shares of the t={setup.threshold} needed")  # fmt: skip
        try:
            secret = combine(got, setup.threshold)
        except ValueError:
            secret = b""
        # a mask key must be the one its owner advertised; any secret is 32 bytes
        if len(secret) != 32 or (kind == MASK_KEY and public_of(secret) != server.keys[peer][1]):
            raise ValueError(f"round {setup.round_}: client {peer}'s {kind} does not come back from its shares "
                             "(an altered share)")  # fmt: skip
        return secret

    survivors, graph = sorted(masked), setup.graph()
    self_seeds = {u: recover(u, SELF_MASK) for u in survivors}
    pair_seeds = {}
    for v in sorted(set(server.shared) - set(survivors)):
        s_sk = recover(v, MASK_KEY)
        for u in sorted(graph[v] & set(survivors)):
            pair_seeds[(u, v)] = agree(s_sk, server.keys[u][1], info(setup.round_, "mask"))
    n = np.shape(next(iter(masked.values())))[0]
    return unmask(add(masked.values(), setup.bits), survivors, self_seeds, pair_seeds, n, setup.bits)


def simulate(
    setup: Setup,
    inputs: dict[int, np.ndarray],
    drop_before_sharing: Iterable[int] = (),
    drop_before_upload: Iterable[int] = (),
    drop_before_answer: Iterable[int] = (),
) -> tuple[np.ndarray, list[int]]:
    """One round in memory, every step in order: (the survivors' sum of quantized inputs mod
    2^bits, the survivors). Clients in the drop sets vanish before that step."""
    clients, publics = {}, {}
    for u in setup.parties:
        clients[u], publics[u] = client_keys(setup, u)
    server = collect_keys(setup, publics)
    outboxes = {}
    for u in set(setup.parties) - set(drop_before_sharing):
        clients[u], outboxes[u] = share_keys(clients[u], peer_keys(server, u))
    server, inboxes = relay(server, outboxes)
    masked = {}
    for u in set(server.shared) - set(drop_before_upload):
        clients[u], masked[u] = masked_input(clients[u], inputs[u], inboxes[u])
    answers = {}
    for v, ask in requests(server, masked).items():
        if v not in set(drop_before_answer):
            clients[v], answers[v] = answer(clients[v], ask)
    return unmask_round(server, masked, answers), sorted(masked)


# ----------------------------------------------------------------------------- the update transform


@dataclasses.dataclass(frozen=True)
class SecureAggregation(Transform):
    """Secure aggregation as an update transform (`secagg.on`).

    Client (`encode`): the upload clipped to C (already clipped, and noised, by client-level DP when
    it runs with it), flattened and quantized with stochastic rounding (its rounding draws keyed by
    the client's secret and its upload count, kept in state['extra']['secagg']). Server (`reduce`):
    one protocol round over the uploads (`simulate`: keys, shares, masks, unmasking: the masked
    sum unmasks to exactly the sum of the quantized uploads), dequantized. The server never holds an
    individual update, so the layers below it get each survivor's upload as the survivors' mean:
    for a method whose reduce is a uniformly weighted sum (`check` refuses the others)
    that is exactly what the sum gives. The range covers C plus six standard deviations of any
    distributed DP noise (a coordinate beyond it is clipped: probability ~2e-9).
    """

    clip_norm: float = 1.0  # C
    clients_per_round: int = 2  # M: the sum of M quantized uploads never wraps
    bits: int = 32
    neighbors: int = 0  # SecAgg+'s k; 0: all pairs
    threshold: int = 0  # t; 0: just above half of each client's share holders
    noise_std: float = 0.0  # per-coordinate std of the distributed DP noise an upload carries
    seed: int = 0  # this party's secret (the rounding draws)
    # (round, {client: its masked input}) -> (the survivors' sum mod 2^bits, the survivors): the
    # deployment's protocol through the store (net/secure.py); None: one round in memory (`simulate`)
    unmasker: object = dataclasses.field(default=None, compare=False, repr=False)
    key = "secagg"

    @property
    def bound(self) -> float:
        return self.clip_norm + 6.0 * self.noise_std

    def settings(self) -> dict:
        return {"secagg.on": True, "secagg.bits": self.bits, "secagg.neighbors": self.neighbors,
                "secagg.threshold": self.threshold}  # fmt: skip

    def encode(self, state, client, block, tree):
        if self.noise_std == 0.0:  # alone: its own clip (under client-level DP the upload arrives clipped)
            tree = privacy.clip(tree, self.clip_norm)
        flat = np.concatenate([np.asarray(x, np.float32).reshape(-1) for x in jax.tree.leaves(tree)])
        count = int(state.get(f"c{client}", 0))
        rng = np.random.default_rng([self.seed, 0x5EC, client, count])
        q = quantize(flat, self.bound, self.clients_per_round, self.bits, rng)
        return {"q": q}, {**state, f"c{client}": np.asarray(count + 1, np.int64)}

    def wire_shapes(self, like):
        n = sum(math.prod(x.shape) for x in jax.tree.leaves(like))
        return {"q": jax.ShapeDtypeStruct((n,), word_dtype(self.bits))}

    def wire_leaves(self, like, wire_dtype):
        n = sum(math.prod(x.shape) for x in jax.tree.leaves(like))
        return {"q": ((n,), word_dtype(self.bits).name, None)}

    def setup(self, round_: int, parties: list[int]) -> Setup:
        """The round's public parameters (its graph seed a hash of the round)."""
        seed = hashlib.sha256(f"jaxblock secagg graph {round_}".encode()).digest()
        graph = neighbors(list(parties), self.neighbors, seed)
        smallest = min(len(v) + 1 for v in graph.values())
        t = self.threshold or smallest // 2 + 1
        return Setup(round_, tuple(parties), t, self.neighbors, seed, self.bits)

    def reduce(self, uploads, like, inner, round_=0):
        inputs = {c: np.asarray(u["q"]) for c, u in uploads.items()}
        if self.unmasker is None:  # the simulator: quantized inputs, masked and unmasked in memory
            total, survivors = simulate(self.setup(round_, sorted(uploads)), inputs)
        else:  # the deployment: masked inputs, unmasked with the survivors' shares
            total, survivors = self.unmasker(round_, inputs)
        flat = dequantize_sum(total, self.bound, self.clients_per_round, self.bits, len(survivors)) / len(survivors)
        leaves, treedef = jax.tree.flatten(like)
        sizes = np.cumsum([math.prod(x.shape) for x in leaves])[:-1]
        parts = zip(np.split(flat, sizes), leaves, strict=True)
        mean = [np.asarray(part, np.float32).reshape(x.shape) for part, x in parts]
        return inner(dict.fromkeys(survivors, treedef.unflatten(mean)))


def of(transforms) -> SecureAggregation | None:
    """The run's secure-aggregation transform, if it has one."""
    return next((t for t in transforms if isinstance(t, SecureAggregation)), None)


def check(fed, algorithm, policy=None) -> None:
    """ValueError, in one line saying why, for what secure aggregation cannot run with."""
    if algorithm.asynchronous:
        raise ValueError(f"secagg.on with algorithm={fed.algorithm!r}: an asynchronous buffer has no round "
                         "whose participants agree keys together")  # fmt: skip
    if algorithm.turns:
        raise ValueError(f"secagg.on with algorithm={fed.algorithm!r}: one client per round, and a sum of one "
                         "is its update")  # fmt: skip
    if not algorithm.uploads_deltas:
        raise ValueError(f"secagg.on with algorithm={fed.algorithm!r}: its server needs each client's adapter, "
                         "not their sum")  # fmt: skip
    if any(not isinstance(t, (privacy.ClientDP, SecureAggregation)) for t in fed.transforms):
        raise ValueError("secagg.on with compression='topk': each client's indices differ, so masked values "
                         "cannot be summed")  # fmt: skip
    if len(set(fed.stalenesses)) > 1:
        raise ValueError("secagg.on with per-client staleness: a round's uploads merge in groups, each of which "
                         "would need its own protocol instance")  # fmt: skip
    if fed.aggregation != "uniform":
        raise ValueError(f"secagg.on with aggregation={fed.aggregation!r}: the server sees only the sum, so "
                         "every client weighs the same")  # fmt: skip
    if policy is not None and (policy.max_norm_ratio or policy.max_delta_norm):
        raise ValueError("secagg.on with comm.max_delta_norm or comm.max_norm_ratio: the server cannot see an "
                         "individual update's norm (each is clipped to C before it is masked)")  # fmt: skip
    if len(algorithm.participants(fed, 0)) < 2:
        raise ValueError(f"secagg.on with {len(algorithm.participants(fed, 0))} client(s) a round: a sum of one is "
                         "its update")  # fmt: skip
