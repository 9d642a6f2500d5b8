"""The one exception type that conversion raises for a checkpoint it cannot read.

A user pointing Paratron at a Hugging Face folder should learn in one line what is
wrong and where (the file, the tensor, the config key), never from a traceback deep
inside safetensors or torch. It subclasses ValueError so callers that only know the
standard type still catch it.
"""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted, described in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(str(message).replace("\r", " ").replace("\n", " "))
