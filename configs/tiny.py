"""Tiny Llama (about 3.4M params) that runs on a laptop CPU in minutes: the embedded default.

python scripts/demo.py --config configs/tiny.py
"""

from jaxblock.config import base_config, model_section


def get_config():
    config = base_config()
    config.model = model_section(
        model_type="llama",
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        param_dtype="float32",
        dtype="float32",
    )
    config.mesh = dict(data=-1, fsdp=1, tensor=1)  # pure data parallel: the model is tiny
    config.rounds = 20
    config.num_clients = 10
    config.local_steps = 10
    config.batch_size = 4
    config.seq_len = 128
    config.blocks.layers_per_block = 2
    config.optimizer.learning_rate = 5e-4
    return config
