"""Llama 3.2 3B on MathInstruct, the paper's Table 1 (Math Instruct, Llama 3.2-3B column).

    python scripts/train.py --config configs/llama3_2_3b.py --workdir runs/llama3_2_3b   # on a GPU box
    python scripts/eval.py --workdir runs/llama3_2_3b                                      # GSM8K exact match

Data as in the paper's Section 6.1: 50,000 examples sampled from TIGER-Lab/MathInstruct (seed 42),
split over 10 clients by Dirichlet(0.6) over their `source`; evaluated on GSM8K's test split.
14 blocks of 2 layers, one random block per round, 28 rounds, AdamW at ParaBlock's learning rate
for this cell of Table 11 (3e-5). Dims as in meta-llama/Llama-3.2-3B's config.json.
"""

from jaxblock.run.config import base_config, model_section, paper_math


def get_config():
    config = paper_math(base_config())
    config.hf_checkpoint = "meta-llama/Llama-3.2-3B"
    config.model = model_section(
        model_type="llama",
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_layers=28,
        num_heads=24,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_type="llama3",
        rope_factor=32.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_position_embeddings=8192,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
        param_dtype="bfloat16",
        dtype="bfloat16",
    )
    # The paper's setup: 10 clients, one block per round, AdamW; ParaBlock's learning rate (MathInstruct, Table 11).
    config.rounds = 28
    config.num_clients = 10
    config.optimizer.learning_rate = 3e-05
    return config
