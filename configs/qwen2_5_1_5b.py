"""Qwen2.5 1.5B (dims as in Qwen/Qwen2.5-1.5B's config.json; q/k/v projections carry biases).

python scripts/train.py --config configs/qwen2_5_1_5b.py
"""

from jaxblock.config import base_config, model_section


def get_config():
    config = base_config()
    config.hf_checkpoint = "Qwen/Qwen2.5-1.5B"
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
        max_position_embeddings=131072,
        qkv_bias=True,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151643,
        param_dtype="bfloat16",
        dtype="bfloat16",
    )
    # As the paper's setup (10 clients, one block per round, AdamW); Qwen is not in its Table 11.
    config.rounds = 28
    config.num_clients = 10
    config.optimizer.learning_rate = 1e-05
    return config
