"""Vocabulary-parallel cross entropy over chunks of tokens, the default loss (the plain
one with `--no-cross-entropy-loss-fusion`).

The plain `vocab_parallel_cross_entropy` turns the logits of a whole micro-batch into
fp32 and keeps their softmax for backward: tokens x vocabulary/TP x 4 bytes, 4 GiB for
8K tokens of Llama-3's 128K vocabulary, beside the logits themselves. This version
reads the logits in the model's dtype and upcasts only one chunk of
`--cross-entropy-chunk-size` tokens at a time. When the logits need a gradient, forward
also writes softmax - one-hot into a buffer of the logits' dtype, chunk by chunk, and
drops the logits; backward scales that buffer in place by each token's gradient: no
second pass over the vocabulary.

With the whole vocabulary on one rank, torch's log-softmax kernel does a chunk's max,
shift, exp and sum in one pass, and its exponential is the softmax. Split over TP, each
chunk goes through two elementwise functions (compiled under `--torch-compile`) and the
max logit, the target's logit and the sum of exponentials are all-reduced, one number
per token each, as the plain version does. Losses and fp32 gradients equal the plain
version's to rounding (rtol 1e-5); a bf16 gradient is rounded once more.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from paratron.parallel.comm import wide, wide_dtype
from paratron.parallel.process_groups import ProcessGroups


# Bytes of one chunk's fp32 logits by default: cache-sized on a CPU, where each pass over
# a chunk then stays in cache; large on a GPU, where each chunk costs kernel launches.
_CHUNK_BYTES = {"cpu": 1 << 20}
_GPU_CHUNK_BYTES = 512 << 20


def default_chunk_tokens(vocab_per_rank: int, device_type: str) -> int:
    """Tokens per chunk when `--cross-entropy-chunk-size` is not given."""
    return max(1, _CHUNK_BYTES.get(device_type, _GPU_CHUNK_BYTES) // (4 * vocab_per_rank))


def _chunks(logits: torch.Tensor, chunk_tokens: int):
    """Slices along the sequence dimension (-2) holding about `chunk_tokens` tokens.

    Slicing (rather than flattening) keeps the logits' strides: the output layer gives
    [b, s, v] as a transposed view of [s, b, v], which a flattening would copy."""
    rows = logits[..., 0].numel() // max(logits.shape[-2], 1)  # tokens per position
    width = max(1, chunk_tokens // max(rows, 1))
    for start in range(0, logits.shape[-2], width):
        yield slice(start, start + width)


def _softmax_stats(chunk: torch.Tensor, shift: torch.Tensor, local: torch.Tensor):
    """Per token of a chunk: the target's shifted logit and the sum of exponentials, fp32.
    The subtraction promotes to fp32 element by element: no fp32 copy of the chunk first."""
    shifted = chunk - shift.unsqueeze(-1)
    target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    return target_logit, shifted.exp_().sum(dim=-1)


def _softmax_minus_target(chunk: torch.Tensor, shift: torch.Tensor, sum_exp: torch.Tensor,
                          local: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """d loss / d logits of a chunk for a unit loss gradient, in the chunk's dtype."""
    softmax = (chunk - shift.unsqueeze(-1)).exp_().div_(sum_exp.unsqueeze(-1))
    softmax.scatter_add_(-1, local.unsqueeze(-1), -hit.unsqueeze(-1))
    return softmax.to(chunk.dtype)


@functools.cache
def _chunk_functions(compile_backend: str | None):
    """The two per-chunk functions, compiled once per backend (shapes vary by chunk)."""
    if compile_backend is None:
        return _softmax_stats, _softmax_minus_target
    return (torch.compile(_softmax_stats, backend=compile_backend),
            torch.compile(_softmax_minus_target, backend=compile_backend))


def _whole_vocabulary(logits, local, hit, grad, chunk_tokens: int) -> torch.Tensor:
    """One rank holds the whole vocabulary: torch's log-softmax kernel does the max, shift,
    exp and sum of a chunk in one pass, and its exponential is the softmax."""
    dtype = wide_dtype(logits.dtype)
    loss = torch.empty(logits.shape[:-1], dtype=dtype, device=logits.device)
    for part in _chunks(logits, chunk_tokens):
        log_probs = torch.log_softmax(logits[..., part, :], dim=-1, dtype=dtype)
        index = local[..., part].unsqueeze(-1)
        loss[..., part] = -log_probs.gather(-1, index).squeeze(-1)
        if grad is not None:
            minus_hit = -hit[..., part].unsqueeze(-1)
            if grad.dtype == log_probs.dtype:  # fp32 logits: exponentiate into the buffer
                torch.exp(log_probs, out=grad[..., part, :]).scatter_add_(-1, index, minus_hit)
            else:  # rounded to the buffer's dtype once, after the target's -1
                grad[..., part, :] = log_probs.exp_().scatter_add_(-1, index, minus_hit)
    return loss


def _split_vocabulary(logits, local, outside, hit, grad, group, chunk_tokens: int,
                      compile_backend: str | None) -> torch.Tensor:
    """Each TP rank holds a slice of the vocabulary: the max logit, the target's logit and
    the sum of exponentials are all-reduced over the group, one number per token each."""
    stats, softmax_minus_target = _chunk_functions(compile_backend)
    # The max of the converted values is the converted max: no fp32 copy needed.
    logits_max = wide(logits.max(dim=-1).values)
    dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    target_logit = torch.empty_like(logits_max)
    sum_exp = torch.empty_like(logits_max)
    for part in _chunks(logits, chunk_tokens):
        target_logit[..., part], sum_exp[..., part] = stats(
            logits[..., part, :], logits_max[..., part], local[..., part])
    target_logit = target_logit.masked_fill(outside, 0.0)
    dist.all_reduce(target_logit, group=group)
    dist.all_reduce(sum_exp, group=group)
    if grad is not None:
        for part in _chunks(logits, chunk_tokens):
            grad[..., part, :] = softmax_minus_target(
                logits[..., part, :], logits_max[..., part], sum_exp[..., part],
                local[..., part], hit[..., part])
    return sum_exp.log() - target_logit


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """Backward scales the saved gradient buffer in place, so it runs once per forward."""

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, ignore_index, chunk_tokens,
                compile_backend):
        local = target - vocab_start
        outside = (local < 0) | (local >= logits.shape[-1]) | (target == ignore_index)
        local = local.masked_fill(outside, 0)
        hit = (~outside).to(wide_dtype(logits.dtype))
        ignored = target == ignore_index
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        if group is None:
            loss = _whole_vocabulary(logits, local, hit, grad, chunk_tokens)
        else:
            loss = _split_vocabulary(logits, local, outside, hit, grad, group, chunk_tokens,
                                     compile_backend)
        loss = loss.masked_fill(ignored, 0.0)
        ctx.save_for_backward(grad, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, ignored = ctx.saved_tensors
        grad.mul_((grad_loss * ~ignored).unsqueeze(-1))
        return grad, None, None, None, None, None, None


def chunked_vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                         pg: ProcessGroups | None = None,
                                         chunk_tokens: int | None = None,
                                         ignore_index: int = -100,
                                         compile_backend: str | None = None) -> torch.Tensor:
    """Per-token loss (fp32, reduction none) for logits [..., s, v/TP] split by
    vocabulary over TP, with fp32 values for `chunk_tokens` tokens at a time (default:
    `default_chunk_tokens`); `compile_backend` compiles the per-chunk functions."""
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(logits.shape[-1], logits.device.type)
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    pg = pg or ProcessGroups.single()
    group = pg.tp.group if pg.tp.size > 1 else None
    vocab_start = pg.tp.rank * logits.shape[-1]
    return _ChunkedVocabParallelCrossEntropy.apply(logits, target, group, vocab_start,
                                                   ignore_index, chunk_tokens,
                                                   compile_backend)
