"""LayerNorm and RMSNorm, computed in fp32 whatever the weights' dtype."""

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
        out = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(),
                           self.eps)
        return out.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)
        return normed * self.weight


def build_norm(kind: str, size: int, eps: float, dtype=None) -> nn.Module:
    """The normalisation named by --normalization."""
    return {"LayerNorm": LayerNorm, "RMSNorm": RMSNorm}[kind](size, eps, dtype=dtype)
