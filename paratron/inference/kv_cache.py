"""The key/value cache of one generation batch (Megatron-Core's `InferenceParams`).

A prompt is run once (prefill); each later step feeds only the newest token, whose
queries attend to every cached key. Each attention layer keeps, under its layer
number, the tensors it needs again: keys and values for MHA/GQA (this rank's query
groups under tensor parallelism), the normalised latent and rotated rope key for
multi-latent attention. They are preallocated for `max_sequence_length` positions,
sequence-first like the activations, so a step writes its rows in place.

Prompts of different lengths are left-padded: `key_padding_mask` [b, max_sequence_length]
says which positions hold real tokens. No query attends to a padded key; a padded
query attends to itself only, which keeps its (unused) row finite.
"""

from __future__ import annotations

import torch


def cache_bytes(config, batch: int, length: int, tp_size: int, element_bytes: int) -> int:
    """Bytes the cache of `batch` rows and `length` positions holds on one TP rank once
    full: keys and values of this rank's query groups for MHA/GQA, the latent and the
    rope key for multi-latent attention, in every layer."""
    if config.multi_latent_attention:
        per_position = config.kv_lora_rank + config.qk_pos_emb_head_dim
    else:
        groups = max(config.num_query_groups // tp_size, 1)
        per_position = 2 * groups * config.kv_channels
    return config.num_layers * batch * length * per_position * element_bytes


class InferenceParams:
    def __init__(self, max_batch_size: int, max_sequence_length: int,
                 key_padding_mask: torch.Tensor | None = None):
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (
                max_batch_size, max_sequence_length):
            raise ValueError(f"key_padding_mask has shape {list(key_padding_mask.shape)}, "
                             f"expected [{max_batch_size}, {max_sequence_length}]")
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.key_padding_mask = key_padding_mask
        # Checked once here rather than at every step (a device sync on GPUs).
        self.padded = key_padding_mask is not None and not bool(key_padding_mask.all())
        self.sequence_len_offset = 0  # positions already in the cache
        self.key_value_memory_dict: dict[int, tuple[torch.Tensor, ...]] = {}

    def append(self, layer_number: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store this step's tensors ([s, b, ...] each) of a layer after the cached ones
        and return every cached position so far, [offset + s, b, ...] each."""
        start, s = self.sequence_len_offset, new[0].shape[0]
        end = start + s
        if end > self.max_sequence_length:
            raise ValueError(f"the cache holds {self.max_sequence_length} positions; "
                             f"{start} cached + {s} new do not fit")
        memory = self.key_value_memory_dict.get(layer_number)
        if memory is None:
            memory = tuple(t.new_empty((self.max_sequence_length, *t.shape[1:])) for t in new)
            self.key_value_memory_dict[layer_number] = memory
        for cached, t in zip(memory, new, strict=True):
            cached[start:end] = t
        return tuple(cached[:end] for cached in memory)

    def attention_mask(self, s: int, device: torch.device) -> torch.Tensor | None:
        """Which cached keys each of the next `s` queries may see: boolean
        [b, 1, s, offset + s], True where allowed. None for a first, unpadded chunk,
        which is plain causal attention (as in training)."""
        start = self.sequence_len_offset
        end = start + s
        if start == 0 and not self.padded:
            return None
        query = torch.arange(start, end, device=device).unsqueeze(1)
        key = torch.arange(end, device=device).unsqueeze(0)
        allowed = (key <= query).unsqueeze(0)  # [1, s, end]
        if self.padded:
            real = self.key_padding_mask[:, :end].to(device).unsqueeze(1)
            allowed = (allowed & real) | (key == query).unsqueeze(0)
        return allowed.expand(self.max_batch_size, s, end).unsqueeze(1)

    def advance(self, s: int) -> None:
        """Count the `s` positions the last forward added."""
        self.sequence_len_offset += s
