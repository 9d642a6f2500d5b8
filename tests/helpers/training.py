"""A tiny model's flags, deterministic data and a trainer built from them."""

import numpy as np

from paratron.cli.args import parse_args
from paratron.training.trainer import Trainer


BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --lr 1e-3 --vocab-size 100 --device cpu "
        "--eval-interval 1000 --eval-iters 0 --log-interval 1000").split()


class PatternData:
    """Deterministic per-index token sequences: sample i depends on i only."""

    def __init__(self, seq_length=16, vocab=100):
        self.seq_length, self.vocab = seq_length, vocab

    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        tokens = rng.integers(0, self.vocab, self.seq_length + 1)
        mask = np.ones(self.seq_length, np.float32)
        mask[rng.integers(0, self.seq_length)] = 0.0  # uneven token counts per sample
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": mask,
                "position_ids": np.arange(self.seq_length)}


def train_on_patterns(flags, pg=None, valid: bool = False):
    """A Trainer for `flags` on PatternData(16, 120) (also as validation data with
    `valid`), trained to the end, the distributed optimizer's last weights gathered;
    returns (trainer, its final state)."""
    data = PatternData(16, 120)
    trainer = Trainer(parse_args(flags), (data, data if valid else None, None), pg=pg,
                      log=lambda line: None)
    state = trainer.train()
    for model in trainer.models:
        model.finish_param_gather()
    return trainer, state


def make_trainer(*flags):
    cfg = parse_args(BASE + list(flags))
    data = PatternData(cfg.data.seq_length)
    return Trainer(cfg, (data, data, None), log=lambda line: None)
