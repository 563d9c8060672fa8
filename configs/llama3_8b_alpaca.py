"""Llama 3 8B on Alpaca-GPT4, the paper's Table 1 (Alpaca-GPT4, Llama 3-8B column: MT-Bench).

    python scripts/train.py --config configs/llama3_8b_alpaca.py --workdir runs/llama3_8b_alpaca   # on a GPU box
    OPENAI_API_KEY=... python scripts/eval.py --workdir runs/llama3_8b_alpaca --judge-url https://api.openai.com/v1

Data as in the paper's Section 6.1: all of vicgalle/alpaca-gpt4 (52,002 examples; the paper samples
only MathInstruct), split over 10 clients by Dirichlet(0.1) over a text-cluster label (TF-IDF k-means
of the instruction), seed 42; scored by MT-Bench, each of its 80 questions' two turns graded by a
GPT-4o judge (scripts/eval.py --bench mt_bench: 160 judgments per model). The model and the rest of
the setup are llama3_8b.py's: 16 blocks of 2 layers, one random block per round, 32 rounds, AdamW;
the learning rate is ParaBlock's for this cell of Table 11 (1e-5).
"""

import os

from jaxblock.run.config import load_config, paper_alpaca


def get_config():
    config = paper_alpaca(load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama3_8b.py")))
    config.optimizer.learning_rate = 1e-05  # ParaBlock's (Alpaca-GPT4, Table 11)
    return config
