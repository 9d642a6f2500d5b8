"""What a trainer really holds and saves, to compare with the memory plan."""

import numpy as np
import torch

from paratron.training.memory_plan import state_bytes
from tests.helpers.memory_utils import storage_bytes
from tests.helpers.training import PatternData


ACTIVATION_RTOL = 0.02

TINY = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--lr 1e-3 --vocab-size 100 --device cpu --train-iters 1 --num-workers 0 "
        "--micro-batch-size 2 --global-batch-size 2 --attention-dropout 0 --bf16 "
        "--eval-interval 1000 --eval-iters 0 --log-interval 1000").split()


def held_state_bytes(trainer) -> dict:
    """Bytes of weights, gradient buffers, main weights and optimizer moments a trainer
    holds (call after a step: the optimizer state exists only then)."""
    params = [p for model in trainer.models for p in model.module.parameters()]
    optimizer = trainer.optimizer.optimizer
    mains = [s.main for s in trainer.optimizer.segments]
    weight_storages = {p.untyped_storage().data_ptr() for p in params}
    own_mains = [m for m in mains if m.untyped_storage().data_ptr() not in weight_storages]
    moments = [v for m in mains for v in optimizer.state[m].values()
               if torch.is_tensor(v) and v.dim() > 0]
    return {"weights": storage_bytes(params),
            "grads": storage_bytes([p.main_grad for p in params]),
            "main_weights": storage_bytes(own_mains),
            "optimizer_moments": storage_bytes(moments)}


def planned_state_bytes(cfg, pp_rank=0, dp_rank=0, edp_rank=0) -> dict:
    s = state_bytes(cfg, pp_rank, dp_rank, edp_rank)
    return {"weights": s.weights, "grads": s.grads, "main_weights": s.main_weights,
            "optimizer_moments": s.optimizer_moments}


def measured_saved_bytes(trainer) -> int:
    """Bytes autograd saves for backward over one micro-batch's forward and loss."""
    model = trainer.model
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    sample = PatternData(trainer.cfg.data.seq_length, 100)
    batch = [sample[i] for i in range(trainer.cfg.training.micro_batch_size)]
    tokens, labels, mask = (torch.from_numpy(np.stack([b[key] for b in batch]))
                            for key in ("tokens", "labels", "loss_mask"))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = (model(tokens, None, None, labels=labels).float() * mask).sum()
    loss.backward()
    return sum(seen.values())
