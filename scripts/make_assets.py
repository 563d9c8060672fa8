"""Remakes the bundled assets (task data, tokenizer, pretrained tiny base model) deterministically.

python scripts/make_assets.py            # writes assets/data/ and assets/tiny_base/ (about 25 min on 2 CPU cores)
"""

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # bit-reproducible on CPU

from jaxblock.run import assets  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    info = assets.build(args.out, seed=args.seed, pretrain_steps=args.pretrain_steps)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
