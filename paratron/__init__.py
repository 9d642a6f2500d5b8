"""Paratron: Megatron-LM's parallel training of large language models in plain PyTorch."""

__version__ = "0.1.0"
