"""Device meshes and the map from logical axis names to mesh axes.

Params and activations are annotated with logical names (`'embed'`, `'heads'`,
`'activation_batch'`, ...). A `Layout` (a mesh plus a rules list from the config) turns them
into `NamedSharding`s, so that the same model code runs data-parallel, FSDP or tensor-parallel by
changing two config entries, as in flax's lm1b and MaxText.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: weights FSDP-sharded on their model dimension and tensor-parallel on heads/mlp/
# vocab; activations sharded on batch over (data, fsdp). A logical name absent here is replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def make_mesh(shape: dict[str, int] | Sequence[int], devices=None) -> Mesh:
    """A mesh over axes (data, fsdp, tensor); one size may be -1 to take the remaining devices.

    Example: `make_mesh({'data': 2, 'fsdp': -1, 'tensor': 1})` on 8 devices -> 2 x 4 x 1.
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    sizes = [shape.get(a, 1) for a in MESH_AXES] if isinstance(shape, dict) else list(shape)
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh shape {sizes}: need one size for each axis of {MESH_AXES}")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {sizes}: at most one axis may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = devices.size // known
    if math.prod(sizes) != devices.size:
        named = dict(zip(MESH_AXES, sizes, strict=True))
        raise ValueError(f"mesh shape {named} needs {math.prod(sizes)} devices, have {devices.size}")
    return Mesh(devices.reshape(sizes), MESH_AXES)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the logical-axis rules that place params and activations on it."""

    mesh: Mesh
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_RULES

    def spec(self, logical: PartitionSpec | Sequence[str | None]) -> PartitionSpec:
        return nn.logical_to_mesh_axes(tuple(logical), self.rules)

    def sharding(self, logical) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical))

    def constrain(self, x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(logical))

    def tree_shardings(self, logical_tree):
        """NamedShardings for a tree of logical PartitionSpecs (e.g. `model.logical_axes(cfg)`)."""
        return jax.tree.map(self.sharding, logical_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))

    def ways(self, logical: str) -> int:
        """Into how many shards the mesh splits a dimension with this logical name."""
        axes = self.spec((logical,))[0]
        names = () if axes is None else (axes,) if isinstance(axes, str) else axes
        return math.prod(self.mesh.shape[a] for a in names)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def constrain(x: jax.Array, logical: Sequence[str | None], layout: Layout | None) -> jax.Array:
    """Activation sharding constraint; a no-op without a layout (single device)."""
    return x if layout is None else layout.constrain(x, logical)


def rules_from_config(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Rules from a config list of `(logical, mesh_axis_or_axes_or_None)` pairs, validated."""
    out = []
    for logical, mesh_axes in rules:
        names = mesh_axes if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)
        for name in names:
            if name is not None and name not in MESH_AXES:
                raise ValueError(f"sharding rule {logical!r} -> {mesh_axes!r}: unknown mesh axis {name!r}")
        out.append((logical, tuple(mesh_axes) if isinstance(mesh_axes, list) else mesh_axes))
    return tuple(out)
