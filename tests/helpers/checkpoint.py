"""Single-process checkpoint steps shared by the checkpoint, corruption and security tests."""

import dataclasses

from paratron.checkpoint import save_checkpoint


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
