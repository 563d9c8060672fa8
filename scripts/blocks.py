"""Prints a config's block partition: block id, layers, leaves, parameter count, bytes.

Works from parameter shapes alone (`jax.eval_shape`), so no weights are loaded or allocated:

    python scripts/blocks.py --config configs/llama3_2_3b.py
    python scripts/blocks.py --config configs/tiny.py --config.blocks.partial=True --config.blocks.layers_per_block=1
"""

import argparse

from jaxblock.fed import blocks
from jaxblock.run import runtime
from jaxblock.run.config import model_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config, _ = runtime.parse_args(parser)
    cfg = model_config(config)
    part = runtime.make_partition(config, cfg)
    print(f"{cfg.model_type}: {cfg.num_layers} layers, params in {cfg.param_dtype}; blocks: {config.blocks.to_dict()}")
    print(blocks.describe(part))


if __name__ == "__main__":
    main()
