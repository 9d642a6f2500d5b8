"""Choosing the next token from the logits: greedy, or sampling with temperature,
top-k and top-p (nucleus), applied in that order as in `transformers`.

    sampling = Sampling(top_k=50, top_p=0.9, temperature=0.8, seed=1234)
    next_ids = sampling.sample(logits)          # logits [b, vocab] -> ids [b]

Top-k keeps the k largest logits (ties at the k-th value are kept too). Top-p keeps
the smallest set of most likely tokens whose probabilities sum to at least p: a token
stays when the tokens more likely than it sum to less than p, so the most likely one
always stays. Sampling draws from a generator seeded once, so the same seed gives the
same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """True where a logit is among the k largest of its row; logits [b, v]."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits >= kth


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """True where a token is in its row's nucleus of probability p; logits [b, v]."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of likelier tokens
    keep_sorted = before < p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def check_sampling(greedy: bool, top_k: int, top_p: float, temperature: float) -> None:
    """Refuse values that select nothing or mean nothing, one line each."""
    if top_k < 0:
        raise ValueError(f"--top-k must be 0 (off) or positive, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1] (1 is off), got {top_p}")
    if not temperature > 0.0:
        raise ValueError(f"--temperature must be positive, got {temperature}")
    if greedy and (top_k or top_p < 1.0 or temperature != 1.0):
        raise ValueError("--greedy takes the most likely token; drop --top-k, --top-p and "
                         "--temperature, or drop --greedy to sample")


@dataclass
class Sampling:
    """How to pick a token. Greedy when `greedy`, else a draw from the softmax of
    logits / temperature restricted to top-k (0: all) and top-p (1.0: all)."""

    greedy: bool = False
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int = 1234
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        check_sampling(self.greedy, self.top_k, self.top_p, self.temperature)

    def allowed(self, logits: torch.Tensor) -> torch.Tensor:
        """The tokens a draw may return, [b, v] boolean (after the temperature)."""
        keep = torch.ones_like(logits, dtype=torch.bool)
        if self.top_k:
            keep &= top_k_mask(logits, self.top_k)
        if self.top_p < 1.0:
            keep &= top_p_mask(logits.masked_fill(~keep, float("-inf")), self.top_p)
        return keep

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [b, v] -> token ids [b] (int64)."""
        logits = logits.float()
        if self.greedy:
            return logits.argmax(dim=-1)
        logits = logits / self.temperature
        logits = logits.masked_fill(~self.allowed(logits), float("-inf"))
        if self._generator is None or self._generator.device != logits.device:
            self._generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self._generator).squeeze(-1)
