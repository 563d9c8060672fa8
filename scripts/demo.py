"""The `make demo` entry point. At this stage: build the tiny model and greedily generate.

python scripts/demo.py --config configs/tiny.py
"""

import argparse
import time

import jax
import jax.numpy as jnp

import jaxblock
from jaxblock import runtime


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    config, args = runtime.parse_args(parser)
    layout = runtime.make_layout(config)
    cfg, params = runtime.load_model(config, layout)
    print(f"model: {jaxblock.model.count_params(params) / 1e6:.2f}M params on mesh {dict(layout.mesh.shape)}")
    prompts = jax.random.randint(jax.random.key(config.seed), (2, 8), 3, cfg.vocab_size)
    start = time.perf_counter()
    new = jaxblock.generate(cfg, params, prompts, args.new_tokens)
    new.block_until_ready()
    print(f"greedy decoding of {args.new_tokens} tokens x 2 rows: {time.perf_counter() - start:.2f}s (incl. compile)")
    for row, (p, n) in enumerate(zip(prompts.tolist(), new.tolist(), strict=True)):
        print(f"  row {row}: prompt {p} -> {n}")
    logits = jaxblock.forward(cfg, params, jnp.concatenate([prompts, new], axis=1))
    print(f"forward on prompt+generation: logits {tuple(logits.shape)}, finite={bool(jnp.isfinite(logits).all())}")


if __name__ == "__main__":
    main()
