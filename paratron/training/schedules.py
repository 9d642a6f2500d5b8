"""Forward/backward schedules over the micro-batches of one global batch.

A schedule gets the model, the step's micro-batches and a
`forward_step(batch, model) -> (output, loss_fn)`; `loss_fn(output)` returns the summed
loss of the micro-batch and its number of loss tokens. Gradients are of the loss
normalised once per global batch (`total_tokens`, counted over every micro-batch and
rank before the step), so any split into micro-batches and ranks gives the same update.

Without pipelining the schedule is plain gradient accumulation; the pipeline schedules
(1F1B, interleaved) share this interface.
"""

from __future__ import annotations

from typing import Callable, Iterable

import contextlib

import torch


def forward_backward_no_pipelining(forward_step: Callable, batches: Iterable[dict], model,
                                   *, total_tokens: float, loss_scale: float = 1.0,
                                   forward_only: bool = False
                                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run every micro-batch forward (and backward); returns (loss sum, tokens) each."""
    batches = list(batches)
    results = []
    for i, batch in enumerate(batches):
        # Gradients are reduced across data-parallel ranks on the last micro-batch only.
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or forward_only else model.no_sync()
        with sync, torch.set_grad_enabled(not forward_only):
            output, loss_fn = forward_step(batch, model)
            loss_sum, num_tokens = loss_fn(output)
            if not forward_only:
                (loss_sum * (loss_scale / total_tokens)).backward()
        results.append((loss_sum.detach(), num_tokens))
    return results
