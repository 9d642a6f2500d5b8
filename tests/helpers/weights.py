"""Unsharded weights of a trainer's model on any layout, by global parameter name, for
comparing a parallel run with the single-process one."""

import torch
import torch.distributed as dist

from paratron.parallel.expert_parallel import expert_gather
from paratron.parallel.sharding import gather_tensor, layout_of


def _all_gather(t: torch.Tensor, size: int, group) -> list[torch.Tensor]:
    if size == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def full_weights(trainer) -> dict:
    """This rank's stages' weights, TP / expert shards gathered; tied copies left out."""
    pg, out = trainer.pg, {}
    for model in trainer.models:
        module = model.module
        for name, p in module.named_parameters():
            if layout_of(p).tied == "copy":
                continue
            t = p.detach()
            if layout_of(p).expert:
                etp = _all_gather(t, pg.etp.size, pg.etp.group)
                per_ep = _all_gather(torch.stack(etp), pg.ep.size, pg.ep.group)
                full = expert_gather([list(x.unbind(0)) for x in per_ep], p)
            else:
                full = gather_tensor(_all_gather(t, pg.tp.size, pg.tp.group), p)
            out[module.global_name(name)] = full.float().numpy()
    return out
