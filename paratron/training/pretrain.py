"""`pretrain(cfg)`: tokenizer, datasets, model, and the training loop, from one Config.

This is what `paratron train`, `python -m paratron.train` and the `pretrain_gpt.py`
shim run; a library user can call it with a Config built in Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from paratron.config import Config, format_config, resolve_vocab_size
from paratron.options import ConfigError
from paratron.parallel.launch import (failures_explained, init_distributed,
                                      previous_round_report, stop_heartbeat)
from paratron.parallel.process_groups import ProcessGroups
from paratron.data.tokenizer import PATCH_TOKENIZER_TYPES
from paratron.checkpoint.files import TOKENIZER_DIR
from paratron.training.memory_plan import check_fits_device
from paratron.training.trainer import Trainer, TrainState


def build_tokenizer_for(cfg: Config):
    """The tokenizer the data flags name, or None (mock data with --vocab-size)."""
    from paratron.data.tokenizer import build_tokenizer

    d = cfg.data
    kind = d.tokenizer_type or d.patch_tokenizer_type
    if kind is None:
        if d.mock_data and cfg.model.vocab_size is not None:
            kind = "NullTokenizer"  # mock tokens only need a vocabulary size and an eod
        else:
            return None
    if d.tokenizer_model is None and kind in ("HuggingFaceTokenizer", *PATCH_TOKENIZER_TYPES):
        d.tokenizer_model = tokenizer_folder_of(cfg.checkpoint.load)
    return build_tokenizer(kind, vocab_file=d.vocab_file, merge_file=d.merge_file,
                           tokenizer_model=d.tokenizer_model, vocab_size=cfg.model.vocab_size)


def tokenizer_folder_of(load_dir: str | None) -> str | None:
    """Where a Hugging Face tokenizer sits when only --load is given (as Pai-Megatron-Patch
    reads `--patch-tokenizer-type` tokenizers): the checkpoint's `tokenizer/` folder, or
    the --load folder itself when it holds tokenizer files."""
    if load_dir is None:
        return None
    for folder in (Path(load_dir) / TOKENIZER_DIR, Path(load_dir)):
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return str(folder)
    return None


def build_datasets(cfg: Config, tokenizer):
    """Train/valid/test datasets with Megatron's sample counts; samples whose documents
    must not attend to each other carry the attention mask that keeps them apart."""
    from paratron.data.gpt_dataset import (build_train_valid_test_datasets,
                                           get_train_valid_test_num_samples)

    t, d = cfg.training, cfg.data
    counts = get_train_valid_test_num_samples(
        t.global_batch_size, train_iters=t.train_iters, train_samples=t.train_samples,
        eval_interval=t.eval_interval, eval_iters=t.eval_iters)
    if d.sft or d.dataset in ("JSON-SFT", "MMAP-SFT"):
        from paratron.data.sft import build_sft_datasets
        return build_sft_datasets(
            d.data_path, d.split, d.seq_length, t.seed, counts, tokenizer,
            max_padding_length=d.max_padding_length, sequence_packing=d.sequence_packing,
            create_attention_mask=d.sequence_packing, train_data_path=d.train_data_path,
            valid_data_path=d.valid_data_path, test_data_path=d.test_data_path)
    return build_train_valid_test_datasets(
        d.data_path, d.split, d.seq_length, t.seed, counts, tokenizer,
        cache_path=d.data_cache_path, mock=d.mock_data, eod_mask_loss=d.eod_mask_loss,
        reset_position_ids=d.reset_position_ids, reset_attention_mask=d.reset_attention_mask,
        create_attention_mask=d.reset_attention_mask, data_path_config=d.data_path_config,
        train_data_path=d.train_data_path, valid_data_path=d.valid_data_path,
        test_data_path=d.test_data_path)


def setup_process_groups(cfg: Config) -> ProcessGroups:
    """Join the job (torchrun's environment or --world-size/--rank/--init-method) and
    build every parallel group; a single process needs neither."""
    p = cfg.parallel
    backend = p.distributed_backend if torch.cuda.is_available() else "gloo"
    try:
        init_distributed(backend, p.distributed_timeout_minutes, world_size=p.world_size,
                         rank=p.rank, init_method=p.init_method, local_rank=p.local_rank,
                         tensor_model_parallel_size=p.tensor_model_parallel_size,
                         context_parallel_size=p.context_parallel_size)
    except ValueError as exc:  # a launch that cannot join: say how, in one line
        raise ConfigError(str(exc)) from None
    return ProcessGroups.build(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                               p.context_parallel_size, p.expert_model_parallel_size,
                               p.expert_tensor_parallel_size,
                               timeout_minutes=p.distributed_timeout_minutes)


def pretrain(cfg: Config, log: Callable[[str], None] = print) -> TrainState:
    check_fits_device(cfg)  # before any process group or tensor exists
    pg = setup_process_groups(cfg)
    if pg.rank != 0:
        log = lambda line: None  # noqa: E731 - one rank reports, as Megatron's last rank
    if (restarted := previous_round_report()) is not None:
        log(restarted)
    tokenizer = build_tokenizer_for(cfg)
    vocab = tokenizer.vocab_size if tokenizer is not None else None
    if tokenizer is None:
        raise ConfigError("no tokenizer: give --tokenizer-type with its files (or, with "
                          "--mock-data, --vocab-size)")
    cfg.model.padded_vocab_size = resolve_vocab_size(cfg, vocab)  # known only now
    if pg.world_size == 1:
        return _build_and_train(cfg, tokenizer, vocab, log, pg)
    # A rank that fails tells the others through the rendezvous store, and every rank
    # beats there: a rank whose collectives fail or time out reports the rank that failed,
    # died or was stopped instead of its own error.
    with failures_explained(pg.rank):
        state = _build_and_train(cfg, tokenizer, vocab, log, pg)
        leave_distributed()
    return state


def leave_distributed() -> None:
    """End this process's part in the job, every rank together: a rank that tears its
    process group down (or simply exits) while a peer still talks to it aborts the peer
    ('terminate called without an active exception')."""
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    stop_heartbeat()
    torch.distributed.destroy_process_group()


def _build_and_train(cfg: Config, tokenizer, vocab: int | None, log, pg) -> TrainState:
    # Rank 0 builds (and caches) the sample indices first; the others then read them.
    if pg.rank == 0:
        datasets = build_datasets(cfg, tokenizer)
    if pg.world_size > 1:
        torch.distributed.barrier()
    if pg.rank != 0:
        datasets = build_datasets(cfg, tokenizer)
    # The settings block comes once the cheap refusals (tokenizer, vocabulary, data
    # paths) have had their say: a one-line refusal is not buried under it.
    log(format_config(cfg))
    trainer = Trainer(cfg, datasets, tokenizer_vocab_size=vocab, log=log, pg=pg)
    return trainer.train()
