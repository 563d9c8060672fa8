"""Llama 3.2 3B, the paper's main setup (dims as in meta-llama/Llama-3.2-3B's config.json).

python scripts/train.py --config configs/llama3_2_3b.py
"""

from jaxblock.config import base_config, model_section


def get_config():
    config = base_config()
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
