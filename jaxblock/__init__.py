"""jaxblock: federated block-coordinate fine-tuning of LLMs in JAX/Flax."""

from jaxblock import model
from jaxblock.config import ModelConfig, load_config
from jaxblock.generate import generate
from jaxblock.hf_io import load_hf, save_hf
from jaxblock.model import forward, init

__all__ = ["ModelConfig", "model", "forward", "generate", "init", "load_config", "load_hf", "save_hf"]
__version__ = "0.1.0"
