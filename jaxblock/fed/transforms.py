"""Update transforms: composable wrappers around what a client uploads and how the server reads it.

A transform sits between an algorithm's `upload` (what a client would send) and the wire, and
between the wire and the algorithm's `reduce` (what the server makes of the uploads):

    client:  delta --upload--> u --t1.encode--> ... --tn.encode--> wire
    server:  wires --tn.reduce(..., inner = t(n-1).reduce(..., inner = ... algorithm's reduce))--> down

`encode(state, client, block, tree) -> (tree, state)` may keep client state (top-k's residual:
what it did not send); `reduce(uploads, like, inner)` turns the received trees back into what the
transform below it sent (default: `decode` each one) and calls `inner` on them; a transform that
cannot decode one upload alone (secure aggregation: masks cancel only in the sum) overrides
`reduce`. `wire_leaves(like, wire_dtype)` describes what the server must receive (shapes, dtypes,
index bounds), so that every exchange validates an upload before it reads its values.
`aggregate(algorithm, uploads, weights, clients, round_)` may replace the algorithm's reduce of the
accepted uploads (client-level DP: fixed weights 1/M and the server's noise).

A transform may also keep server state that changes from round to round (client-level DP's adaptive
clip norm): `announce(server, round_)` says what the server publishes with round t's plan (and its
state after), `for_round(announced)` is the transform as round t runs it on both sides (the client
reads the announcement from the plan), `policy(base)` the validation the round's uploads pass, its
server-side `reduce` may report public figures of the merge in the `Result` (`report`), and
`observe(server, round_, report)` folds them into the server state. That state is JSON, kept in the
run state's `extra_meta['transforms']` (checkpointed with it), with every round's announcement under
'announced'. A transform that announces nothing leaves the run state as it was.

A transform is a frozen dataclass of its settings; its client state lives in the run state under
`state['extra'][transform.key]` ({'c<client>': ...}) and is checkpointed with it. The round loop
and the server never name a transform: top-k is one, and a test plugs in a toy one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxblock.fed.blocks import path_str
from jaxblock.fed.wire import WIRE_DTYPES

# {leaf path: (shape, dtype name, index bound or None)}: what an upload must hold
Leaves = dict[str, tuple[tuple[int, ...], str, int | None]]


@dataclasses.dataclass(frozen=True)
class Transform:
    """The identity: sends the update as it is. Subclasses override what they change."""

    key = ""  # where its client state lives in state['extra'] ("" = it keeps none)

    def settings(self) -> dict:
        """Its settings as the flat config keys users type (for checkpoints and summaries)."""
        return {}

    def encode(self, state: dict, client: int, block: int, tree: dict) -> tuple[dict, dict]:
        return tree, state

    def decode(self, tree: dict, like: dict) -> dict:
        """One upload back as the dense tree `like` (shapes) describes."""
        return tree

    def reduce(self, uploads: dict[int, dict], like: dict, inner: Callable[[dict[int, dict]], object], round_: int = 0):
        return inner({c: self.decode(u, like) for c, u in uploads.items()})

    def aggregate(self, algorithm, uploads: list[dict], weights, clients: list[int], round_: int) -> dict | None:
        """What the server sends down from the accepted dense uploads, if this transform decides it
        (client-level DP: fixed weights and noise); None: the algorithm's `reduce` does."""
        return None

    def wire_leaves(self, like: dict, wire_dtype: str) -> Leaves:
        """The leaves an upload of a block of shapes `like` holds on the wire."""
        dtype = WIRE_DTYPES[wire_dtype].name
        return {path_str(p): (tuple(x.shape), dtype, None) for p, x in jax.tree_util.tree_flatten_with_path(like)[0]}

    def wire_shapes(self, like: dict) -> dict:
        """The shapes of what `encode` makes of a tree of shapes `like` (what the next transform sees)."""
        return like

    def announce(self, server: dict, round_: int) -> tuple[dict, dict]:
        """(what the server publishes with round `round_`'s plan, its transform state after), from its
        transform state `server` (JSON); ({}, server): nothing."""
        return {}, server

    def for_round(self, announced: dict) -> Transform:
        """This transform as a round runs it, given what the server announced with the round's plan
        (the client: the plan itself); ValueError if the announcement is not one it could have made."""
        return self

    def policy(self, base):
        """The validation policy of a round's uploads (client-level DP: at most the round's clip norm)."""
        return base

    def observe(self, server: dict, round_: int, report: dict) -> dict:
        """The server's transform state after a merge of round `round_` whose `reduce` reported `report`."""
        return server


def encode(transforms, state: dict, client: int, block: int, tree: dict) -> tuple[dict, dict]:
    """(what `client` sends for `tree`, the run state's `extra` with every transform's new client state)."""
    extra = dict(state)
    for t in transforms:
        own = extra.get(t.key, {}) if t.key else {}
        tree, own = t.encode(own, client, block, tree)
        if t.key:
            extra[t.key] = own
    return tree, extra


def reduce(transforms, uploads: dict[int, dict], like: dict, inner: Callable[[dict[int, dict]], object], round_=0):
    """The server's side of round `round_`: the last transform reads the wire first; `inner` sees
    the dense uploads."""
    likes = []
    for t in transforms:  # each transform's input shapes: the dense upload's, then the one before's output
        likes.append(like)
        like = t.wire_shapes(like)
    for t, shapes in zip(transforms, likes, strict=True):  # inner-most first: t1 wraps the algorithm's reduce
        inner = functools.partial(t.reduce, like=shapes, inner=inner, round_=round_)
    return inner(uploads)


def aggregate(transforms, algorithm, uploads: list[dict], weights, clients: list[int], round_: int) -> dict:
    """The server's down from the accepted uploads: the outermost transform that decides it, else
    the algorithm's `reduce`."""
    for t in reversed(transforms):
        down = t.aggregate(algorithm, uploads, weights, clients, round_)
        if down is not None:
            return down
    return algorithm.reduce(uploads, weights, clients)


def server_state(state: dict) -> dict:
    """The transforms' server state (JSON) in a run state (a server's or the simulator's)."""
    return state.get("extra_meta", {}).get("transforms", {})


def with_server_state(state: dict, server: dict) -> dict:
    """The run state holding `server` as the transforms' server state (unchanged if neither has any)."""
    if not server and not server_state(state):
        return state
    return {**state, "extra_meta": {**state.get("extra_meta", {}), "transforms": server}}


def announce(transforms, server: dict, round_: int) -> tuple[dict, dict]:
    """(what the server publishes with round `round_`'s plan, the transforms' server state with it
    recorded under 'announced'): nothing, and `server` as it was, unless a transform announces."""
    announced = {}
    for t in transforms:
        more, server = t.announce(server, round_)
        announced.update(more)
    if announced:
        server = {**server, "announced": {**server.get("announced", {}), str(round_): announced}}
    return announced, server


def announced(server: dict, round_: int) -> dict:
    """What the server announced with round `round_`'s plan ({}: nothing)."""
    return server.get("announced", {}).get(str(round_), {})


def for_round(transforms, announced: dict) -> tuple:
    """The transforms as a round runs them, given its announcement (or plan)."""
    return tuple(t.for_round(announced) for t in transforms)


def policy(transforms, base):
    """The validation policy of a round's uploads under the round's transforms."""
    for t in transforms:
        base = t.policy(base)
    return base


def observe(transforms, server: dict, round_: int, report: dict) -> dict:
    """The transforms' server state after a merge of round `round_` that reported `report`."""
    for t in transforms:
        server = t.observe(server, round_, report)
    return server


def wire_leaves(transforms, like: dict, wire_dtype: str) -> Leaves:
    for t in transforms[:-1]:
        like = t.wire_shapes(like)
    return (transforms[-1] if transforms else Transform()).wire_leaves(like, wire_dtype)


# ----------------------------------------------------------------------------- top-k


INDEX, VALUE = "index", "value"


@dataclasses.dataclass(frozen=True)
class TopK(Transform):
    """Top-k compression with error feedback (`compression='topk'`, an option of FedBCD and ParaBlock).

    A client uploads, of each leaf of its block delta, only the k = ceil(ratio * size) entries of
    largest magnitude, as int32 flat indices and their values; it keeps the rest as a residual for
    that block and adds it to its next delta of the same block (error feedback, Stich et al. 2018),
    so nothing it trained is lost, only delayed. On the wire a leaf costs k * (4 + 4) bytes instead
    of size * 4: 0.4x at the paper's ratio 0.2. The server densifies each upload and averages as usual.
    The client's own model keeps its whole delta as pending, so the lean form and ParaBlock's
    correction hold as without it. Residuals: state['extra']['residuals']['c<client>']['b<block>'].
    """

    ratio: float = 0.2
    key = "residuals"

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"topk_ratio={self.ratio}: must be in (0, 1]")

    def settings(self) -> dict:
        return {"compression": "topk", "topk_ratio": self.ratio}

    def encode(self, state, client, block, tree):
        mine = state.get(f"c{client}", {})
        upload, residual = compress(tree, mine.get(f"b{block}"), self.ratio)
        return upload, {**state, f"c{client}": {**mine, f"b{block}": residual}}

    def decode(self, tree, like):
        return densify(tree, like)

    def k(self, size: int) -> int:
        return max(1, math.ceil(self.ratio * size - 1e-9))

    def wire_leaves(self, like, wire_dtype):
        out = {}
        for path, x in jax.tree_util.tree_flatten_with_path(like)[0]:
            name, size = path_str(path), math.prod(x.shape)
            out[f"{name}/{INDEX}"] = ((self.k(size),), "int32", size)
            out[f"{name}/{VALUE}"] = ((self.k(size),), WIRE_DTYPES[wire_dtype].name, None)
        return out

    def wire_shapes(self, like):
        def sparse(x):
            k = self.k(math.prod(x.shape))
            return {INDEX: jax.ShapeDtypeStruct((k,), jnp.int32), VALUE: jax.ShapeDtypeStruct((k,), x.dtype)}

        return jax.tree.map(sparse, like)


def _is_sparse(node) -> bool:
    return isinstance(node, dict) and set(node) == {INDEX, VALUE}


@functools.partial(jax.jit, static_argnums=2)
def compress(delta: dict, residual: dict | None, ratio: float) -> tuple[dict, dict]:
    """(upload, new residual): per leaf of delta + residual, its top-k entries by magnitude as
    {'index': int32[k], 'value': float32[k]}, and everything not sent."""
    corrected = delta if residual is None else jax.tree.map(jnp.add, delta, residual)

    def top(x):
        flat = x.reshape(-1)
        k = max(1, math.ceil(ratio * flat.size - 1e-9))
        _, index = jax.lax.top_k(jnp.abs(flat), k)
        return {INDEX: index.astype(jnp.int32), VALUE: flat[index]}

    upload = jax.tree.map(top, corrected)
    return upload, jax.tree.map(jnp.subtract, corrected, densify(upload, corrected))


def densify(upload: dict, like: dict) -> dict:
    """The dense delta an upload stands for (zeros where nothing was sent); `like` gives the shapes."""

    def dense(sparse, x):
        flat = jnp.zeros(math.prod(x.shape), jnp.float32).at[jnp.asarray(sparse[INDEX])].set(sparse[VALUE])
        return flat.reshape(x.shape)

    return jax.tree.map(dense, upload, like, is_leaf=_is_sparse)


# ----------------------------------------------------------------------------- from the config


COMPRESSIONS = ("none", "topk")


def from_settings(compression: str = "none", topk_ratio: float = 0.2) -> tuple[Transform, ...]:
    """The transforms of the flat config keys (`compression`, `topk_ratio`)."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}: choose 'none' or 'topk'")
    if not 0 < topk_ratio <= 1:
        raise ValueError(f"topk_ratio={topk_ratio}: must be in (0, 1]")
    return (TopK(topk_ratio),) if compression == "topk" else ()


SETTINGS = {"compression": "none", "topk_ratio": 0.2}  # the flat keys `from_settings` reads, and their defaults
