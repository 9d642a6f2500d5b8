"""The optimizer wrapper: fp32 main weights, loss-scale unscaling, clipping, step.

Model weights may be bf16/fp16; the optimizer updates fp32 main copies and writes the
result back. Gradients come from `param.main_grad` (fp32, accumulated over
micro-batches by the data-parallel layer). Weight decay skips biases and norm weights
(every 1-D parameter), as Megatron does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from paratron.training.lr_schedule import LRSchedule


def _decays(name: str, param: nn.Parameter) -> bool:
    return param.dim() > 1 and not name.endswith(".bias")


class MixedPrecisionOptimizer:
    def __init__(self, model: nn.Module, optimizer_config, schedule: LRSchedule, loss_scaler):
        o = optimizer_config
        self.config = o
        self.schedule, self.loss_scaler = schedule, loss_scaler
        self.model_params: list[nn.Parameter] = []
        self.main_params: list[torch.Tensor] = []
        groups = {True: [], False: []}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            main = p if p.dtype == torch.float32 else p.detach().float().clone()
            self.model_params.append(p)
            self.main_params.append(main)
            groups[_decays(name, p)].append(main)
        param_groups = [{"params": groups[True], "weight_decay": o.weight_decay},
                        {"params": groups[False], "weight_decay": 0.0}]
        param_groups = [g for g in param_groups if g["params"]]
        lr = schedule.lr_at(0)
        if o.optimizer == "adam":
            self.optimizer = torch.optim.AdamW(param_groups, lr=lr,
                                               betas=(o.adam_beta1, o.adam_beta2),
                                               eps=o.adam_eps)
        else:
            self.optimizer = torch.optim.SGD(param_groups, lr=lr, momentum=o.sgd_momentum)
        self.steps = 0  # successful optimizer steps, what the lr schedule counts

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _main_grads(self) -> list[torch.Tensor]:
        return [p.main_grad for p in self.model_params]

    @torch.no_grad()
    def step(self) -> tuple[bool, float | None, int | None]:
        """Unscale, check overflow, clip, update, copy back.

        Returns (stepped, grad norm, number of zero gradient entries); the norm and
        zero count are None when the step was skipped for an overflow.
        """
        grads = self._main_grads()
        scale = self.loss_scaler.scale
        if scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / scale)
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        found_inf = not math.isfinite(norm)
        self.loss_scaler.update(found_inf)
        if found_inf:
            return False, None, None
        if self.config.clip_grad > 0 and norm > self.config.clip_grad:
            torch._foreach_mul_(grads, self.config.clip_grad / (norm + 1e-6))
        num_zeros = int(sum((g == 0).sum().item() for g in grads))
        for main, grad in zip(self.main_params, grads):
            main.grad = grad
        self.optimizer.step()
        for main in self.main_params:
            main.grad = None
        for model_param, main in zip(self.model_params, self.main_params):
            if model_param is not main:
                model_param.copy_(main)
        self.steps += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr_at(self.steps)
        return True, norm, num_zeros
