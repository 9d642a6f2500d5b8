"""The model: TransformerConfig, GPTModel and its parts, and presets."""

from paratron.model.config import TransformerConfig
from paratron.model.gpt import GPTModel

__all__ = ["GPTModel", "TransformerConfig"]
