"""Evaluates a run from its orbax checkpoint, base model too: GSM8K-style exact match and eval loss, or MT-Bench.

    python scripts/eval.py --workdir runs/demo            # latest checkpoint
    python scripts/eval.py --workdir runs/demo --step 10  # a given step
    python scripts/eval.py --workdir runs/demo --loss-by-token  # which reference tokens carry the eval loss

GSM8K (eval.source=gsm8k) writes DIR/eval.json and prints the figures. MT-Bench (eval.source=mt_bench,
the Alpaca configs; or --bench mt_bench) answers FastChat's 80 questions and has a judge behind any
OpenAI-compatible endpoint grade them, 160 judgments per model (docs/reproduction.md):

    export OPENAI_API_KEY=...
    python scripts/eval.py --workdir runs/llama3_8b_alpaca --judge-url https://api.openai.com/v1 --judge-model gpt-4o
    python scripts/eval.py --workdir runs/x --bench mt_bench --judge-url http://127.0.0.1:8000/v1 \\
        --judge-model Qwen/Qwen2.5-72B-Instruct --judge-key-env ''     # a local vLLM server, no key

It writes DIR/mt_bench/ (FastChat's model_answer/ and model_judgment/ files, mt_bench.json) and
prints the score table; rerun the same command to resume: nothing answered or judged is asked again.
"""

import argparse
import os
import sys

from jaxblock.run import experiment, mt_bench
from jaxblock.run.chat_api import ChatClient


def _ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected question ids, e.g. 81,101,130") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--no-base", action="store_true", help="skip the base model")
    parser.add_argument("--base", default=None, help="the base model's directory, if it moved since training")
    parser.add_argument("--bench", choices=("gsm8k", "mt_bench"), default=None, help="default: the run's eval.source")
    parser.add_argument(
        "--loss-by-token", action="store_true", help="also list the reference tokens that carry most of the eval loss"
    )
    mt = parser.add_argument_group("MT-Bench")
    mt.add_argument("--judge-url", help="an OpenAI-compatible API's base URL, e.g. https://api.openai.com/v1")
    mt.add_argument("--judge-model", default="gpt-4o", help="the judge model (the paper: gpt-4o)")
    mt.add_argument(
        "--judge-key-env", default="OPENAI_API_KEY", help="the environment variable holding the API key ('' = none)"
    )
    mt.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per judge request")
    mt.add_argument("--judge-retries", type=int, default=5, help="retries of a failed judge request, with backoff")
    mt.add_argument("--judge-backoff", type=float, default=2.0, help="first wait before a retry, doubled each time")
    mt.add_argument("--judge-parallel", type=int, default=1, help="judge requests in flight")
    mt.add_argument("--judge-max-tokens", type=int, default=mt_bench.JUDGE_MAX_TOKENS)
    mt.add_argument("--skip-judge", action="store_true", help="only generate the answers")
    mt.add_argument("--questions", type=_ids, default=(), help="question ids, e.g. 81,101 (default: all 80)")
    mt.add_argument("--limit", type=int, default=0, help="only the first N questions")
    mt.add_argument("--max-new-tokens", type=int, default=1024, help="per turn")
    mt.add_argument("--batch-size", type=int, default=16, help="questions decoded at once")
    mt.add_argument("--seed", type=int, default=0, help="of the sampled answers (writing, roleplay, stem, humanities)")
    mt.add_argument("--model-id", default="", help="the answers' model_id (default: <workdir name>_step<N>)")
    mt.add_argument("--out", default="", help="default: WORKDIR/mt_bench")
    args = parser.parse_args()
    try:
        bench = args.bench or experiment.read_config(args.workdir).eval.source
        if bench == "gsm8k":
            experiment.evaluate_run(
                args.workdir, args.step, base=not args.no_base, base_dir=args.base, loss_by_token=args.loss_by_token,
                source=args.bench,
            )  # fmt: skip
            return
        client = None
        if not args.skip_judge:
            if not args.judge_url:
                raise ValueError("--judge-url is required to grade MT-Bench (or --skip-judge: answers only)")
            key = os.environ.get(args.judge_key_env, "") if args.judge_key_env else ""
            client = ChatClient(
                args.judge_url, args.judge_model, api_key=key, key_name=f"${args.judge_key_env}",
                timeout_s=args.judge_timeout, retries=args.judge_retries, backoff_s=args.judge_backoff,
            )  # fmt: skip
        options = mt_bench.Options(
            out_dir=args.out, question_ids=args.questions, limit=args.limit, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, seed=args.seed, model_id=args.model_id,
            judge_max_tokens=args.judge_max_tokens, judge_parallel=args.judge_parallel,
        )  # fmt: skip
        summary = mt_bench.evaluate_run(
            args.workdir, client, options, step=args.step, base=not args.no_base, base_dir=args.base
        )
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    if summary.get("failed"):
        sys.exit(1)


if __name__ == "__main__":
    main()
