"""Reading an update from the store through every check before its bytes are trusted: its signature
(with keys), its manifest against the expected leaves and byte limit before any array is read, each
array's stored shape, the signed digests; then the value checks every exchange shares
(`fed.validate.check_values`)."""

from __future__ import annotations

import jax

from jaxblock.fed.blocks import path_str, unflatten
from jaxblock.fed.validate import BadUpdate, check_values, upload_bytes
from jaxblock.fed.wire import _as_float32
from jaxblock.net import signing


def check_manifest(manifest, expected: dict, max_bytes: int) -> None:
    """BadUpdate unless the manifest lists exactly the expected leaves and fits the byte limit."""
    try:
        listed = {str(p): (tuple(int(n) for n in shape), str(dtype)) for p, shape, dtype in manifest["leaves"]}
        nbytes = int(manifest["bytes"])
    except (KeyError, TypeError, ValueError) as e:
        raise BadUpdate("garbage", f"unreadable manifest ({type(e).__name__})") from None
    if set(listed) != set(expected):
        missing, extra = sorted(set(expected) - set(listed)), sorted(set(listed) - set(expected))
        raise BadUpdate("keys", f"missing {missing[:3]}, unexpected {extra[:3]}")
    for path, (shape, dtype) in listed.items():
        if shape != expected[path][0]:
            raise BadUpdate("shape", f"{path} is {list(shape)}, expected {list(expected[path][0])}")
        if dtype != expected[path][1]:
            raise BadUpdate("dtype", f"{path} is {dtype}, expected {expected[path][1]}")
    size = upload_bytes(expected)
    if nbytes != size or size > max_bytes:
        raise BadUpdate("size", f"{nbytes} bytes declared, the block is {size}, the limit {max_bytes}")


def read_checked(store, prefix: str, manifest, expected: dict, max_bytes: int, verify=None) -> dict:
    """An upload read from the store only after its signature (`verify(manifest)`, when the run has
    keys), its manifest, then each array's stored shape and dtype passed the checks; then its bytes
    are checked against the signed digests and its values. BadUpdate otherwise (garbage arrays too)."""
    if verify is not None:
        try:
            verify(manifest)
        except signing.BadSignature as e:
            raise BadUpdate(e.reason, str(e).split(": ", 1)[1]) from None
    check_manifest(manifest, expected, max_bytes)

    def before_read(path: str, shape: tuple, dtype: str) -> None:
        if (tuple(shape), dtype) != expected[path][:2]:
            raise BadUpdate("shape", f"{path} is stored as {list(shape)} {dtype}, its manifest says otherwise")

    digests, read = [], []
    try:
        for path, stored in store.arrays(prefix, manifest, before_read=before_read):
            if verify is not None:  # the bytes as stored, before any conversion, are the bytes signed
                digests.append(signing.digest(stored))
            read.append((path, _as_float32(stored)))
    except BadUpdate:
        raise
    except ValueError as e:  # TensorStore: a half-written or missing array
        raise BadUpdate("garbage", f"unreadable array ({str(e).splitlines()[0][:120]})") from None
    if verify is not None and digests != manifest.get("digests"):
        raise BadUpdate("forged", "the arrays are not the ones signed")
    tree = unflatten(read)
    check_values({path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}, expected)
    return tree
