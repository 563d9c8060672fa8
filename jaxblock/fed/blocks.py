"""Block partitions: which leaves of the params tree each block owns.

A partition is built from big_vision-style rules, `(regex over the '/'-joined leaf path, block
name or None for frozen)`, first match wins, and every leaf must be matched by some rule. The
result is an Optax-style label tree (a block id per leaf, `FROZEN` = -1) plus a description of
each block. `split` cuts params into the active block and the frozen rest (two nested dicts) so
that gradients and optimizer state are built for the block subtree alone.

Example:
    part = partition(params, [("w", "weights"), ("b", "bias")])
    block, frozen = part.split(params, 0)   # block == {"w": ...}, frozen == {"b": ...}
    params == merge(block, frozen)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import numpy as np

from jaxblock.model.trees import _select, merge, path_str, subtree_like, unflatten  # noqa: F401 (re-exported)

FROZEN = -1

Rules = Sequence[tuple[str, str | None]]


@dataclasses.dataclass(frozen=True)
class Block:
    id: int
    name: str
    paths: tuple[str, ...]  # '/'-joined leaf paths
    layers: tuple[int, ...]  # decoder layers touched (from `layers_{i}` path components)
    params: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class Partition:
    """Blocks over a params tree; `labels` has the tree's structure with a block id per leaf."""

    labels: dict
    blocks: tuple[Block, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def check(self, b: int) -> None:
        if not 0 <= b < self.num_blocks:
            raise ValueError(f"block {b}: the partition has blocks 0..{self.num_blocks - 1}")

    def mask(self, b: int) -> dict:
        """Bool tree: True on the leaves of block b."""
        self.check(b)
        return jax.tree.map(lambda label: label == b, self.labels)

    def split(self, tree: dict, b: int) -> tuple[dict, dict]:
        """(block b's subtree, everything else) of a params-shaped nested dict."""
        self.check(b)
        return _select(tree, self.labels, lambda label: label == b), _select(tree, self.labels, lambda x: x != b)

    def block(self, tree: dict, b: int) -> dict:
        self.check(b)
        return _select(tree, self.labels, lambda label: label == b)


def partition(params, rules: Rules) -> Partition:
    """Labels every leaf of `params` (arrays or ShapeDtypeStructs) by the first rule that matches.

    Raises ValueError naming the first leaf no rule covers.
    """
    compiled = [(re.compile(pattern), name) for pattern, name in rules]
    first_rule: dict[str, int] = {}  # block name -> index of the first rule naming it: the block order
    for i, (_, name) in enumerate(rules):
        if name is not None:
            first_rule.setdefault(name, i)
    names = sorted(first_rule, key=first_rule.get)
    members: dict[str, list[tuple[str, object]]] = {name: [] for name in names}
    label_of: dict[str, int] = {}

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in leaves:
        p = path_str(path)
        matches = [name for regex, name in compiled if regex.fullmatch(p)]
        if not matches:
            raise ValueError(f"block partition: leaf {p!r} is covered by no rule")
        name = matches[0]
        if name is None:
            label_of[p] = FROZEN
            continue
        members[name].append((p, leaf))
        label_of[p] = names.index(name)

    empty = [name for name in names if not members[name]]
    if empty:
        raise ValueError(f"block partition: block {empty[0]!r} matches no leaf")
    blocks = []
    for i, name in enumerate(names):
        paths = tuple(p for p, _ in members[name])
        layers = sorted({int(m.group(1)) for p in paths for m in [re.search(r"(?:^|/)layers_(\d+)/", p)] if m})
        sizes = [int(np.prod(leaf.shape)) for _, leaf in members[name]]
        nbytes = sum(n * np.dtype(leaf.dtype).itemsize for n, (_, leaf) in zip(sizes, members[name], strict=True))
        blocks.append(Block(i, name, paths, tuple(layers), sum(sizes), nbytes))
    if not blocks:
        raise ValueError("block partition: every leaf is frozen; nothing to train")
    labels = jax.tree_util.tree_map_with_path(lambda path, _: label_of[path_str(path)], params)
    return Partition(labels, tuple(blocks))


def full_partition(params) -> Partition:
    """One block holding every leaf: full fine-tuning (Fed full FT, FedBCD with B = 1)."""
    return partition(params, [(".*", "all")])


def llm_block_rules(
    num_layers: int,
    layers_per_block: int = 2,
    partial: bool = False,
    embed_block: bool = False,
    head_block: bool = False,
) -> list[tuple[str, str | None]]:
    """Rules for a decoder whose params are `embed_tokens`, `layers_{i}/...`, `norm`, `lm_head`.

    Args:
      layers_per_block: consecutive decoder layers per block (the last block may be shorter).
      partial: each layer is two blocks, its attention half and its MLP half (then
        layers_per_block must be 1).
      embed_block: the token embedding is a block of its own (else frozen).
      head_block: the final norm and LM head form a block of their own (else frozen).
    """
    if layers_per_block < 1:
        raise ValueError(f"blocks.layers_per_block={layers_per_block}: must be >= 1")
    if partial and layers_per_block != 1:
        raise ValueError(
            f"blocks.partial=True splits single layers: set blocks.layers_per_block=1, not {layers_per_block}"
        )
    rules: list[tuple[str, str | None]] = []
    if embed_block:
        rules.append(("embed_tokens", "embeddings"))
    if partial:
        for i in range(num_layers):
            rules.append((rf"layers_{i}/(input_layernorm|self_attn)/.*", f"layer {i} attention"))
            rules.append((rf"layers_{i}/(post_attention_layernorm|mlp)/.*", f"layer {i} mlp"))
    else:
        for start in range(0, num_layers, layers_per_block):
            layers = range(start, min(start + layers_per_block, num_layers))
            name = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
            rules.append((rf"layers_({'|'.join(map(str, layers))})/.*", name))
    rules.append((r"(norm|lm_head)(/.*)?", "head" if head_block else None))
    rules.append((r"embed_tokens", None))
    return rules


def describe(part: Partition) -> str:
    """A table: block id, layers, leaves, parameter count, bytes."""
    lines = [f"{'block':>5}  {'name':<22} {'layers':<10} {'leaves':>6} {'params':>14} {'bytes':>14}"]
    for b in part.blocks:
        layers = f"{b.layers[0]}-{b.layers[-1]}" if len(b.layers) > 1 else (str(b.layers[0]) if b.layers else "-")
        lines.append(f"{b.id:>5}  {b.name:<22} {layers:<10} {len(b.paths):>6} {b.params:>14,} {b.bytes:>14,}")
    frozen = sum(1 for x in jax.tree.leaves(part.labels) if x == FROZEN)
    lines.append(f"{part.num_blocks} blocks; {frozen} frozen leaves")
    return "\n".join(lines)
