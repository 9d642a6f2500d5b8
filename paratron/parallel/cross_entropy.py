"""Vocabulary-parallel cross entropy over chunks of tokens (`--cross-entropy-loss-fusion`).

The plain `vocab_parallel_cross_entropy` turns the logits of a whole micro-batch into
fp32 and keeps their softmax for backward: tokens x vocabulary/TP x 4 bytes, 4 GiB for
8K tokens of Llama-3's 128K vocabulary, beside the logits themselves. This version
reads the logits in the model's dtype and converts only one chunk of
`--cross-entropy-chunk-size` tokens at a time. Forward keeps, per token, the max logit
and the sum of exponentials; backward rebuilds each chunk's softmax from the logits
(saved as they are, not copied) and writes the gradient in the logits' dtype.

The arithmetic per token is the plain version's (same max, shift, exp, sum, the same
three all-reduces of one number per token over TP), so losses and gradients are equal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from paratron.parallel.process_groups import ProcessGroups


def _chunks(logits: torch.Tensor, chunk_tokens: int):
    """Slices along the sequence dimension (-2) holding about `chunk_tokens` tokens.

    Slicing (rather than flattening) keeps the logits' strides: the output layer gives
    [b, s, v] as a transposed view of [s, b, v], which a flattening would copy."""
    rows = logits[..., 0].numel() // max(logits.shape[-2], 1)  # tokens per position
    width = max(1, chunk_tokens // max(rows, 1))
    for start in range(0, logits.shape[-2], width):
        yield slice(start, start + width)


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, ignore_index, chunk_tokens):
        # The max of the converted values is the converted max: no fp32 copy needed.
        logits_max = logits.max(dim=-1).values.float()
        if group is not None:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        local = target - vocab_start
        outside = (local < 0) | (local >= logits.shape[-1]) | (target == ignore_index)
        local = local.masked_fill(outside, 0)
        target_logit = torch.empty_like(logits_max)
        sum_exp = torch.empty_like(logits_max)
        for part in _chunks(logits, chunk_tokens):
            shifted = logits[..., part, :].float() - logits_max[..., part].unsqueeze(-1)
            target_logit[..., part] = shifted.gather(
                -1, local[..., part].unsqueeze(-1)).squeeze(-1)
            sum_exp[..., part] = shifted.exp().sum(dim=-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
        if group is not None:
            dist.all_reduce(target_logit, group=group)
            dist.all_reduce(sum_exp, group=group)
        ignored = target == ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        ctx.chunk_tokens = chunk_tokens
        ctx.save_for_backward(logits, logits_max, sum_exp, local, outside, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, logits_max, sum_exp, local, outside, ignored = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_loss * (~ignored).to(torch.float32)
        hit = (~outside).to(torch.float32)
        for part in _chunks(logits, ctx.chunk_tokens):
            shifted = logits[..., part, :].float() - logits_max[..., part].unsqueeze(-1)
            softmax = shifted.exp().div_(sum_exp[..., part].unsqueeze(-1))
            softmax.scatter_add_(-1, local[..., part].unsqueeze(-1),
                                 -hit[..., part].unsqueeze(-1))
            grad[..., part, :] = softmax.mul_(scale[..., part].unsqueeze(-1))
        return grad, None, None, None, None, None


def chunked_vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                         pg: ProcessGroups | None = None,
                                         chunk_tokens: int = 4096,
                                         ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss (fp32, reduction none) for logits [..., s, v/TP] split by
    vocabulary over TP, with fp32 values for `chunk_tokens` tokens at a time."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    pg = pg or ProcessGroups.single()
    group = pg.tp.group if pg.tp.size > 1 else None
    vocab_start = pg.tp.rank * logits.shape[-1]
    return _ChunkedVocabParallelCrossEntropy.apply(logits, target, group, vocab_start,
                                                   ignore_index, chunk_tokens)
