"""Exports a run's model as a Hugging Face checkpoint (safetensors, config.json, tokenizer).

python scripts/export_hf.py --workdir runs/demo --out runs/demo/hf
python -c "from transformers import pipeline; print(pipeline('text-generation', 'runs/demo/hf')('<|user|>...'))"
"""

import argparse

from jaxblock.run import experiment


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    parser.add_argument("--base", default=None, help="the base model's directory, if it moved since training")
    args = parser.parse_args()
    try:
        step = experiment.export_hf(args.workdir, args.out, args.step, force=args.force, base_dir=args.base)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"exported step {step} of {args.workdir} to {args.out}")


if __name__ == "__main__":
    main()
