"""`pretrain(cfg)`: tokenizer, datasets, model, and the training loop, from one Config.

This is what `paratron train`, `python -m paratron.train` and the `pretrain_gpt.py`
shim run; a library user can call it with a Config built in Python.
"""

from __future__ import annotations

from typing import Callable

from paratron.config import Config, ConfigError, format_config
from paratron.training.trainer import Trainer, TrainState, resolve_vocab_size


def build_tokenizer_for(cfg: Config):
    """The tokenizer the data flags name, or None (mock data with --vocab-size)."""
    from paratron.data.tokenizer import build_tokenizer

    d = cfg.data
    kind = d.tokenizer_type or d.patch_tokenizer_type
    if kind is None:
        return None
    return build_tokenizer(kind, vocab_file=d.vocab_file, merge_file=d.merge_file,
                           tokenizer_model=d.tokenizer_model, vocab_size=cfg.model.vocab_size)


def build_datasets(cfg: Config, tokenizer, vocab_size: int):
    """Train/valid/test datasets with Megatron's sample counts."""
    from paratron.data.gpt_dataset import build_train_valid_test_datasets, sample_counts

    t, d = cfg.training, cfg.data
    counts = sample_counts(train_iters=t.train_iters, train_samples=t.train_samples,
                           global_batch_size=t.global_batch_size,
                           eval_interval=t.eval_interval, eval_iters=t.eval_iters)
    return build_train_valid_test_datasets(
        data_path=d.data_path, data_path_config=d.data_path_config, split=d.split,
        seq_length=d.seq_length, seed=t.seed, num_samples=counts, tokenizer=tokenizer,
        vocab_size=vocab_size, cache_path=d.data_cache_path, mock=d.mock_data,
        eod_mask_loss=d.eod_mask_loss, reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask)


def pretrain(cfg: Config, log: Callable[[str], None] = print) -> TrainState:
    log(format_config(cfg))
    tokenizer = build_tokenizer_for(cfg)
    vocab = tokenizer.vocab_size if tokenizer is not None else None
    if not cfg.data.mock_data and not cfg.data.data_path and not cfg.data.data_path_config:
        raise ConfigError("no training data: give --data-path (or --data-path-config), "
                          "or --mock-data")
    cfg.model.padded_vocab_size = resolve_vocab_size(cfg, vocab)
    datasets = build_datasets(cfg, tokenizer, vocab or cfg.model.padded_vocab_size)
    return Trainer(cfg, datasets, tokenizer_vocab_size=vocab, log=log).train()
