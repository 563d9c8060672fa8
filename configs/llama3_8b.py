"""Llama 3 8B on MathInstruct, the paper's Table 1 (Math Instruct, Llama 3-8B column).

    python scripts/train.py --config configs/llama3_8b.py --workdir runs/llama3_8b   # on a GPU box
    python scripts/eval.py --workdir runs/llama3_8b                                  # GSM8K exact match

Data as in the paper's Section 6.1: 50,000 examples sampled from TIGER-Lab/MathInstruct (seed 42),
split over 10 clients by Dirichlet(0.6) over their `source`; evaluated on GSM8K's test split.
16 blocks of 2 layers, one random block per round, 32 rounds, AdamW at ParaBlock's learning rate
for this cell of Table 11 (3e-6). Dims as in meta-llama/Meta-Llama-3-8B's config.json.
"""

from jaxblock.run.config import base_config, model_section, paper_math


def get_config():
    config = paper_math(base_config())
    config.hf_checkpoint = "meta-llama/Meta-Llama-3-8B"
    config.model = model_section(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
        param_dtype="bfloat16",
        dtype="bfloat16",
    )
    # The paper's setup: 10 clients, one block per round, AdamW; ParaBlock's learning rate (MathInstruct, Table 11).
    config.rounds = 32
    config.num_clients = 10
    config.optimizer.learning_rate = 3e-06
    return config
