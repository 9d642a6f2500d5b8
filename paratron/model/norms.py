"""LayerNorm and RMSNorm on the model's dtype; the kernels compute in fp32 inside.

`F.layer_norm` and `F.rms_norm` accumulate reduced-precision inputs in fp32 and round
once, so no fp32 copy of the input is made or saved (on CUDA `F.rms_norm` is one fused
kernel that saves the input as it is and one statistic per token). RMSNorm multiplies
the weight after rounding, as Hugging Face's Llama does (`weight * hidden.to(dtype)`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], eps=self.eps) * self.weight


def build_norm(kind: str, size: int, eps: float, dtype=None) -> nn.Module:
    """The normalisation named by --normalization."""
    return {"LayerNorm": LayerNorm, "RMSNorm": RMSNorm}[kind](size, eps, dtype=dtype)
