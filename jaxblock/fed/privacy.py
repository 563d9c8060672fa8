"""Differential privacy: its settings, the client-level transform, and the accounting.

Two levels (`DPConfig.level`), both accounted with dp-accounting:

  record   DP-SGD inside each client's block training (`local.DPSGD`): every local step samples from
           the client's n_i examples (`sampling`: B of them without replacement, or each one
           independently with probability q = B / n_i, Poisson), clips each example's gradient of
           the active block to C, adds N(0, (zC)^2) to the sum and divides by B (with Poisson
           sampling the expected batch size q n_i = B, never the number drawn). The unit of
           privacy is one record of one client; each client's epsilon is its own guarantee.
  client   each participating client clips its whole upload to C (`ClientDP.encode`); the server
           adds N(0, (zC)^2) to the sum and divides by the fixed number of sampled clients M
           (`ClientDP.aggregate`), or each client adds N(0, z^2 C^2 / M) before it uploads
           (`noise='distributed'`, for secure aggregation). The unit is a whole client.

Sensitivity: under replace-one adjacency a clipped sum moves by up to 2C (one term of norm <= C
replaced by another), so noise of standard deviation zC is a Gaussian mechanism of noise multiplier
z / 2 relative to that sensitivity; the RDP events below carry z / 2 (`GaussianDpEvent(z)` would
assume sensitivity C, true only for add/remove). dp-accounting's PLD accountant reads a Gaussian
under replace-one as a move from -s to +s, doubling the sensitivity itself, so its events carry z
(the same pair of distributions: N(0, (zC)^2) against N(2C, (zC)^2)). Under add/remove adjacency
(Poisson sampling: one record more or fewer) the sum moves by at most C, so the event is
`GaussianDpEvent(z)` for both accountants. Amplification by subsampling needs a sample the adversary
does not know: at record level it is drawn from the client's secret seed, so each step is a
`SampledWithoutReplacementDpEvent` (replace-one) or a `PoissonSampledDpEvent` (add/remove); at
client level the round plans (who takes part) are public (a function of the run's seed, published in
the store), so a client's epsilon composes a plain Gaussian over the rounds it took part in, with no
amplification.

Adaptive clipping (client level, central noise; Andrew, Thakkar, McMahan, Ramaswamy, "Differentially
Private Learning with Adaptive Clipping", NeurIPS 2021, Algorithm 1, geometric update): the server
announces the round's clip norm C_t with its plan; each client clips to it and reports, beside its
upload, b_i = 1 if its update's norm was at most C_t; the server adds N(0, sigma_b^2) to sum b_i,
divides by M (clamped to [0, 1]: post-processing) and sets C <- C exp(-eta (b_bar - gamma)), so C
tracks the gamma-quantile of the update norms. The update's noise is z_delta C_t with
z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), and the pair (sum, count) spends exactly what the sum alone
spends with z (`update_multiplier` has the argument), so the accounting is the non-adaptive one.

Noise is drawn from `noise_seed`, a secret of the party that adds it (the server for central noise,
each client for its own): whoever knows it can subtract the noise, and two runs with one seed draw
the same noise (never reuse one). -1 (the default) makes a random one and keeps it in the party's
workdir (`dp_secret`), so that a resumed run draws the same noise. Keys use all 63 bits of it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np

from jaxblock.fed.transforms import Transform
from jaxblock.fed.wire import WIRE_DTYPES


class _Imported:
    """dp_accounting, imported where it is first used: its import (scipy's signal and stats for
    PLD) costs ~0.8 s, which every process of a run without DP would otherwise pay at startup."""

    def __getattr__(self, name: str):
        import dp_accounting as module

        return getattr(module, name)


dp_accounting = _Imported()

LEVELS = ("none", "record", "client")
NOISES = ("central", "distributed")
ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("without_replacement", "poisson")
# dp-accounting's PLD grid (its default is 1e-4): 10x faster, and epsilon moved by < 2e-4 relative
# in the configs measured (the estimate stays pessimistic, an upper bound, at any interval).
PLD_DISCRETIZATION = 1e-3
SECRET_FILE = "dp_secret"


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """The `dp` section of a run config (`--config.dp.*`)."""

    level: str = "none"  # 'none', 'record' (DP-SGD in each client) or 'client' (clip uploads, noise the sum)
    noise: str = "central"  # client level: 'central' (the server adds it) or 'distributed' (each client)
    noise_multiplier: float = 0.0  # z: noise std / clip norm; 0 with target_epsilon: calibrated
    target_epsilon: float = 0.0  # calibrate z so the whole run spends this much (at `delta`)
    delta: float = 1e-5
    clip_norm: float = 1.0  # C: per-example gradient (record) or per-client upload (client) L2 bound
    accountant: str = "rdp"  # 'rdp' or 'pld' (not with record-level sampling without replacement: `check`)
    sampling: str = "without_replacement"  # record level: each step's sample, or 'poisson' (each example w.p. q)
    noise_seed: int = -1  # the noise's secret seed; -1: random, kept in the workdir's dp_secret
    adaptive_quantile: float = 0.0  # gamma: the clip norm tracks this quantile of update norms (0: fixed C)
    adaptive_lr: float = 0.2  # eta_C: C changes by at most exp(eta_C) a round (geometric update)
    count_noise: float = 0.0  # sigma_b: std of the noise on the count of unclipped uploads (0: M / 20)

    def __post_init__(self):
        choices_of = {"level": LEVELS, "noise": NOISES, "accountant": ACCOUNTANTS, "sampling": SAMPLINGS}
        for name, choices in choices_of.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"dp.{name}={getattr(self, name)!r}: choose one of {', '.join(choices)}")
        if not self.on:
            return
        if not self.clip_norm > 0:
            raise ValueError(f"dp.clip_norm={self.clip_norm}: must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp.delta={self.delta}: must be in (0, 1)")
        if self.noise_multiplier < 0 or self.target_epsilon < 0:
            raise ValueError("dp.noise_multiplier and dp.target_epsilon must be >= 0")
        if (self.noise_multiplier > 0) == (self.target_epsilon > 0):
            raise ValueError(
                f"dp.level={self.level!r} needs one of dp.noise_multiplier (z) or dp.target_epsilon, not "
                f"{'both' if self.noise_multiplier else 'neither'}"
            )
        if self.noise == "distributed" and self.level != "client":
            raise ValueError("dp.noise='distributed' is a client-level setting (dp.level='client')")
        if self.adaptive:
            self._check_adaptive()

    def _check_adaptive(self) -> None:
        if not 0 < self.adaptive_quantile < 1:
            raise ValueError(f"dp.adaptive_quantile={self.adaptive_quantile}: must be in (0, 1) (0: off)")
        if not self.adaptive_lr > 0 or not self.count_noise >= 0:
            raise ValueError(f"dp.adaptive_lr={self.adaptive_lr} must be > 0 and dp.count_noise={self.count_noise} "
                             ">= 0 (0: M / 20)")  # fmt: skip
        if self.level != "client":
            raise ValueError(f"dp.adaptive_quantile with dp.level={self.level!r}: record level clips each "
                             "example's gradient, and there is no per-client clip norm to adapt; it is a "
                             "client-level setting")  # fmt: skip
        if self.noise == "distributed":
            raise ValueError("dp.adaptive_quantile with dp.noise='distributed': the clients' clipped-or-not bits "
                             "would need their own noise shares and a secure sum, as the update has; use "
                             "dp.noise='central'")  # fmt: skip

    @property
    def adaptive(self) -> bool:
        """Adaptive clipping (client level): the clip norm follows a quantile of the update norms."""
        return self.on and self.adaptive_quantile != 0

    @property
    def on(self) -> bool:
        return self.level != "none"

    def public(self) -> dict:
        """Its settings without the secret (for summaries, metrics and the store)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "noise_seed"}


def from_config(section) -> DPConfig:
    """The `dp` section of a run config (a run written before it existed: DP off)."""
    return DPConfig(**(section.to_dict() if section is not None else {}))


def secret_seed(dp: DPConfig, workdir: str | None) -> int:
    """`dp.noise_seed`, or (-1) the random seed kept in `workdir`/dp_secret, or a new random one
    (`keep_secret` writes it once the run's settings are checked): a resumed run draws the same
    noise, and the seed never enters a file that is shared."""
    if dp.noise_seed >= 0:
        return dp.noise_seed
    path = os.path.join(workdir, SECRET_FILE) if workdir else None
    if path and os.path.exists(path):
        with open(path) as f:
            return int(f.read().strip())
    return secrets.randbits(63)


def keep_secret(dp: DPConfig, workdir: str, seed: int) -> None:
    """Writes a random `secret_seed` to `workdir`/dp_secret (mode 0600), if it is not there yet."""
    path = os.path.join(workdir, SECRET_FILE)
    if dp.noise_seed >= 0 or os.path.exists(path):
        return
    os.makedirs(workdir, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(f"{seed}\n")


# ----------------------------------------------------------------------------- client level


def key_of(*words: int) -> jax.Array:
    """A threefry key from every bit of `words` (a 63-bit secret, a round, ...): `jax.random.key(seed)`
    keeps only 32 bits of a seed without x64, few enough to search."""
    data = np.random.default_rng([int(w) for w in words]).integers(0, 2**32, 2, dtype=np.uint32)
    return jax.random.wrap_key_data(data)


def clip(tree: dict, clip_norm: float) -> dict:
    """The tree scaled to L2 norm (over every leaf) at most `clip_norm`; a non-finite value counts as
    0 (a diverged client sends a bounded update, not a rejection that would itself tell something)."""
    return _clip_and_norm(tree, clip_norm)[0]


def _clip_and_norm(tree: dict, clip_norm: float) -> tuple[dict, jax.Array]:
    """(`clip`'s tree, the norm it had before: non-finite values as 0)."""
    tree = jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x.astype(jnp.float32), 0.0), tree)
    leaves = jax.tree.leaves(tree)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
    return jax.tree.map(lambda x: x.astype(jnp.float32) * scale, tree), norm


def gaussian_like(tree: dict, key: jax.Array, std: float) -> dict:
    """N(0, std^2) per coordinate, float32, in `tree`'s shapes; one subkey per leaf (in tree order)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    noise = [std * jax.random.normal(k, jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves, strict=False)]
    return treedef.unflatten(noise)


UNCLIPPED = "dp_unclipped"  # adaptive clipping: the upload's leaf b_i (1.0: its norm was at most C_t)
COUNT_STREAM = 0x636C6970  # the count's noise: key words (secret, round, this), apart from the update's


def update_multiplier(z: float, count_noise: float) -> float:
    """z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2): the update's noise multiplier under adaptive clipping,
    so that the round's pair (noised sum, noised count) spends what the sum alone spends with z.

    Andrew et al. 2021, Theorem 1, restated for our replace-one adjacency. Scale the pair by its
    noise: u = (sum_i clip(Delta_i) / (z_delta C_t), sum_i b_i / sigma_b) plus N(0, I). Replacing one
    client moves the sum by at most 2 C_t (two terms of norm <= C_t) and the count by at most 1
    (b_i in {0, 1}), so u moves by at most sqrt((2 / z_delta)^2 + (1 / sigma_b)^2) = 2 sqrt(z_delta^-2
    + (2 sigma_b)^-2) = 2 / z. A Gaussian mechanism's privacy loss depends only on that norm (N(0, I)
    against N(v, I), rotated, is a one-dimensional pair), and 2 / z is exactly how far the
    non-adaptive sum with noise z C moves (2C / (zC)). So a round is the same pair of distributions as
    the non-adaptive round with z: `rounds_event` (GaussianDpEvent(z / 2) for RDP against the whole
    move, GaussianDpEvent(z) for PLD, which doubles a replace-one sensitivity itself) describes it
    unchanged. (The paper, under add/remove, centres the bits, b_i - 1/2, for a count sensitivity of
    1/2 against the sum's C; replace-one needs no centring, both moves double.) C_t is a function of
    earlier rounds' released counts: adaptive composition, which RDP and PLD composition cover. The
    division by M, the clamp to [0, 1], the geometric update and the next plan are post-processing."""
    if not 2 * count_noise > z:
        raise ValueError(f"dp.count_noise={count_noise:g} (sigma_b; 0 means M / 20) must exceed z / 2 = {z / 2:g} "
                         "for the update's noise multiplier (z^-2 - (2 sigma_b)^-2)^(-1/2) to exist: raise "
                         "dp.count_noise or lower z")  # fmt: skip
    return (z**-2 - (2 * count_noise) ** -2) ** -0.5


def count_noise(dp: DPConfig, clients_per_round: int) -> float:
    """sigma_b: `dp.count_noise`, or M / 20 (the paper's choice)."""
    return dp.count_noise or clients_per_round / 20


@dataclasses.dataclass(frozen=True)
class ClientDP(Transform):
    """Client-level DP as an update transform.

    Client: clip the upload to C (`noise='distributed'`: and add N(0, z^2 C^2 / M), keyed by the
    client's seed and its upload count, kept in state['extra']['dp']). Server (`aggregate`): the
    accepted uploads summed with the fixed weights 1/M, M = the round's sampled clients (never the
    number that arrived), plus N(0, (zC)^2) / M keyed by (seed, round) for central noise.

    Adaptive clipping (`adaptive_quantile` gamma > 0, central noise): C is the round's, announced by
    the server with the plan (`announce`, `for_round`; C_0 = `clip_norm`); the client's upload gains
    the leaf UNCLIPPED (b_i); the server's `reduce` strips it before anything reads the update, and
    reports the noised fraction b_bar = clamp((sum of the merged uploads' b_i + N(0, sigma_b^2)) / M)
    (noise keyed by (seed, round, COUNT_STREAM)); `observe` sets C <- C exp(-eta (b_bar - gamma)).
    A round's C is the one current when its plan is published: with staleness s, the merges of the
    rounds up to t - 1 - s have moved it (FedBCD, s = 0: Algorithm 1 exactly). The update's noise is
    z_delta C (`update_multiplier`).
    """

    clip_norm: float = 1.0
    noise_multiplier: float = 0.0  # z, as accounted
    noise: str = "central"
    clients_per_round: int = 1  # M
    seed: int = 0  # the adding party's secret (the server's for central, each client's for distributed)
    adaptive_quantile: float = 0.0  # gamma (0: C fixed)
    adaptive_lr: float = 0.2  # eta_C
    count_noise: float = 0.0  # sigma_b (resolved: > z / 2)

    @property
    def key(self) -> str:  # distributed noise counts each client's uploads (its draws); central keeps nothing
        return "dp" if self.noise == "distributed" else ""

    @property
    def adaptive(self) -> bool:
        return self.adaptive_quantile != 0

    @property
    def update_multiplier(self) -> float:
        """The multiplier of the update's noise: z, or z_delta with adaptive clipping."""
        return update_multiplier(self.noise_multiplier, self.count_noise) if self.adaptive else self.noise_multiplier

    def settings(self) -> dict:
        out = {"dp.level": "client", "dp.noise": self.noise, "dp.clip_norm": self.clip_norm,
               "dp.noise_multiplier": self.noise_multiplier}  # fmt: skip
        if self.adaptive:
            out.update({"dp.adaptive_quantile": self.adaptive_quantile, "dp.adaptive_lr": self.adaptive_lr,
                        "dp.count_noise": self.count_noise})  # fmt: skip
        return out

    def encode(self, state, client, block, tree):
        if self.adaptive:  # b_i: was the update within the round's C (before clipping)
            tree, norm = _clip_and_norm(tree, self.clip_norm)
            return {**tree, UNCLIPPED: (norm <= self.clip_norm).astype(jnp.float32)}, state
        tree = clip(tree, self.clip_norm)
        if self.noise != "distributed":
            return tree, state
        count = int(state.get(f"c{client}", 0))
        key = key_of(self.seed, client, count)
        std = self.noise_multiplier * self.clip_norm / math.sqrt(self.clients_per_round)
        noisy = jax.tree.map(jnp.add, tree, gaussian_like(tree, key, std))
        return noisy, {**state, f"c{client}": np.asarray(count + 1, np.int64)}  # an array: checkpointed

    def aggregate(self, algorithm, uploads, weights, clients, round_):
        fixed = np.full(len(uploads), 1.0 / self.clients_per_round, np.float32)
        if self.noise == "distributed":  # the clients' noise sums to N(0, (zC)^2)
            return algorithm.reduce(uploads, fixed, clients)
        uploads = [clip(u, self.clip_norm) for u in uploads]  # clipped again: the wire's rounding may add a hair
        key = key_of(self.seed, round_)
        std = self.update_multiplier * self.clip_norm
        return algorithm.private_reduce(uploads, fixed, clients, lambda like: gaussian_like(like, key, std))

    # --- adaptive clipping: the server's clip norm, announced with each plan

    def wire_shapes(self, like):
        return {**like, UNCLIPPED: jax.ShapeDtypeStruct((), jnp.float32)} if self.adaptive else like

    def wire_leaves(self, like, wire_dtype):
        leaves = super().wire_leaves(like, wire_dtype)
        if self.adaptive:
            leaves[UNCLIPPED] = ((), WIRE_DTYPES[wire_dtype].name, None)
        return leaves

    def announce(self, server, round_):
        if not self.adaptive:
            return {}, server
        now = server.get("clip_norm", self.clip_norm)  # C_0 = dp.clip_norm
        return {"clip_norm": now}, {**server, "clip_norm": now}

    def for_round(self, announced):
        if not self.adaptive:
            return self
        c = announced.get("clip_norm")
        if isinstance(c, bool) or not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
            raise ValueError(f"adaptive clipping: the round's clip_norm {c!r} is not a positive number")
        return dataclasses.replace(self, clip_norm=float(c))

    def policy(self, base):  # the round's C (a fixed C: `policy` below, the same bound)
        if self.noise != "central":
            return base
        bound = self.clip_norm * 1.01
        return dataclasses.replace(base, max_delta_norm=min(base.max_delta_norm or bound, bound))

    def reduce(self, uploads, like, inner, round_=0):
        """Adaptive clipping: each upload's b_i taken off before validation and the sum see it; the
        merge's Result reports b_bar over the uploads it merged."""
        if not self.adaptive:
            return super().reduce(uploads, like, inner, round_)
        bits = {c: float(np.asarray(u[UNCLIPPED])) >= 0.5 for c, u in uploads.items()}  # a lie stays in {0, 1}
        result = inner({c: {k: v for k, v in u.items() if k != UNCLIPPED} for c, u in uploads.items()})
        count = sum(bits[c] for c in result.merged)
        noise = np.random.default_rng([self.seed, round_, COUNT_STREAM]).standard_normal()
        fraction = min(1.0, max(0.0, (count + self.count_noise * float(noise)) / self.clients_per_round))
        return dataclasses.replace(result, report={**result.report, "unclipped": fraction})

    def observe(self, server, round_, report):
        if not self.adaptive or "unclipped" not in report:
            return server
        step = -self.adaptive_lr * (report["unclipped"] - self.adaptive_quantile)  # geometric: C <- C exp(step)
        return {**server, "clip_norm": server.get("clip_norm", self.clip_norm) * math.exp(step)}


def policy(base, dp: DPConfig):
    """The validation policy of a run: with central client-level DP, an upload's norm must be at most
    C (1% over: the wire's bfloat16 rounding), so a client that did not clip is rejected. Adaptive
    clipping: each round's C (`ClientDP.policy`, applied per round by the server side)."""
    if dp.level != "client" or dp.noise != "central" or dp.adaptive:
        return base
    bound = dp.clip_norm * 1.01
    return dataclasses.replace(base, max_delta_norm=min(base.max_delta_norm or bound, bound))


# ----------------------------------------------------------------------------- accounting


def _relations():
    """(replace-one, add/remove-one): the two adjacencies this module states its events under."""
    relation = dp_accounting.NeighboringRelation
    return relation.REPLACE_ONE, relation.ADD_OR_REMOVE_ONE


def record_event(
    examples: int, batch_size: int, z: float, steps: int, sampling: str = "without_replacement"
) -> dp_accounting.DpEvent:
    """A client's record-level DP-SGD: `steps` steps, each a sample of its examples.

    Without replacement (replace-one adjacency): batch_size of them; one record swapped moves the
    clipped sum by up to 2C, so noise zC is `GaussianDpEvent(z / 2)`. Poisson (add/remove
    adjacency): each example with probability q = batch_size / examples; one record more or fewer
    moves the sum by at most C (the record's term is there or not), so noise zC is
    `GaussianDpEvent(z)`, not z / 2; dividing by the fixed B instead of the number drawn is
    post-processing of the noised sum. q is a constant of the run, fixed from n_i at setup (which
    summary.json publishes anyway), so both neighbours are sampled with one q, as every DP-SGD
    accountant assumes."""
    gaussian = dp_accounting.GaussianDpEvent
    if sampling == "poisson":
        step = dp_accounting.PoissonSampledDpEvent(batch_size / examples, gaussian(z))
    else:
        step = dp_accounting.SampledWithoutReplacementDpEvent(examples, batch_size, gaussian(z / 2))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def rounds_event(z: float, rounds: int, accountant: str = "rdp") -> dp_accounting.DpEvent:
    """Client-level DP for one client: the Gaussian merges of the `rounds` rounds it took part in.
    Who takes part is public (the plans), so there is no amplification by sampling. Replace-one: the
    sum moves by up to 2C; the RDP accountant takes the event's multiplier against that whole move
    (z / 2), the PLD accountant against half of it (z: it doubles the sensitivity under replace-one)."""
    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z if accountant == "pld" else z / 2), rounds)


def _relation(event: dp_accounting.DpEvent):
    """The adjacency an event is stated under: add/remove for Poisson sampling, else replace-one."""
    while isinstance(event, dp_accounting.SelfComposedDpEvent):
        event = event.event
    replace_one, add_or_remove = _relations()
    return add_or_remove if isinstance(event, dp_accounting.PoissonSampledDpEvent) else replace_one


def _accountant(name: str, relation=None):
    """A fresh accountant (replace-one unless `relation`); `check` refuses the events PLD has no
    analysis for before a run gets here."""
    relation = relation or _relations()[0]
    if name == "pld":
        return dp_accounting.pld.PLDAccountant(relation, value_discretization_interval=PLD_DISCRETIZATION)
    if name != "rdp":
        raise ValueError(f"dp.accountant={name!r}: choose one of {', '.join(ACCOUNTANTS)}")
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)


def epsilon(event: dp_accounting.DpEvent, delta: float, accountant: str = "rdp") -> float:
    """The event's epsilon at `delta` (dp-accounting's RDP or PLD accountant, under the event's adjacency)."""
    acct = _accountant(accountant, _relation(event))
    acct.compose(event)
    return float(acct.get_epsilon(delta))


PLD_FLOOR = 0.125  # PLD calibration searches z no lower (its grid grows as 1 / z^2): epsilon there is in the hundreds


def _pld_bracket(make_event, target_epsilon: float, delta: float) -> tuple[float | None, float]:
    """(lo, hi) with make_event(lo) over the target and make_event(hi) within it, from z = 1 by doubling
    or halving; or (None, PLD_FLOOR) if even the floor is within it. dp-accounting's own search starts
    from its lower endpoint, and a PLD at z = 1e-3 has ~1e9 grid points."""
    over = functools.cache(lambda z: epsilon(make_event(z), delta, "pld") > target_epsilon)
    lo, hi = 1.0, 2.0
    if over(lo):
        while over(hi):
            lo, hi = hi, 2 * hi
        return lo, hi
    while not over(lo):
        if lo <= PLD_FLOOR:
            return None, lo
        lo, hi = lo / 2, lo
    return lo, hi


def calibrate(make_event, target_epsilon: float, delta: float, accountant: str = "rdp") -> float:
    """The smallest noise multiplier z whose `make_event(z)` spends at most `target_epsilon` (PLD: at
    least PLD_FLOOR)."""
    relation = _relation(make_event(1.0))
    if accountant == "pld":
        lo, hi = _pld_bracket(make_event, target_epsilon, delta)
        if lo is None:
            return hi
        bracket = dp_accounting.ExplicitBracketInterval(lo, hi)
    else:
        bracket = dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant, relation), make_event, target_epsilon, delta, bracket, tol=1e-4
    )
    z = float(z)
    while epsilon(make_event(z), delta, accountant) > target_epsilon:  # Brent's tolerance may land a hair above
        z *= 1 + 1e-4
    return z


def _rounds_taken(fed, participants, rounds: int) -> np.ndarray:
    """How many of rounds [0, rounds) each client takes part in (the plans are a function of the settings)."""
    counts = np.zeros(fed.num_clients, np.int64)
    for t in range(rounds):
        counts[participants(fed, t)] += 1
    return counts


def events(dp: DPConfig, fed, algorithm, z: float, rounds: int, client_sizes, batch_size: int) -> list:
    """The DP events of rounds [0, rounds), one per client: record level, its own steps; client
    level, the rounds it takes part in (distributed noise: one upload's share, z / sqrt(M), which
    is what an upload read without secure aggregation holds)."""
    taken = _rounds_taken(fed, algorithm.participants, rounds)
    if dp.level == "record":
        steps = taken * fed.local_steps
        return [
            record_event(int(n), batch_size, z, int(k), dp.sampling) for n, k in zip(client_sizes, steps, strict=True)
        ]
    share = z / math.sqrt(len(algorithm.participants(fed, 0))) if dp.noise == "distributed" else z
    return [rounds_event(share, int(k), dp.accountant) for k in taken]


def sum_events(dp: DPConfig, fed, algorithm, z: float, rounds: int, summed: dict[int, int] | None = None) -> list:
    """Distributed noise: the DP events of rounds [0, rounds)'s sums as they were released, one per
    client. A round whose sum holds S of its M planned uploads carries S shares of the noise, the
    multiplier z sqrt(S / M): a dropout takes its share away. `summed` {round: S}; a round not in it
    holds all M (the plan); S = 0 released nothing. The client is counted in every round its plans
    name it (an upper bound, as `events`)."""
    m = len(algorithm.participants(fed, 0))
    per_client = [collections.Counter() for _ in range(fed.num_clients)]
    for t in range(rounds):
        if (s := (summed or {}).get(t, m)) > 0:
            for c in algorithm.participants(fed, t):
                per_client[c][s] += 1
    out = []
    for counts in per_client:
        parts = [rounds_event(z * math.sqrt(s / m), k, dp.accountant) for s, k in sorted(counts.items())]
        out.append(dp_accounting.ComposedDpEvent(parts) if len(parts) > 1 else (parts or [rounds_event(z, 0)])[0])
    return out


def budget(
    dp: DPConfig, fed, algorithm, z: float, rounds: int, client_sizes, batch_size: int, summed: dict | None = None
) -> dict:
    """summary.json's `dp`: the settings and what rounds [0, rounds) spent; `summed` {round: uploads in
    its sum} when the server saw rounds fall short of their plan (distributed noise: `sum_events`)."""
    taken = _rounds_taken(fed, algorithm.participants, rounds)
    run = events(dp, fed, algorithm, z, rounds, client_sizes, batch_size)
    eps = [_epsilon_cached(e, dp.delta, dp.accountant) for e in run]
    out = {**dp.public(), "noise_multiplier": z, "epsilon": max(eps), "epsilon_per_client": eps}
    if dp.noise == "distributed" and dp.level == "client":  # what the sum alone spends (secure aggregation)
        sums = sum_events(dp, fed, algorithm, z, rounds, summed)
        out["epsilon_if_only_the_sum_is_seen"] = max(_epsilon_cached(e, dp.delta, dp.accountant) for e in sums)
        m = len(algorithm.participants(fed, 0))
        out["rounds_short_of_noise"] = sorted(t for t, s in (summed or {}).items() if t < rounds and s < m)
    if dp.level == "record":
        steps = [int(k) * fed.local_steps for k in taken]
        out.update(examples_per_client=[int(n) for n in client_sizes], steps_per_client=steps)
    else:
        out.update(rounds_per_client=[int(k) for k in taken])
    if dp.adaptive:  # the same epsilon as z's (`update_multiplier`); the update's noise is z_delta C_t
        sigma_b = count_noise(dp, len(algorithm.participants(fed, 0)))
        out.update(count_noise=sigma_b, noise_multiplier_update=update_multiplier(z, sigma_b))
    return out


def noise_multiplier(dp: DPConfig, fed, algorithm, client_sizes, batch_size: int) -> float:
    """z: `dp.noise_multiplier`, or the smallest z with which the whole run spends at most
    `dp.target_epsilon` (record level: every client)."""
    if dp.noise_multiplier > 0:
        return dp.noise_multiplier
    distinct = {}
    for i, event in enumerate(events(dp, fed, algorithm, 1.0, fed.rounds, client_sizes, batch_size)):
        if event.count:  # a client that never takes part spends nothing, whatever z
            distinct.setdefault(repr(event), i)  # clients alike (same examples and steps) calibrate once
    zs = [0.0]
    for i in distinct.values():
        make = lambda z, i=i: events(dp, fed, algorithm, z, fed.rounds, client_sizes, batch_size)[i]  # noqa: E731
        zs.append(calibrate(make, dp.target_epsilon, dp.delta, dp.accountant))
    return max(zs)


_BASE_RDP: dict = {}
_BASE_PLD: dict = {}
_PLD_EPSILON: dict = {}


def _epsilon_cached(event, delta: float, accountant: str) -> float:
    """`epsilon(event, delta, accountant)` from a cache of each base event's curve: a self-composed
    event's RDP is count x its base's (as `RdpAccountant.compose` computes it), and a run asks for the
    same base every round with one more step. PLD: a Poisson step's PLD is built once and
    self-composed as `PLDAccountant.compose` does it (the same floats); a plain Gaussian's count goes into its std
    (dp-accounting's exact composition), so it is computed afresh; each result is kept."""
    if isinstance(event, dp_accounting.ComposedDpEvent):  # rounds of different noise (`sum_events`)
        if accountant == "pld":
            return epsilon(event, delta, accountant)
        curve = sum(_rdp_curve(e.event) * e.count for e in event.events)
        return _rdp_epsilon(curve, delta)
    count, base = (event.count, event.event) if isinstance(event, dp_accounting.SelfComposedDpEvent) else (1, event)
    if count == 0:
        return 0.0
    if accountant == "pld":
        done = (repr(event), delta)  # clients alike (same examples and steps, or rounds) ask once
        if done not in _PLD_EPSILON:
            if isinstance(base, dp_accounting.PoissonSampledDpEvent):
                pld = dp_accounting.pld.privacy_loss_distribution
                if repr(base) not in _BASE_PLD:  # the call PLDAccountant.compose makes for this event
                    _BASE_PLD[repr(base)] = pld.from_gaussian_mechanism(
                        standard_deviation=base.event.noise_multiplier,
                        value_discretization_interval=PLD_DISCRETIZATION,
                        sampling_prob=base.sampling_probability,
                        neighboring_relation=_relations()[1],
                    )
                run = pld.identity(PLD_DISCRETIZATION).compose(_BASE_PLD[repr(base)].self_compose(count))
                _PLD_EPSILON[done] = float(run.get_epsilon_for_delta(delta))
            else:
                _PLD_EPSILON[done] = epsilon(event, delta, accountant)
        return _PLD_EPSILON[done]
    return _rdp_epsilon(count * _rdp_curve(base), delta)


def _rdp_curve(base) -> np.ndarray:
    """The RDP curve of one base event, computed once."""
    key = repr(base)
    if key not in _BASE_RDP:
        acct = _accountant("rdp", _relation(base))
        acct.compose(base)
        _BASE_RDP[key] = np.asarray(acct._rdp)  # dp-accounting keeps the curve on the accountant
    return _BASE_RDP[key]


def _rdp_epsilon(curve: np.ndarray, delta: float) -> float:
    orders = dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    eps, _ = dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon(orders, curve, delta)
    return float(eps)


def check(dp: DPConfig, fed, algorithm, policy=None) -> None:
    """ValueError, in one line saying why, for a combination whose guarantee would not hold as stated."""
    if not dp.on:
        return
    if dp.level == "client" and policy is not None and policy.max_norm_ratio:
        raise ValueError(f"dp.level='client' with comm.max_norm_ratio={policy.max_norm_ratio:g}: a rejection "
                         "against the median of the other clients' norms depends on their data")  # fmt: skip
    if algorithm.asynchronous:
        raise ValueError(f"dp.level={dp.level!r} with algorithm={fed.algorithm!r}: an asynchronous buffer merges "
                         "unequal numbers of late updates and a client's steps depend on timing, so no fixed "
                         "event describes a merge; use a synchronous method")  # fmt: skip
    others = [t for t in fed.transforms if not isinstance(t, ClientDP)]
    if others and dp.level == "client":
        raise ValueError(f"dp.level='client' with compression={fed.flat().get('compression')!r}: top-k picks "
                         "coordinates from un-noised deltas, which the selection itself would reveal")  # fmt: skip
    if dp.level == "client" and len(set(fed.stalenesses)) > 1:
        raise ValueError("dp.level='client' with per-client staleness: a round's deltas merge in groups at "
                         "different rounds, each of which would need its own noise and M")  # fmt: skip
    if fed.schedule == "gradient":
        raise ValueError("dp with schedule='gradient': the block is chosen from un-noised gradient norms of "
                         "client data, and the choice is released")  # fmt: skip
    if dp.level == "client" and not algorithm.uploads_deltas:
        raise ValueError(f"dp.level='client' with algorithm={fed.algorithm!r}: its upload is a trained adapter, "
                         "public initialisation included, and its server stacks them instead of summing")  # fmt: skip
    if dp.level == "client" and fed.aggregation != "uniform":
        raise ValueError(f"dp.level='client' weights every client 1/M; aggregation={fed.aggregation!r} would make "
                         "a client's weight depend on its data")  # fmt: skip
    if dp.level == "client" and dp.sampling == "poisson":
        raise ValueError("dp.sampling='poisson' with dp.level='client': the signed plans name each round's "
                         "participants to every client in the store, so sampling gives no amplification (the "
                         "accounting already assumes none); it is a record-level setting")  # fmt: skip
    if dp.level == "record" and dp.accountant == "pld" and dp.sampling == "without_replacement":
        raise ValueError("dp.accountant='pld' with dp.sampling='without_replacement': dp-accounting's PLD "
                         "accountant has no event for sampling without replacement under replace-one "
                         "adjacency; use dp.sampling='poisson' or dp.accountant='rdp'")  # fmt: skip
