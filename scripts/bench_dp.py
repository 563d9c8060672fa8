"""Record-level DP-SGD on one block: jaxblock's DP step against its non-DP step and PyTorch + Opacus.

The same work on every side, per shape: bench_peer's random Llama (transformers' own init, saved
with `save_pretrained` and read by `hf_io.load_hf`), the same K batches (random tokens, the loss on
the second half of each sequence, so every example has as many targets and a batch's token mean is
the mean of its examples' losses), plain SGD, and one decoder layer trained (`--layer`, default 0:
the first, whose backward runs through the whole stack), every other parameter frozen. DP-SGD
(C = 1.0, z = 1.0): each example's gradient of the block clipped to L2 norm C, summed, N(0, (zC)^2)
added per coordinate, divided by B.

Sides: jaxblock's `make_local_train` without and with `dp=local.DPSGD(C, z)` (one jitted K-step
scan); PyTorch eager on transformers' LlamaForCausalLM, float32 on the CPU, without DP and under
Opacus (`PrivacyEngine().make_private(..., poisson_sampling=False)`, one optimizer step per batch;
every `--opacus-modes` grad_sample_mode is tried, a mode that fails on Llama is reported and
skipped, and the table takes the fastest that runs). Before timing, the two sides' losses and the
block's K-step delta must agree: non-DP jaxblock against PyTorch, and DP with z = 0 (the clipped
steps without noise are deterministic) jaxblock against every Opacus mode; a gap over the
tolerance stops the run, since the timings would then not compare equal work.

Timing as bench_peer's: one warm-up call of every case, then `--repeats` rounds, each calling every
case once (K steps) in turn, so drifting machine load hits all alike; the median over rounds of
ms per step is reported. PyTorch runs on as many threads as the process has cores.

    python scripts/bench_dp.py [--shapes tiny,wide] [--steps 4] [--repeats 10] [--batch 4] [--seq 48]
        [--layer 0] [--opacus-modes hooks,functorch,ghost,ew] [--json]
"""

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import jax
import numpy as np
import opacus
import torch
import tqdm
from bench_peer import SHAPES, hf_model, make_batches  # scripts/ is sys.path[0] for `python scripts/...`
from opacus import PrivacyEngine

from jaxblock.fed import blocks, local
from jaxblock.model import hf_io

LR = 1e-3
CLIP, NOISE = 1.0, 1.0  # C and z
MODES = ("hooks", "functorch", "ghost", "ew")  # Opacus 1.6's grad_sample_modes for a single process
TOLERANCE = 1e-3  # losses (absolute) and block delta (relative to its largest entry), float32


def jax_case(cfg, params, layer: int, batches: dict, k: int, dp):
    """(run, delta): `run()` runs K jaxblock steps on layer `layer`'s block, returns the losses;
    `delta()` the last call's block delta in HF names and layouts."""
    part = blocks.partition(params, blocks.llm_block_rules(cfg.num_layers, layers_per_block=1))
    block, frozen = part.split(params, layer)
    optimizer = local.make_optimizer(local.OptimizerConfig(name="sgd", learning_rate=LR), k)
    train = local.make_local_train(local.lm_loss(cfg), optimizer, dp=dp)
    if dp is not None:  # one raw threefry key per step
        batches = {**batches, "noise_key": jax.random.key_data(jax.random.split(jax.random.key(1), k))}
    batches = jax.device_put(batches)
    last = {}

    def run():
        last["delta"], losses = jax.block_until_ready(train(block, frozen, batches))
        return np.asarray(losses)

    def delta():  # hf_io's name map: the HF name and layout of each of the block's leaves
        out = {}
        for hf_name, path, _, to_hf in hf_io._name_map(cfg):
            if path[0] == f"layers_{layer}":
                leaf = last["delta"]
                for key in path:
                    leaf = leaf[key]
                out[hf_name] = np.asarray(to_hf(np.asarray(leaf)))
        return out

    return run, delta


def torch_case(model, pristine: dict, layer: int, batches: dict, mode: str | None):
    """(reset, run, delta, optimizer) of K SGD steps on PyTorch's copy of `model`: plain (mode None)
    or made private by Opacus with that grad_sample_mode. `reset()` (untimed) puts back the initial
    weights; `run()` returns the losses; `delta()` the block's change since the reset."""
    model = copy.deepcopy(model)  # Opacus hooks the module in place; each case keeps its own
    params = dict(model.named_parameters())
    names = [n for n in params if n.startswith(f"model.layers.{layer}.")]
    for n, p in params.items():
        p.requires_grad_(n in names)
    optimizer = torch.optim.SGD([params[n] for n in names], lr=LR)
    tokens = torch.as_tensor(batches["tokens"], dtype=torch.long)  # [K, B, T]
    labels = torch.where(torch.as_tensor(batches["loss_mask"]) > 0, tokens, torch.full_like(tokens, -100))
    net, criterion = model, None
    if mode is not None:
        # make_private wants a loader; with poisson_sampling=False it only sets the expected batch
        # size (B). The timed loop feeds the K batches itself, as jaxblock's does.
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[0]), batch_size=tokens.shape[1])
        private = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=torch.nn.CrossEntropyLoss(),
            noise_multiplier=NOISE, max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode=mode,
        )  # fmt: skip
        net, optimizer = private[:2]
        criterion = private[2] if mode == "ghost" else None

    def loss_of(i):
        if criterion is None:  # HF's loss: the mean over the batch's targets (ew wants input_ids positional)
            return net(tokens[i], labels=labels[i]).loss
        logits = net(tokens[i]).logits[:, :-1]  # [B, T-1, V]
        # Ghost clipping needs per-example losses: each example's mean over its targets
        return criterion(logits.reshape(-1, logits.shape[-1]), labels[i][:, 1:].reshape(-1), shape=logits.shape[:2])

    def reset():
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(pristine[n])

    def run():
        losses = []
        for i in range(len(tokens)):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(i)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return np.array(losses)

    def delta():
        return {n: (params[n].detach() - pristine[n]).numpy() for n in names}

    return reset, run, delta, optimizer


def gaps(ours_losses, ours_delta: dict, peer_losses, peer_delta: dict) -> tuple[float, float]:
    """(largest loss difference, largest delta difference / largest |peer delta|)."""
    if set(ours_delta) != set(peer_delta):
        sys.exit(f"the blocks differ: {sorted(set(ours_delta) ^ set(peer_delta))}")
    scale = max(float(np.max(np.abs(d))) for d in peer_delta.values())
    worst = max(float(np.max(np.abs(ours_delta[n] - peer_delta[n]))) for n in peer_delta)
    return float(np.max(np.abs(ours_losses - peer_losses))), worst / max(scale, 1e-30)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def build_shape(shape_name: str, shape: dict, args, out_dir: str) -> tuple[list, list[str]]:
    """The shape's timed cases [(label, reset, run)] after the equal-work checks; and notes."""
    k, layer, notes = args.steps, args.layer, []
    model = hf_model(shape, out_dir)
    if not 0 <= layer < model.config.num_hidden_layers:
        sys.exit(f"--layer={layer}: the {shape_name} model has layers 0..{model.config.num_hidden_layers - 1}")
    pristine = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = make_batches(shape, k)
    cfg, params = hf_io.load_hf(out_dir, param_dtype="float32", dtype="float32")
    no_op = lambda: None  # noqa: E731

    ours, ours_delta = jax_case(cfg, params, layer, batches, k, None)
    ours_dp, _ = jax_case(cfg, params, layer, batches, k, local.DPSGD(CLIP, NOISE))
    ours_check, ours_check_delta = jax_case(cfg, params, layer, batches, k, local.DPSGD(CLIP, 0.0))
    peer_reset, peer_run, peer_delta, _ = torch_case(model, pristine, layer, batches, None)

    peer_reset()
    loss_gap, delta_gap = gaps(ours(), ours_delta(), peer_run(), peer_delta())  # compiles ours
    if not (loss_gap <= TOLERANCE and delta_gap <= TOLERANCE):
        sys.exit(f"{shape_name} non-DP: loss gap {loss_gap:.1e}, delta gap {delta_gap:.1e} (> {TOLERANCE})")
    notes.append(f"{shape_name} non-DP vs torch: loss gap {loss_gap:.1e}, delta gap {delta_gap:.1e}")
    cases = [("jax", no_op, ours), ("jax_dp", no_op, ours_dp), ("torch", peer_reset, peer_run)]

    check_losses = ours_check()
    check_delta = ours_check_delta()
    for mode in args.opacus_modes:
        try:
            reset, run, delta, dp_optimizer = torch_case(model, pristine, layer, batches, mode)
            dp_optimizer.noise_multiplier = 0.0  # the check: clipping only
            reset()
            peer_losses = run()
        except Exception as e:  # a mode Opacus cannot apply to this model: say so, time the others
            notes.append(f"{shape_name} Opacus {mode}: fails ({one_line(e)})")
            continue
        loss_gap, delta_gap = gaps(check_losses, check_delta, peer_losses, delta())
        if not (loss_gap <= TOLERANCE and delta_gap <= TOLERANCE):
            sys.exit(f"{shape_name} DP z=0 vs Opacus {mode}: loss gap {loss_gap:.1e}, delta gap {delta_gap:.1e}")
        notes.append(f"{shape_name} DP z=0 vs Opacus {mode}: loss gap {loss_gap:.1e}, delta gap {delta_gap:.1e}")
        dp_optimizer.noise_multiplier = NOISE
        cases.append((f"opacus_{mode}", reset, run))
    return cases, notes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,wide", help=f"comma-separated, of {','.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=4, help="K steps per timed call")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per case (median reported)")
    parser.add_argument("--batch", type=int, default=0, help="B for every shape (0: the shape's, 4)")
    parser.add_argument("--seq", type=int, default=0, help="T for every shape (0: the shape's, tiny 48, wide 128)")
    parser.add_argument("--layer", type=int, default=0, help="the trained decoder layer (its own block)")
    parser.add_argument("--opacus-modes", default=",".join(MODES), help="comma-separated grad_sample_modes to try")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    if not shapes or any(s not in SHAPES for s in shapes):
        parser.error(f"--shapes={args.shapes}: choose from {','.join(SHAPES)}")
    args.opacus_modes = [m for m in args.opacus_modes.split(",") if m]
    if any(m not in MODES for m in args.opacus_modes):
        parser.error(f"--opacus-modes={','.join(args.opacus_modes)}: choose from {','.join(MODES)}")
    if args.repeats < 5:
        parser.error(f"--repeats={args.repeats}: use at least 5 for a stable median")
    if args.steps < 1 or args.batch < 0 or args.seq < 0 or (args.seq and args.seq < 4):
        parser.error("--steps must be >= 1, --batch >= 0, --seq 0 or >= 4")
    # Opacus' notices (secure RNG off; full backward hooks fire on outputs when the inputs are token ids)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"opacus\.|torch\.nn\.modules\.module")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    k = args.steps
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} ({threads} threads = "
          f"the process's cores), opacus {opacus.__version__}; SGD lr {LR}, C={CLIP}, z={NOISE}, layer {args.layer} "
          f"trained; K={k}, {args.repeats} interleaved repeats; load average {os.getloadavg()[0]:.1f}")  # fmt: skip

    rows, calls, notes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            shape = dict(SHAPES[name], **{key: v for key, v in (("batch", args.batch), ("seq", args.seq)) if v})
            cases, shape_notes = build_shape(name, shape, args, os.path.join(tmp, name))
            notes += shape_notes
            rows.append({"shape": name, "batch": shape["batch"], "seq": shape["seq"]})
            calls.append(cases)
    for note in notes:
        print(note)

    flat = [(row, label, reset, run) for row, cases in zip(rows, calls, strict=True) for label, reset, run in cases]
    for _, _, reset, run in flat:  # warm-up: Opacus' first noisy step, allocator, caches
        reset()
        run()
    times: list[list[float]] = [[] for _ in flat]
    for _ in tqdm.trange(args.repeats, desc="timing (interleaved)", leave=False):
        for (_, _, reset, run), out in zip(flat, times, strict=True):
            reset()
            start = time.perf_counter()
            run()
            out.append((time.perf_counter() - start) / k * 1e3)
    for (row, label, _, _), t in zip(flat, times, strict=True):
        row[f"{label}_ms"] = statistics.median(t)
        row[f"{label}_min_ms"] = min(t)  # far below the median: the machine's load changed during the run

    print(f"{'shape':<5} {'B x T':>8} {'jax ms':>7} {'jax DP ms':>10} {'DP/non-DP':>10} {'Opacus DP ms':>13} "
          f"{'mode':<10} {'Opacus/jax DP':>14} {'torch ms':>9}")  # fmt: skip
    for row in rows:
        modes = {m: row[f"opacus_{m}_ms"] for m in args.opacus_modes if f"opacus_{m}_ms" in row}
        row["dp_over_non_dp"] = row["jax_dp_ms"] / row["jax_ms"]
        best = min(modes, key=modes.get) if modes else None
        row.update(opacus_mode=best, opacus_ms=modes.get(best, float("nan")))
        row["opacus_over_jax_dp"] = row["opacus_ms"] / row["jax_dp_ms"]
        print(f"{row['shape']:<5} {row['batch']:>3} x {row['seq']:<3} {row['jax_ms']:7.1f} {row['jax_dp_ms']:10.1f} "
              f"{row['dp_over_non_dp']:9.2f}x {row['opacus_ms']:13.1f} {best or '-':<10} "
              f"{row['opacus_over_jax_dp']:13.2f}x {row['torch_ms']:9.1f}")  # fmt: skip
        others = ", ".join(f"{m} {ms:.1f}" for m, ms in modes.items())
        vs_torch = row["opacus_ms"] / row["torch_ms"]
        print(f"      Opacus ms/step by mode: {others}; Opacus DP / torch non-DP {vs_torch:.2f}x")
    for row in rows:
        fast, cheap = row["opacus_over_jax_dp"] >= 1.5, row["dp_over_non_dp"] <= 2.0
        print(f"{row['shape']}: goal jaxblock DP >= 1.5x faster than Opacus: {row['opacus_over_jax_dp']:.2f}x, "
              f"{'met' if fast else 'NOT met'}; goal DP step <= 2x non-DP: {row['dp_over_non_dp']:.2f}x, "
              f"{'met' if cheap else 'NOT met'}")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        print(json.dumps({"rows": rows, "notes": notes, "k": k, "repeats": args.repeats, "threads": threads}))


if __name__ == "__main__":
    main()
