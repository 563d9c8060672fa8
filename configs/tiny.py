"""The embedded default: the bundled tiny Llama (3.4M params, 8 layers) fine-tuned on the bundled arithmetic task.

    python scripts/train.py --config configs/tiny.py --workdir runs/tiny
    python scripts/eval.py --workdir runs/tiny

Everything it reads ships in assets/ (remade by scripts/make_assets.py): no hub access.
"""

import os

from jaxblock.run.config import base_config, model_section

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def get_config():
    config = base_config()
    config.model = model_section(
        model_type="llama",
        vocab_size=512,
        hidden_size=192,
        intermediate_size=512,
        num_layers=8,
        num_heads=4,
        num_kv_heads=2,
        head_dim=48,
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
    config.hf_checkpoint = os.path.join(ASSETS, "tiny_base")  # pretrained by scripts/make_assets.py
    config.data.source = "mathinstruct"  # MathInstruct's fields: source, instruction, output
    config.data.path = os.path.join(ASSETS, "data", "math_train.jsonl")
    config.data.partition = "dirichlet"
    config.data.alpha = 0.6
    config.eval.source = "gsm8k"  # GSM8K's fields: question, answer '... #### N'
    config.eval.path = os.path.join(ASSETS, "data", "math_eval.jsonl")
    config.eval.prompt_len = 32  # the longest bundled prompt is 23 tokens
    config.eval.max_new_tokens = 24  # the longest response is 21
    config.rounds = 50
    config.num_clients = 10
    config.local_steps = 10
    config.batch_size = 4
    config.seq_len = 48  # the longest bundled example is 44 tokens
    config.blocks.layers_per_block = 2  # 4 blocks of layers
    # ... and a 5th: the final norm and LM head. The bundled base never saw the response's words
    # ("The answer is") in pretraining, so their head rows are untrained and a frozen head cannot
    # say them (a hub LLM has seen every token; its configs keep the head frozen).
    config.blocks.head_block = True
    config.optimizer.learning_rate = 2e-3
    return config
