"""Rotary position embeddings: plain, Llama-3 scaled, linearly interpolated, or YaRN.

Frequencies depend only on the config; `RotaryEmbedding(positions)` returns the
cos/sin tables for given position ids, so packed sequences with per-document
positions need nothing special. `apply_rotary` rotates the leading `rot_dim`
channels of each head and passes the rest through (--rotary-percent).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _llama3_scaled(inv_freq: torch.Tensor, factor: float, original_max: int,
                   low_freq_factor: float = 1.0, high_freq_factor: float = 4.0) -> torch.Tensor:
    """Llama-3.x: keep high frequencies, divide low ones by `factor`, blend in between."""
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max / low_freq_factor
    high_freq_wavelen = original_max / high_freq_factor
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    middle = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(middle, blended, out)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term (DeepSeek-V2's yarn_get_mscale)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_scaled(dim: int, base: float, factor: float, original_max: int,
                 beta_fast: float, beta_slow: float) -> torch.Tensor:
    """YaRN: extrapolate high frequencies, interpolate low ones, ramp in between."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    extrapolated = 1.0 / (base ** exponent)
    interpolated = 1.0 / (factor * base ** exponent)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp
    return (interpolated * (1 - keep) + extrapolated * keep).float()


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the rotated part of each head, [s, b, 1, rot_dim]."""

    def __init__(self, rot_dim: int, base: float = 10000.0, *, interleaved: bool = False,
                 seq_len_interpolation_factor: float | None = None,
                 llama3_factor: float | None = None, yarn_factor: float | None = None,
                 original_max_position_embeddings: int | None = None,
                 beta_fast: float = 32.0, beta_slow: float = 1.0,
                 mscale: float = 1.0, mscale_all_dim: float = 0.0):
        super().__init__()
        self.rot_dim, self.interleaved = rot_dim, interleaved
        self.interpolation = seq_len_interpolation_factor
        self.attention_scale = 1.0
        if yarn_factor is not None and yarn_factor > 1:
            inv_freq = _yarn_scaled(rot_dim, base, yarn_factor,
                                    original_max_position_embeddings or 4096,
                                    beta_fast, beta_slow)
            self.attention_scale = (yarn_mscale(yarn_factor, mscale)
                                    / yarn_mscale(yarn_factor, mscale_all_dim))
        else:
            inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64)
                                       / rot_dim)).float()
            if llama3_factor is not None:
                inv_freq = _llama3_scaled(inv_freq, llama3_factor,
                                          original_max_position_embeddings or 8192)
        # A buffer follows the model to its device once; non-persistent: not in checkpoints.
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def _apply(self, fn, recurse=True):
        """`model.to(bf16)` must not round the frequencies: the buffer follows the
        device of a move and keeps fp32."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] -> (cos, sin), each [s, b, 1, rot_dim] in fp32, computed
        on the positions' device."""
        pos = position_ids.t().float()
        if self.interpolation:
            pos = pos / self.interpolation
        freqs = pos.unsqueeze(-1) * self.inv_freq
        if self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat([freqs, freqs], dim=-1)
        emb = emb.unsqueeze(2)
        return emb.cos() * self.attention_scale, emb.sin() * self.attention_scale


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Each pair (x1, x2) of a channel and its partner becomes (-x2, x1): the two halves,
    or neighbouring channels with `interleaved`."""
    if interleaved:
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([-odd, even], dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool = False) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x [s, b, heads, d] in fp32, rounded once
    to x's dtype: Hugging Face's `x * cos + rotate_half(x) * sin`, bit for bit in fp32.
    The fp32 tables promote the products element by element, so x itself is never copied
    to fp32; in eager mode these few elementwise kernels beat writing the two halves
    into a preallocated output, and torch.compile fuses them into one."""
    rot_dim = cos.shape[-1]
    rotated = x[..., :rot_dim]
    out = (rotated * cos + _rotate(rotated, interleaved) * sin).to(x.dtype)
    return torch.cat([out, x[..., rot_dim:]], dim=-1) if rot_dim < x.shape[-1] else out


def build_rotary(config) -> RotaryEmbedding | None:
    """The rotary embedding a TransformerConfig asks for, or None for other positions."""
    if config.position_embedding_type not in ("rope", "yarn"):
        return None
    head_dim = (config.qk_pos_emb_head_dim if config.multi_latent_attention
                else config.kv_channels)
    rot_dim = int(head_dim * config.rotary_percent)
    yarn = config.uses_yarn()
    return RotaryEmbedding(
        rot_dim, config.rotary_base, interleaved=config.rotary_interleaved,
        seq_len_interpolation_factor=config.rotary_seq_len_interpolation_factor,
        llama3_factor=config.rope_scaling_factor if config.use_rope_scaling else None,
        yarn_factor=config.rotary_scaling_factor if yarn else None,
        original_max_position_embeddings=config.rope_original_max_positions(),
        beta_fast=config.beta_fast, beta_slow=config.beta_slow,
        mscale=config.mscale, mscale_all_dim=config.mscale_all_dim)
