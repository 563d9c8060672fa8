"""Qwen2.5 1.5B Instruct on MathInstruct, the paper's Table 6 (beyond Llama architectures).

    python scripts/train.py --config configs/qwen2_5_1_5b.py --workdir runs/qwen2_5_1_5b   # on a GPU box
    python scripts/eval.py --workdir runs/qwen2_5_1_5b                                      # GSM8K exact match

Data as in the paper's Section 6.1: 50,000 examples sampled from TIGER-Lab/MathInstruct (seed 42),
split over 10 clients by Dirichlet(0.6) over their `source`; evaluated on GSM8K's test split. The
paper fine-tunes Qwen-2.5-1.5B-Instruct and gives no learning rate for it (Table 11 has Llama
only): 1e-5 here. 14 blocks of 2 layers, 28 rounds. Dims as in Qwen/Qwen2.5-1.5B-Instruct's
config.json (q/k/v projections carry biases).
"""

from jaxblock.run.config import base_config, model_section, paper_math


def get_config():
    config = paper_math(base_config())
    config.hf_checkpoint = "Qwen/Qwen2.5-1.5B-Instruct"
    config.model = model_section(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        qkv_bias=True,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
        param_dtype="bfloat16",
        dtype="bfloat16",
    )
    # As the paper's setup (10 clients, one block per round, AdamW); Qwen is not in its Table 11.
    config.rounds = 28
    config.num_clients = 10
    config.optimizer.learning_rate = 1e-05
    return config
