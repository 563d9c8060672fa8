"""jaxblock's local step against the peer a user would otherwise pick: PyTorch eager + transformers.

The same work on both sides, for every case: the same random Llama (transformers' own init, saved
with `save_pretrained` and read by `hf_io.load_hf`), the same batches (random tokens, the loss on
the second half of each sequence), the same AdamW (betas 0.9/0.999, eps 1e-6, no weight decay),
created fresh for each call of K steps, and only the case's parameters trained (the first layer, the
last layer, or all of them: PyTorch computes no gradient for a frozen weight either). A first call
of each side checks that the two compute the same losses, so the timings compare equal work.

Cases: first layer, last layer and full fine-tuning, on the tiny config's shape and on a wider one,
in float32 and in bfloat16 (jaxblock: bfloat16 compute over float32 master weights; PyTorch: the
same under `torch.autocast`). Every case is timed interleaved (each repeat calls every case once on
each side, so drifting machine load hits all alike) and the median over repeats is reported: ms per
step, tokens/s, and the ratio peer ms / jaxblock ms (> 1: jaxblock is faster).

    python scripts/bench_peer.py [--shapes tiny wide] [--dtypes float32 bfloat16] [--repeats 10] [--json]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

from jaxblock.fed import blocks, local
from jaxblock.fed.local import OptimizerConfig
from jaxblock.model import hf_io

# (layers, hidden, intermediate, heads, kv heads, head dim, vocab, batch, seq)
SHAPES = {
    "tiny": dict(layers=8, hidden=192, inter=512, heads=4, kv=2, head_dim=48, vocab=512, batch=4, seq=48),
    "wide": dict(layers=4, hidden=256, inter=1024, heads=8, kv=2, head_dim=32, vocab=1024, batch=4, seq=128),
}
CASES = ("first layer", "last layer", "full FT")
LR = 1e-4


def hf_model(shape: dict, out_dir: str):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
        head_dim=shape["head_dim"], max_position_embeddings=512, rope_theta=10000.0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(out_dir)
    return model.train()


def make_batches(shape: dict, k: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, shape["vocab"], (k, shape["batch"], shape["seq"])).astype(np.int32)
    mask = np.zeros_like(tokens, np.float32)
    mask[..., shape["seq"] // 2 :] = 1.0
    return {"tokens": tokens, "loss_mask": mask}


def jax_case(params, cfg, case: str, batches, k: int):
    """A no-argument callable running K local steps of `case` in jaxblock; returns the losses."""
    if case == "full FT":
        part, block_id = blocks.full_partition(params), 0
    else:
        part = blocks.partition(params, blocks.llm_block_rules(cfg.num_layers, layers_per_block=1))
        block_id = 0 if case == "first layer" else cfg.num_layers - 1
    block, frozen = part.split(params, block_id)
    optimizer = local.make_optimizer(OptimizerConfig(learning_rate=LR), k)
    train = local.make_local_train(local.lm_loss(cfg), optimizer)
    batches = jax.device_put(batches)
    return lambda: np.asarray(train(block, frozen, batches)[1])


def torch_case(model, pristine: dict, case: str, batches, dtype: str):
    """(reset, run): `reset()` puts back the model's initial weights and marks what trains (untimed);
    `run()` runs K AdamW steps of `case` on the PyTorch model and returns the losses."""
    last = model.config.num_hidden_layers - 1
    prefix = {"first layer": "model.layers.0.", "last layer": f"model.layers.{last}.", "full FT": ""}[case]
    names = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
    tokens = torch.as_tensor(batches["tokens"], dtype=torch.long)
    labels = torch.where(torch.as_tensor(batches["loss_mask"]) > 0, tokens, torch.full_like(tokens, -100))

    def reset():  # untimed: every call starts from the same weights, as jaxblock's does
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(pristine[n])
                p.requires_grad_(n in names)

    def run():
        params = dict(model.named_parameters())
        opt = torch.optim.AdamW([params[n] for n in names], lr=LR, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
        losses = []
        for i in range(len(tokens)):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                loss = model(input_ids=tokens[i], labels=labels[i]).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return np.array(losses)

    return reset, run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--local-steps", type=int, default=4, help="K steps per timed call")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per case and side (median reported)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error(f"--repeats={args.repeats}: use at least 5 for a stable median")
    k = args.local_steps
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); K={k}, {args.repeats} interleaved repeats")  # fmt: skip

    rows, calls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for shape_name in args.shapes:
            shape = SHAPES[shape_name]
            model = hf_model(shape, os.path.join(tmp, shape_name))
            pristine = {n: p.detach().clone() for n, p in model.named_parameters()}  # the saved weights
            batches = make_batches(shape, k)
            for dtype in args.dtypes:
                cfg, params = hf_io.load_hf(os.path.join(tmp, shape_name), param_dtype="float32", dtype=dtype)
                for case in CASES:
                    ours, peer = (
                        jax_case(params, cfg, case, batches, k),
                        torch_case(model, pristine, case, batches, dtype),
                    )
                    peer[0]()
                    gap = float(np.max(np.abs(ours() - peer[1]())))  # compiles ours; both warm up
                    tolerance = 1e-3 if dtype == "float32" else 5e-2
                    if not gap <= tolerance:
                        sys.exit(
                            f"{shape_name} {dtype} {case}: losses differ by {gap:.2e} (> {tolerance}): unequal work"
                        )
                    tokens = shape["batch"] * shape["seq"]
                    rows.append({"shape": shape_name, "dtype": dtype, "case": case, "loss_gap": gap, "tokens": tokens})
                    calls.append((ours, peer))

    times = [([], []) for _ in calls]
    for _ in tqdm.trange(args.repeats, desc="timing (interleaved)", leave=False):
        for (ours, peer), (t_ours, t_peer) in zip(calls, times, strict=True):
            peer_reset, peer_run = peer
            peer_reset()
            for fn, out in ((ours, t_ours), (peer_run, t_peer)):
                start = time.perf_counter()
                fn()
                out.append((time.perf_counter() - start) / k)

    print(f"{'shape':<6} {'dtype':<9} {'case':<12} {'jaxblock ms':>12} {'peer ms':>9} {'jaxblock tok/s':>15} "
          f"{'peer tok/s':>11} {'peer/jaxblock':>14}  loss gap")  # fmt: skip
    for row, (t_ours, t_peer) in zip(rows, times, strict=True):
        ours_s, peer_s = statistics.median(t_ours), statistics.median(t_peer)
        row.update(jaxblock_ms=ours_s * 1e3, peer_ms=peer_s * 1e3, ratio=peer_s / ours_s)
        row.update(jaxblock_tokens_per_s=row["tokens"] / ours_s, peer_tokens_per_s=row["tokens"] / peer_s)
        print(f"{row['shape']:<6} {row['dtype']:<9} {row['case']:<12} {row['jaxblock_ms']:12.1f} {row['peer_ms']:9.1f} "
              f"{row['jaxblock_tokens_per_s']:15.0f} {row['peer_tokens_per_s']:11.0f} {row['ratio']:13.2f}x"
              f"  {row['loss_gap']:.1e}")  # fmt: skip
    for dtype in args.dtypes:
        ratios = [r["ratio"] for r in rows if r["dtype"] == dtype]
        print(f"{dtype}: peer/jaxblock from {min(ratios):.2f}x to {max(ratios):.2f}x over {len(ratios)} cases")
    if args.json:
        print(json.dumps({"rows": rows, "k": k, "repeats": args.repeats}))


if __name__ == "__main__":
    main()
