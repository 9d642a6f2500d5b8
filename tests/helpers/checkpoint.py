"""Single-process checkpoint steps shared by the checkpoint, corruption and security tests."""

import dataclasses

import torch

from paratron.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from paratron.convert.hf_config import transformer_config
from paratron.model.gpt import GPTModel


FLAGS = ("--train-iters", "6", "--global-batch-size", "4", "--micro-batch-size", "2",
         "--num-workers", "0")  # dropout stays on: the RNG states must come back


def train_state(trainer) -> dict:
    state = dataclasses.asdict(trainer.state)
    state.pop("losses")
    return state


def steps(trainer, n):
    for _ in range(n):
        trainer.state.losses.append(trainer.train_step()[0])
        trainer.state.iteration += 1


def save(trainer, save_dir):
    return save_checkpoint(save_dir, trainer.state.iteration, trainer.models, trainer.pg,
                           trainer.optimizer, config=trainer.cfg.to_dict(),
                           train_state=train_state(trainer))


def checkpoint_logits(path, ids):
    """The logits of the model a Paratron checkpoint folder holds, in one process."""
    meta = read_metadata(path)
    config = transformer_config({k: v for k, v in meta["config"]["model"].items()
                                 if k not in ("sequence_parallel", "cp_comm_type")})
    model = GPTModel(config).eval()
    load_checkpoint(path, [model], model.pg, load_rng=False)
    with torch.no_grad():
        return model(ids)
