"""LocalBlockTraining (paper Algorithm 1): K optimizer steps on one block, returning its Delta.

`make_local_train(loss_fn, optimizer)` returns `train(block, frozen, batches) -> (delta, losses)`:
one jitted `lax.scan` over a `[K, ...]` stack of batches that differentiates the block alone
(`jax.grad` with respect to the block argument; the frozen leaves are an ordinary argument, not
constants baked into the executable), with optimizer state created fresh on every call for the
block's leaves only. Because only the block is differentiated, no gradient is computed for a
frozen leaf and no backward pass runs through the layers below the block.

With `dp=DPSGD(clip_norm, noise_multiplier)` every step is a DP-SGD step (Abadi et al. 2016) on the
block: per-example gradients, each clipped to norm C, summed, Gaussian noise of std z*C added.
With Poisson sampling (`DPSGD.expected_batch`) a step's batch is a fixed buffer whose `sample_mask`
marks the examples drawn: the masked ones add nothing, and the sum is divided by the expected size.
"""

from __future__ import annotations

import dataclasses
import operator
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxblock import model
from jaxblock.fed import privacy
from jaxblock.fed.blocks import merge, subtree_like
from jaxblock.model.config import ModelConfig
from jaxblock.model.sharding import Layout

LossFn = Callable[[dict, dict], jax.Array]  # (params, batch) -> scalar loss


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The local optimizer. Defaults are the paper's AdamW (Trainer defaults: eps 1e-6)."""

    name: str = "adamw"  # 'adamw' or 'sgd'
    learning_rate: float = 1e-5
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    schedule: str = "constant"  # over the K local steps of a round: 'constant', 'linear', 'cosine'
    warmup_steps: int = 0

    def __post_init__(self):
        if self.name not in ("adamw", "sgd"):
            raise ValueError(f"optimizer.name={self.name!r}: choose 'adamw' or 'sgd'")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"optimizer.schedule={self.schedule!r}: choose constant, linear or cosine")
        if self.learning_rate <= 0:
            raise ValueError(f"optimizer.learning_rate={self.learning_rate}: must be > 0")


def make_optimizer(cfg: OptimizerConfig, local_steps: int) -> optax.GradientTransformation:
    """The optax transformation for `cfg`; schedules run over the `local_steps` of one round."""
    lr = cfg.learning_rate
    decay_steps = max(local_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        schedule = optax.constant_schedule(lr)
    elif cfg.schedule == "linear":
        schedule = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        schedule = optax.cosine_decay_schedule(lr, decay_steps)
    if cfg.warmup_steps:
        warmup = optax.linear_schedule(0.0, lr, cfg.warmup_steps)
        schedule = optax.join_schedules([warmup, schedule], [cfg.warmup_steps])
    if cfg.name == "sgd":
        return optax.sgd(schedule, momentum=cfg.momentum or None)
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------- the LM loss


def token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """[B,T-1]: -log p(tokens[:, t+1]) predicted from position t (logits [B,T,V], tokens [B,T])."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [B,T-1,V]
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def next_token_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting tokens[:, t+1] from position t, over masked targets.

    Args:
      logits: [B,T,V] float32.
      tokens: [B,T] int32, padded to a fixed T.
      loss_mask: [B,T], 1 where tokens[:, t] is a response token to be predicted (0 on the prompt
        and on padding).
    """
    nll = token_nll(logits, tokens)
    weights = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def chunked_next_token_loss(
    cfg: ModelConfig, head: jax.Array, x: jax.Array, tokens, loss_mask, chunk: int, layout: Layout | None = None
) -> jax.Array:
    """`next_token_loss` from the final hidden states x [B,T,D] and the LM head (`model.head_of`),
    `chunk` positions at a time: the [B, T, V] float32 logits are never formed. Each chunk's logits
    are recomputed in backward (jax.checkpoint), so only one chunk's [B, chunk, V] is alive at once.
    Equal to `next_token_loss` up to summation order."""
    b, t, d = x.shape
    n = -(-(t - 1) // chunk)  # chunks over the T-1 predicting positions, the last one padded
    pad = n * chunk - (t - 1)
    xs = jnp.pad(x[:, :-1], ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)  # [n,B,c,D]
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)  # [n,B,c]
    weights = jnp.pad(loss_mask[:, 1:].astype(jnp.float32), ((0, 0), (0, pad)))
    ws = weights.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_nll(xc, tc, wc):
        logits = model.logits_of(cfg, head, xc, layout)  # [B,c,V]
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * wc)

    total = jax.lax.scan(lambda acc, c: (acc + chunk_nll(*c), None), jnp.float32(0), (xs, targets, ws))[0]
    return total / jnp.maximum(jnp.sum(weights), 1.0)


def lm_loss(cfg: ModelConfig, layout: Layout | None = None, loss_chunk: int = 0) -> LossFn:
    """`loss_fn(params, batch)` for the decoder; batch = {'tokens': [B,T], 'loss_mask': [B,T]}.
    `loss_chunk` > 0: the loss over that many positions at a time (`chunked_next_token_loss`)."""

    def loss_fn(params: dict, batch: dict) -> jax.Array:
        if loss_chunk:
            x = model.hidden(cfg, params, batch["tokens"], layout)
            head = model.head_of(cfg, params)
            return chunked_next_token_loss(cfg, head, x, batch["tokens"], batch["loss_mask"], loss_chunk, layout)
        logits = model.forward(cfg, params, batch["tokens"], layout=layout)
        return next_token_loss(logits, batch["tokens"], batch["loss_mask"])

    return loss_fn


# ----------------------------------------------------------------------------- DP-SGD


@dataclasses.dataclass(frozen=True)
class DPSGD:
    """Record-level DP-SGD of the local steps: clip each example's gradient to `clip_norm` (C),
    add N(0, (noise_multiplier * C)^2) per coordinate to their sum. `expected_batch` > 0: Poisson
    sampling, batches carry `sample_mask` and the sum is divided by this fixed q n_i (= batch_size),
    not by the number drawn (which would make the divisor depend on the sample); 0: fixed-size
    batches, divided by their size."""

    clip_norm: float
    noise_multiplier: float
    expected_batch: int = 0

    def __post_init__(self):
        if not self.clip_norm > 0:
            raise ValueError(f"dp.clip_norm={self.clip_norm}: must be > 0")
        if not self.noise_multiplier >= 0:
            raise ValueError(f"dp.noise_multiplier={self.noise_multiplier}: must be >= 0")
        if self.expected_batch < 0:
            raise ValueError(f"expected_batch={self.expected_batch}: must be >= 0")


def per_example_gradients(loss_fn: LossFn, block: dict, frozen: dict, batch: dict) -> tuple[jax.Array, dict]:
    """([B] losses, the block's gradient of each example: leaves [B, *leaf]); each example is
    its own batch of 1, so loss_fn sees [1, T]. Only the block is differentiated."""

    def example_loss(blk, example):
        return loss_fn(merge(blk, frozen), jax.tree.map(lambda x: x[None], example))

    return jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0))(block, batch)


def clip_scales(grads: dict, clip_norm: float) -> jax.Array:
    """[B]: min(1, C / (||g_i|| + tiny)) of each example's gradient (leaves [B, ...]), the L2 norm
    taken over all the block's leaves, so that one under C passes unchanged."""
    sq = sum(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in jax.tree.leaves(grads))  # [B]
    return jnp.minimum(1.0, clip_norm / (jnp.sqrt(sq) + jnp.finfo(jnp.float32).tiny))


def clip_per_example(grads: dict, clip_norm: float) -> dict:
    """Each example's gradient scaled to global L2 norm <= clip_norm."""
    scale = clip_scales(grads, clip_norm)
    return jax.tree.map(lambda g: g * scale.reshape(-1, *([1] * (g.ndim - 1))), grads)


def clipped_sum(grads: dict, clip_norm: float, mask: jax.Array | None = None) -> dict:
    """The sum of the clipped per-example gradients, as one contraction over the example axis:
    scaling B copies then summing them measured 70-90 ms of a ~430 ms DP step (bench_dp's wide
    shape, a loaded machine). `mask` [B] 0/1: only the examples it marks (a Poisson step's draw)."""
    scale = clip_scales(grads, clip_norm)
    if mask is not None:
        scale = scale * mask.astype(scale.dtype)
    return jax.tree.map(lambda g: jnp.tensordot(scale, g, axes=1), grads)


def gaussian_noise(tree: dict, std: float, noise_key: jax.Array) -> dict:
    """N(0, std^2) per coordinate, shaped as `tree`; noise_key: uint32 [2] threefry key data
    (`privacy.gaussian_like` draws it: one subkey per leaf)."""
    return privacy.gaussian_like(tree, jax.random.wrap_key_data(noise_key, impl="threefry2x32"), std)


def dp_gradient(loss_fn: LossFn, block: dict, frozen: dict, batch: dict, dp: DPSGD) -> tuple[jax.Array, dict]:
    """(mean per-example loss, DP-SGD gradient of the block) for one step's batch of B examples:
    (sum of clipped per-example gradients + N(0, (z C)^2)) / B.

    `batch` holds the model inputs ([B, ...]) and `noise_key` (uint32 [2]), which loss_fn never sees.
    The B per-example gradients take B x the block's size in memory: affordable because only the
    active block is differentiated, which is the point of block-coordinate DP. With z = 0 and C
    above every gradient's norm this is the mean of per-example gradients; for `lm_loss` that is the
    batch gradient when every example has as many target tokens (the batch loss weights examples
    by their target counts).

    With Poisson sampling (`dp.expected_batch`, `batch['sample_mask']` [B]) the B rows are a buffer:
    the unmarked ones are computed and multiplied by 0, the sum is divided by dp.expected_batch and
    the loss is the mean over the marked ones.
    """
    inputs = {name: x for name, x in batch.items() if name not in ("noise_key", "sample_mask")}
    losses, grads = per_example_gradients(loss_fn, block, frozen, inputs)
    mask = batch.get("sample_mask") if dp.expected_batch else None
    summed = clipped_sum(grads, dp.clip_norm, mask)
    noise = gaussian_noise(summed, dp.noise_multiplier * dp.clip_norm, batch["noise_key"])
    if mask is None:
        b = losses.shape[0]
        return jnp.mean(losses), jax.tree.map(lambda g, n: (g + n) / b, summed, noise)
    loss = jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss, jax.tree.map(lambda g, n: (g + n) / dp.expected_batch, summed, noise)


# ----------------------------------------------------------------------------- local training


def train_step(
    loss_fn: LossFn, optimizer, block: dict, frozen: dict, opt_state, batch: dict, lr_scale=1.0, dp: DPSGD | None = None
):
    """One optimizer step on the block: gradient with respect to `block` only.

    Returns (block, opt_state, loss). The block is float32 (a master copy); the model casts it
    to its compute dtype where it is used. `lr_scale` multiplies the step (for AdamW and SGD,
    exactly a learning rate times lr_scale): the federated run's decay across rounds. With `dp`,
    the gradient is `dp_gradient`'s and the loss the mean of the per-example losses.
    """
    if dp is None:
        loss, grads = jax.value_and_grad(lambda blk: loss_fn(merge(blk, frozen), batch))(block)
    else:
        loss, grads = dp_gradient(loss_fn, block, frozen, batch, dp)
    updates, opt_state = optimizer.update(grads, opt_state, block)
    updates = jax.tree.map(lambda u: u * lr_scale, updates)
    return optax.apply_updates(block, updates), opt_state, loss


def make_local_train(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    layout: Layout | None = None,
    param_shardings: dict | None = None,
    batch_axes: tuple[str, ...] = ("activation_batch", "activation_length"),
    dp: DPSGD | None = None,
):
    """Builds `train(block, frozen, batches, lr_scale=1.0) -> (delta, losses)`.

    Args:
      loss_fn: `(params, batch) -> scalar`, params being `merge(block, frozen)`.
      optimizer: an optax transformation; its state is initialised fresh on every call.
      layout, param_shardings: with a mesh, the shardings of the full params tree (e.g.
        `layout.tree_shardings(model.logical_axes(cfg))`); each call's block and frozen shardings
        are cut from it, batches are sharded by `batch_axes` after the leading K axis.
      dp: every step a DP-SGD step (`dp_gradient`); batches then hold `noise_key` uint32 [K, 2]
        (`data.make_sampled_batches_fn`), one key per step, replicated under a mesh.
    Returns:
      `train`, where batches is a pytree of [K, ...] arrays (K = local steps), lr_scale multiplies
      every step (a traced scalar: a new value does not recompile), delta has the block's
      structure in float32 (block after K steps minus block before) and losses is [K].
      `train.compilations()` counts executables built so far: one per distinct block structure
      (and argument shapes/dtypes).
    """
    if (layout is None) != (param_shardings is None):
        raise ValueError("make_local_train: pass both layout and param_shardings, or neither")
    executables: dict = {}
    traces = [0]

    def run(block, frozen, batches, lr_scale):
        traces[0] += 1  # Python side effect: runs once per trace, i.e. once per compilation
        master = jax.tree.map(lambda x: x.astype(jnp.float32), block)
        opt_state = optimizer.init(master)

        def step(carry, batch):
            blk, state = carry
            blk, state, loss = train_step(loss_fn, optimizer, blk, frozen, state, batch, lr_scale, dp)
            return (blk, state), loss

        (final, _), losses = jax.lax.scan(step, (master, opt_state), batches)
        return jax.tree.map(jnp.subtract, final, master), losses

    def train(block: dict, frozen: dict, batches: dict, lr_scale: float = 1.0):
        _check_noise_key(batches, dp)
        key = (jax.tree.structure(block), jax.tree.structure(frozen), jax.tree.structure(batches))
        if key not in executables:
            if layout is None:
                executables[key] = jax.jit(run)
            else:
                block_sh = subtree_like(param_shardings, block)
                frozen_sh = subtree_like(param_shardings, frozen)
                batch_sh = jax.tree.map(lambda x: layout.sharding((None, *batch_axes[: x.ndim - 1])), batches)
                if "noise_key" in batches:  # [K, 2], not a batch axis: every device draws the same noise
                    batch_sh["noise_key"] = layout.replicated
                executables[key] = jax.jit(
                    run,
                    in_shardings=(block_sh, frozen_sh, batch_sh, layout.replicated),
                    out_shardings=(block_sh, layout.replicated),
                )
        return executables[key](block, frozen, batches, jnp.float32(lr_scale))

    def batched(
        blocks: list[dict], frozens: list[dict], batches: list[dict], lr_scale: float = 1.0, shared: dict | None = None
    ):
        """`train` for M clients at once, as one `vmap`ped executable: [(delta, losses)] per client,
        equal to M calls of `train` up to float rounding. The blocks are stacked on a leading axis;
        a frozen leaf that `shared` marks True (default: every one) and that is the same array for
        every client is passed once, so its matmuls run over all M clients' tokens together; any
        other is stacked. Each pattern of shared leaves is its own executable: the simulator shares
        only the leaves no block contains, so that a block has one executable."""
        if layout is not None and layout.mesh.size > 1:
            raise ValueError("make_local_train: batched clients run on one device (sim.client_batch=1 under a mesh)")
        for b in batches:
            _check_noise_key(b, dp)
        shared = jax.tree.map(lambda _: True, frozens[0]) if shared is None else shared
        block_axes, block = _shared_or_stacked(blocks, jax.tree.map(lambda _: False, blocks[0]))
        frozen_axes, frozen = _shared_or_stacked(frozens, shared)
        stacked = _stack_batches(batches)
        key = ("batched", len(blocks), jax.tree.structure(block), jax.tree.structure(frozen),
               jax.tree.structure(stacked), tuple(jax.tree.leaves(block_axes, is_leaf=_is_none)),
               tuple(jax.tree.leaves(frozen_axes, is_leaf=_is_none)))  # fmt: skip
        if key not in executables:
            many, m = jax.vmap(run, in_axes=(block_axes, frozen_axes, 0, None)), len(blocks)
            executables[key] = jax.jit(lambda *args: _unstack(*many(*args), m))  # holds no client's arrays
        return executables[key](block, frozen, stacked, jnp.float32(lr_scale))

    train.batched = batched
    train.compilations = lambda: traces[0]
    return train


def _check_noise_key(batches: dict, dp: DPSGD | None) -> None:
    if dp is not None and "noise_key" not in batches:
        raise ValueError("make_local_train(dp=...): batches need 'noise_key' uint32 [K, 2] (make_sampled_batches_fn)")
    if dp is not None and bool(dp.expected_batch) != ("sample_mask" in batches):
        raise ValueError("make_local_train(dp=...): Poisson batches (with 'sample_mask') go with "
                         "DPSGD(expected_batch > 0), and only they")  # fmt: skip


def _stack_batches(batches: list[dict]) -> dict:
    """The clients' batches stacked on a new leading axis. Poisson batches whose buffers differ (a
    client whose draw overflowed the usual buffer) are padded with zero rows, masked out, to the widest."""
    if "sample_mask" in batches[0]:
        width = max(b["sample_mask"].shape[1] for b in batches)
        pad = lambda x: np.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        batches = [{k: v if k == "noise_key" else pad(np.asarray(v)) for k, v in b.items()} for b in batches]
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def _unstack(deltas: dict, losses: jax.Array, m: int) -> list[tuple[dict, jax.Array]]:
    """[(client i's delta, its losses)] from the stacked outputs, inside the executable: M x leaves
    slices dispatched one by one from Python took longer than the clients' training."""
    return [(jax.tree.map(operator.itemgetter(i), deltas), losses[i]) for i in range(m)]


def _is_none(x) -> bool:
    return x is None


def _shared_or_stacked(trees: list[dict], may_share: dict) -> tuple[dict, dict]:
    """(vmap in_axes, argument) for M trees of one structure: a leaf that `may_share` marks True and
    that is one array in all of them is passed once (axis None), any other is stacked (axis 0)."""
    columns = zip(*(jax.tree.leaves(t) for t in trees), strict=True)
    axes, args = [], []
    for column, ok in zip(columns, jax.tree.leaves(may_share), strict=True):
        shared = ok and all(x is column[0] for x in column)
        axes.append(None if shared else 0)
        args.append(column[0] if shared else jnp.stack(column))
    treedef = jax.tree.structure(trees[0])
    return treedef.unflatten(axes), treedef.unflatten(args)


def step_cost(
    loss_fn: LossFn,
    optimizer,
    block: dict,
    frozen: dict,
    batch: dict,
    *,
    layout: Layout | None = None,
    param_shardings: dict | None = None,
    donate: bool = False,
) -> dict[str, float]:
    """XLA's static cost of one compiled train step: flops and memory (nothing runs; the arguments
    may be arrays or `jax.ShapeDtypeStruct`s).

    With a layout, the step is compiled for its mesh as `make_local_train` places it (block and
    frozen leaves cut from `param_shardings`, the optimizer state sharded as its block, the batch on
    the batch axes) and every figure is per device. `donate`: the block's master copy and optimizer
    state are donated, so the step updates them in place, as the K-step scan does.

    Returns {'flops', 'temp_bytes', 'argument_bytes', 'output_bytes', 'alias_bytes', 'peak_bytes'
    (argument + output - alias + temp), 'opt_state_bytes' (the whole state, all devices),
    'block_params', 'compile_s'}.
    """
    master = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), block)
    opt_state = jax.eval_shape(optimizer.init, master)
    shardings = {}
    if layout is not None:
        block_sh = subtree_like(param_shardings, block)
        state_sh = optax.tree_map_params(
            optimizer, lambda _, sh: sh, opt_state, block_sh, transform_non_params=lambda _: layout.replicated
        )
        batch_sh = jax.tree.map(lambda x: layout.sharding(("activation_batch", "activation_length")[: x.ndim]), batch)
        shardings = {"in_shardings": (block_sh, subtree_like(param_shardings, frozen), state_sh, batch_sh)}
    step = lambda b, f, s, x: train_step(loss_fn, optimizer, b, f, s, x)  # noqa: E731
    fn = jax.jit(step, donate_argnums=(0, 2) if donate else (), **shardings)
    start = time.perf_counter()
    compiled = fn.lower(master, frozen, opt_state, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    out = {name: float(getattr(memory, f"{name}_size_in_bytes", 0)) for name in ("temp", "argument", "output", "alias")}
    out = {f"{k}_bytes": v for k, v in out.items()}
    return {
        "flops": float(cost.get("flops", 0.0)),
        **out,
        "peak_bytes": out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"],
        "opt_state_bytes": float(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state))),
        "block_params": float(sum(x.size for x in jax.tree.leaves(block))),
        "compile_s": compile_s,
    }
