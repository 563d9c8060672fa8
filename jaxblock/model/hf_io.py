"""Hugging Face checkpoints in and out: `config.json` plus single-file or sharded safetensors.

The name map is explicit and two-way. HF stores Linear weights as [out, in]; jaxblock stores
kernels as [in, out] with heads split out (q_proj: [D,N,H], o_proj: [N,H,D]) so that the
einsums in `model.py` read directly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxblock.model.config import ModelConfig, from_hf_config, to_hf_config
from jaxblock.model.sharding import Layout

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Safetensors dtypes that NumPy can hold and cast to a param_dtype (FP8 and others fail deep in get_tensor).
_READABLE_DTYPES = ("BF16", "F16", "F32", "F64")
# An all-ones exponent is inf or NaN. NumPy's isfinite is slow on 16-bit floats (bfloat16: ~15x
# float32's time per byte, and a RuntimeWarning on NaN), so these are checked on their bits.
_EXPONENT_MASKS = {np.dtype(ml_dtypes.bfloat16): 0x7F80, np.dtype(np.float16): 0x7C00}


def _name_map(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], Callable, Callable]]:
    """(hf name, jaxblock path, hf->jax transform, jax->hf transform) for every tensor."""
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def heads_in(heads):  # HF [heads*H, D] <-> ours [D, heads, H]
        return (lambda w: w.T.reshape(d, heads, h), lambda w: w.reshape(d, heads * h).T)

    def bias(heads):  # HF [heads*H] <-> ours [heads, H]
        return (lambda b: b.reshape(heads, h), lambda b: b.reshape(heads * h))

    out_proj = (lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T)  # HF [D, N*H]
    linear = (lambda w: w.T, lambda w: w.T)
    same = (lambda w: w, lambda w: w)

    entries = [("model.embed_tokens.weight", ("embed_tokens",), *same)]
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        entries += [
            (f"{hf}.input_layernorm.weight", (ours, "input_layernorm", "scale"), *same),
            (f"{hf}.self_attn.q_proj.weight", (ours, "self_attn", "q_proj"), *heads_in(n)),
            (f"{hf}.self_attn.k_proj.weight", (ours, "self_attn", "k_proj"), *heads_in(k)),
            (f"{hf}.self_attn.v_proj.weight", (ours, "self_attn", "v_proj"), *heads_in(k)),
            (f"{hf}.self_attn.o_proj.weight", (ours, "self_attn", "o_proj"), *out_proj),
            (f"{hf}.post_attention_layernorm.weight", (ours, "post_attention_layernorm", "scale"), *same),
            (f"{hf}.mlp.gate_proj.weight", (ours, "mlp", "gate_proj"), *linear),
            (f"{hf}.mlp.up_proj.weight", (ours, "mlp", "up_proj"), *linear),
            (f"{hf}.mlp.down_proj.weight", (ours, "mlp", "down_proj"), *linear),
        ]
        if cfg.qkv_bias:
            entries += [
                (f"{hf}.self_attn.q_proj.bias", (ours, "self_attn", "q_bias"), *bias(n)),
                (f"{hf}.self_attn.k_proj.bias", (ours, "self_attn", "k_bias"), *bias(k)),
                (f"{hf}.self_attn.v_proj.bias", (ours, "self_attn", "v_bias"), *bias(k)),
            ]
        if cfg.o_bias:
            entries.append((f"{hf}.self_attn.o_proj.bias", (ours, "self_attn", "o_bias"), *same))
    entries.append(("model.norm.weight", ("norm", "scale"), *same))
    if not cfg.tie_word_embeddings:
        entries.append(("lm_head.weight", ("lm_head",), *linear))
    return entries


def resolve(path_or_repo_id: str) -> str:
    """A local directory, or a hub repo id downloaded (config and safetensors only) to the HF cache.

    A hub failure is one ValueError line: the repo id, what failed and the fix (`hub_failure`)."""
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    if os.path.exists(path_or_repo_id) or path_or_repo_id.startswith((".", "/")):
        raise ValueError(f"load_hf({path_or_repo_id!r}): not a checkpoint directory")
    from huggingface_hub import snapshot_download

    with hub_errors("hf_checkpoint", path_or_repo_id, CHECKPOINT_FIXES):
        return snapshot_download(path_or_repo_id, allow_patterns=["*.json", "*.safetensors"])


# ----------------------------------------------------------------------------- hub failures, in one line

CHECKPOINT_FIXES = (
    "--config.hf_checkpoint=/local/dir (a checkpoint downloaded with `huggingface-cli download REPO_ID` where "
    "there is network), or --config.hf_checkpoint= (random init)"
)


def hub_failure(e: BaseException, repo_id: str) -> tuple[str, str | None] | None:
    """(what failed, its own fix or None) when `e` (or an exception it was raised from) is a failure to reach a
    hub repo or file; None for any other error. transformers and datasets re-raise the hub's own
    errors as OSError or ConnectionError, so the whole chain is read."""
    from huggingface_hub import errors as hub

    chain, x = [], e
    while x is not None and x not in chain:
        chain.append(x)
        x = x.__cause__ or x.__context__
    text = " ".join(str(x) for x in chain)
    login = "run `huggingface-cli login` (or set HF_TOKEN)"
    for x in chain:
        if isinstance(x, hub.GatedRepoError) or "gated" in str(x).lower():
            return "gated: your account has not been granted access", (
                f"request access at https://huggingface.co/{repo_id}, then {login}")  # fmt: skip
        status = getattr(getattr(x, "response", None), "status_code", None)
        if status in (401, 403):
            return "not logged in, or the token has no access", login
        if isinstance(x, hub.RevisionNotFoundError):
            return "no such revision", "check the revision"
        if isinstance(x, hub.RepositoryNotFoundError) or type(x).__name__ == "DatasetNotFoundError":
            return "not found (or private)", f"check the id; if it is private, {login}"
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or "OfflineModeIsEnabled" in text
    for x in chain:
        if isinstance(x, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled, ConnectionError, TimeoutError)) or (
            type(x).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")
        ):
            what = "HF_HUB_OFFLINE is set" if offline else "no network (the hub is unreachable)"
            return f"{what} and it is not in the local HF cache", None
    return None


class hub_errors:  # noqa: N801 (a context manager used like a function)
    """`with hub_errors("hf_checkpoint", repo_id, fixes):` turns a hub failure inside into one
    ValueError line naming the setting, the repo id, what failed and the fixes; other errors pass."""

    def __init__(self, setting: str, repo_id: str, fixes: str):
        self.setting, self.repo_id, self.fixes = setting, repo_id, fixes

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        failure = None if e is None or isinstance(e, ValueError) else hub_failure(e, self.repo_id)
        if failure is None:
            return False
        what, fix = failure
        fixes = (f"{fix}; or {self.fixes}" if fix else self.fixes).replace("REPO_ID", self.repo_id)
        raise ValueError(f"{self.setting} {self.repo_id!r} on the hub: {what}. Fix: {fixes}") from None


def _one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut to `limit` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json(file: str) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"hf_checkpoint {file}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"hf_checkpoint {file}: not a JSON object")
    return data


def read_config(path: str, param_dtype: str, dtype: str) -> ModelConfig:
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise ValueError(f"hf_checkpoint {path}: no config.json")
    hf = _read_json(file)
    # from_hf_config indexes and compares the JSON values as they are: a missing key or a wrong type
    # surfaces there as a KeyError or TypeError that does not say which file.
    try:
        return from_hf_config(hf, param_dtype=param_dtype, dtype=dtype)
    except KeyError as e:
        raise ValueError(f"hf_checkpoint {file}: missing {e.args[0]!r}") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(f"hf_checkpoint {file}: a value has the wrong type ({_one_line(e)})") from None


def _unreadable(file: str, e: Exception) -> ValueError:
    return ValueError(
        f"hf_checkpoint {file}: cannot be read ({_one_line(e)}): the file is truncated or not a safetensors file"
    )


def _safetensors_files(path: str) -> dict[str, str]:
    """tensor name -> file, for `model.safetensors` or a sharded `model.safetensors.index.json`."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"hf_checkpoint {index}: needs a 'weight_map' object (tensor name -> file name)")
        # Checked up front: a missing shard would otherwise surface only after the shards before it loaded.
        files = {name: os.path.join(path, file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.isfile(file):
                raise ValueError(f"hf_checkpoint {file}: missing (model.safetensors.index.json names it)")
        return files
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise ValueError(f"hf_checkpoint {path}: no model.safetensors or model.safetensors.index.json")
    try:
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except (SafetensorError, OSError) as e:
        raise _unreadable(single, e) from None


def _all_finite(x: np.ndarray) -> bool:
    mask = _EXPONENT_MASKS.get(x.dtype)
    if mask is None:
        return bool(np.isfinite(x).all())
    return not ((x.view(np.uint16) & mask) == mask).any()


def _read_tensor(handles: dict, file: str, hf_name: str, where: str) -> np.ndarray:
    """One tensor as stored in `file` (a host array); `handles` caches the open files."""
    # safetensors 0.8 checks at open that the header covers the file exactly, so truncation fails
    # there; get_tensor is guarded too, as nothing in the format promises that.
    try:
        if file not in handles:
            handles[file] = safe_open(file, framework="numpy").__enter__()
        stored = handles[file].get_slice(hf_name).get_dtype()
        if stored not in _READABLE_DTYPES:
            raise ValueError(f"{where} has dtype {stored}: load_hf reads {', '.join(_READABLE_DTYPES)}")
        return handles[file].get_tensor(hf_name)
    except (SafetensorError, OSError) as e:
        raise _unreadable(file, e) from None


def _check_finite(raw: np.ndarray, array: np.ndarray, where: str, param_dtype: str) -> None:
    """Refuses NaN/Inf in `array` (the stored `raw`, cast to param_dtype), naming which is at fault."""
    # One pass over `array` when all is well; `raw` is looked at only to word the error.
    if _all_finite(array):
        return
    if not _all_finite(raw):
        raise ValueError(f"{where} has NaN/Inf: the base model is damaged")
    biggest = float(np.abs(raw.astype(np.float32)).max())
    raise ValueError(f"{where} overflows param_dtype={param_dtype} (max |value| {biggest:.3g})")


def load_hf(
    path_or_repo_id: str,
    *,
    param_dtype: str = "float32",
    dtype: str = "float32",
    layout: Layout | None = None,
) -> tuple[ModelConfig, dict]:
    """Reads an HF Llama/Qwen2 checkpoint into (ModelConfig, params).

    A damaged checkpoint (invalid JSON, a truncated or missing safetensors file, NaN/Inf in a
    tensor) is refused with one line naming the file.

    Args:
      path_or_repo_id: a local checkpoint directory, or a hub repo id (downloaded to the HF cache).
      param_dtype, dtype: storage and compute dtypes of the returned config and params.
      layout: if given, each tensor is placed straight onto the mesh with its sharding, so a model
        larger than one device's memory loads without a full copy on any device.
    Returns:
      The config and a nested dict of jax Arrays in jaxblock's layout.
    """
    path = resolve(path_or_repo_id)
    cfg = read_config(path, param_dtype, dtype)
    files = _safetensors_files(path)
    shardings = None
    if layout is not None:
        from jaxblock import model  # avoid an import cycle at module load

        shardings = layout.tree_shardings(model.logical_axes(cfg))

    params: dict = {}
    handles: dict[str, object] = {}
    try:
        for hf_name, key, to_jax, _ in _name_map(cfg):
            if hf_name not in files:
                raise ValueError(f"hf_checkpoint {path}: has no tensor {hf_name!r}")
            where = f"hf_checkpoint {path}: tensor {hf_name} in {os.path.basename(files[hf_name])}"
            raw = _read_tensor(handles, files[hf_name], hf_name, where)
            try:
                array = to_jax(raw)
            except ValueError as e:  # a reshape to the config's heads
                raise ValueError(
                    f"{where} has shape {raw.shape}, which config.json does not describe ({_one_line(e)})"
                ) from None
            with np.errstate(over="ignore"):  # _check_finite names an overflowing cast in one line
                array = np.ascontiguousarray(array.astype(_NP_DTYPES[param_dtype]))
            _check_finite(raw, array, where, param_dtype)
            node = params
            for part in key[:-1]:
                node = node.setdefault(part, {})
            sharding = None if shardings is None else _get(shardings, key)
            node[key[-1]] = jax.device_put(array, sharding)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    _check_shapes(cfg, params, f"hf_checkpoint {path}")
    return cfg, params


def _get(tree, key):
    for part in key:
        tree = tree[part]
    return tree


def _check_shapes(cfg: ModelConfig, params: dict, where: str) -> None:
    from jaxblock import model

    expected = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
    flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    if flat_e.keys() != flat_p.keys():
        missing = sorted(map(jax.tree_util.keystr, flat_e.keys() - flat_p.keys()))
        extra = sorted(map(jax.tree_util.keystr, flat_p.keys() - flat_e.keys()))
        raise ValueError(f"{where}: params do not match the config (missing {missing[:3]}, extra {extra[:3]})")
    for k, e in flat_e.items():
        if tuple(flat_p[k].shape) != tuple(e.shape):
            raise ValueError(f"{where}: {jax.tree_util.keystr(k)} has shape {flat_p[k].shape}, config wants {e.shape}")


def save_hf(cfg: ModelConfig, params: dict, out_dir: str, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `config.json` and safetensors (sharded with an index above `max_shard_bytes`).

    transformers' `AutoModelForCausalLM.from_pretrained(out_dir)` loads the result.
    """
    from transformers import AutoConfig

    _check_shapes(cfg, params, "save_hf")
    os.makedirs(out_dir, exist_ok=True)
    kw = to_hf_config(cfg)
    AutoConfig.for_model(kw.pop("model_type"), **kw).save_pretrained(out_dir)

    tensors = {hf: np.ascontiguousarray(to_hf(np.asarray(_get(params, key)))) for hf, key, _, to_hf in _name_map(cfg)}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
