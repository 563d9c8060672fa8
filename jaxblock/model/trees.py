"""Nested-dict helpers shared by the model library and the federated core."""

from __future__ import annotations


def path_str(path) -> str:
    """'layers_0/mlp/up_proj' for a jax key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def unflatten(paths_and_values) -> dict:
    """The nested dict of ('layers_0/mlp/up_proj', value) pairs: `path_str`'s inverse."""
    tree: dict = {}
    for path, value in paths_and_values:
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _select(tree: dict, labels: dict, keep) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            sub = _select(value, labels[key], keep)
            if sub:
                out[key] = sub
        elif keep(labels[key]):
            out[key] = value
    return out


def merge(a: dict, b: dict) -> dict:
    """Union of two nested dicts with disjoint leaves (e.g. a block and the frozen rest)."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge(out[key], value)
        else:
            raise ValueError(f"merge: leaf {key!r} is in both trees")
    return out


def subtree_like(tree: dict, like: dict) -> dict:
    """The part of `tree` with the keys of `like` (e.g. a block's shardings from all param shardings)."""
    return {k: subtree_like(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}
