"""jaxblock: federated block-coordinate fine-tuning of LLMs in JAX/Flax."""

from jaxblock import model
from jaxblock.model import forward, init
from jaxblock.model.config import ModelConfig
from jaxblock.model.generate import generate
from jaxblock.model.hf_io import load_hf, save_hf
from jaxblock.run.config import load_config

__all__ = ["ModelConfig", "model", "forward", "generate", "init", "load_config", "load_hf", "save_hf"]
__version__ = "0.1.0"
