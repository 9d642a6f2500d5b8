"""Models and tokenizers to generate with: from a Paratron checkpoint directory, or a
whole single-process model (a Hugging Face folder loaded by `paratron.convert`) split
over a tensor-parallel group.

A checkpoint records the run's `Config.to_dict()`; the model is rebuilt from it with
this process layout (tensor parallelism only, no sequence parallelism: a step has one
token per row) and its weights are resharded from the logical tensors, whatever layout
wrote them. The vocabulary padding is read from the stored embedding, since it depended
on the training run's TP size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from paratron.checkpoint import find_latest_valid, load_checkpoint, read_metadata
from paratron.checkpoint.files import TOKENIZER_DIR, read_tokenizer_info
from paratron.checkpoint.megatron_folder import megatron_load_problem
from paratron.checkpoint.state import load_model
from paratron.config import Config, config_from_dict, recorded_settings
from paratron.data.errors import DataError
from paratron.data.tokenizer import Tokenizer, build_tokenizer
from paratron.model.gpt import GPTModel

EMBEDDING = "model/embedding.word_embeddings.weight"
# Generation runs eagerly: a compiled layer would recompile as the cached length grows.
_GENERATION_SETTINGS = {"torch_compile": False, "rampup_batch_size": None}


def find_checkpoint(load_dir: str | os.PathLike, log: Callable[[str], None] = print
                    ) -> tuple[int, Path]:
    """(iteration, path) of the newest complete checkpoint in `load_dir`, or a
    one-line ValueError saying what the directory is instead."""
    folder = Path(load_dir)
    if not folder.is_dir():
        raise ValueError(f"--load {load_dir}: no such directory")
    problem = megatron_load_problem(folder)
    if problem:
        raise ValueError(problem)
    found = find_latest_valid(folder, log=log)
    if found is not None:
        return found
    if (folder / "config.json").is_file():
        raise ValueError(f"--load {load_dir}: a Hugging Face folder, not a Paratron "
                         f"checkpoint; pass it with --hf")
    raise ValueError(f"--load {load_dir}: no complete checkpoint (iter_<iteration>/ with "
                     f"metadata.json) in it")


def config_for_generation(saved: dict, tp: int, padded_vocab_size: int | None) -> Config:
    """The run's Config from its `to_dict()`, laid out for generation at TP `tp`. Only
    the model is checked: a checkpoint written by `paratron convert` records no
    iterations or learning rate, and generation needs none."""
    flat = recorded_settings(saved, "the checkpoint")
    flat.update({k: v for k, v in _GENERATION_SETTINGS.items() if k in flat})
    flat.update(tensor_model_parallel_size=tp, world_size=tp)
    if padded_vocab_size is not None:
        flat["padded_vocab_size"] = padded_vocab_size
    return config_from_dict(flat, training=False)


def load_paratron_model(load_dir: str | os.PathLike, pg, *,
                        log: Callable[[str], None] = print) -> tuple[Config, GPTModel, int]:
    """(config, model in eval mode on the CPU in fp32, iteration) from the newest
    complete checkpoint in `load_dir`, this rank's TP shard."""
    iteration, path = find_checkpoint(load_dir, log=log)
    meta = read_metadata(path)
    if not meta.get("config"):
        raise ValueError(f"{path}: the checkpoint records no configuration to rebuild "
                         f"the model from")
    embedding = meta.get("tensors", {}).get(EMBEDDING)
    cfg = config_for_generation(meta["config"], pg.tp.size,
                                embedding["shape"][0] if embedding else None)
    model = GPTModel(cfg.model, pg)
    load_checkpoint(path, [model], pg, load_optim=False, load_rng=False, log=log)
    return cfg, model.eval(), iteration


def shard_model(full: GPTModel, pg) -> GPTModel:
    """This rank's tensor-parallel part of a whole single-process model (same config)."""
    if pg.tp.size == 1:
        return full
    model = GPTModel(full.config, pg)
    state = full.state_dict()
    # Logical names are "model/<global name>" and "buffer/<name>"; a single-stage
    # model's own names are already the global ones.
    load_model([model], pg, lambda logical: state[logical.split("/", 1)[1]])
    return model.eval()


def checkpoint_tokenizer(load_dir: str | os.PathLike, cfg: Config) -> Tokenizer:
    """The tokenizer the run used: its files copied to `<load>/tokenizer/`, else the
    paths the run's config names (NullTokenizer for --mock-data with --vocab-size)."""
    folder = Path(load_dir) / TOKENIZER_DIR
    try:
        info = read_tokenizer_info(folder)
    except ValueError as error:
        raise DataError(str(error)) from None
    if info is not None:
        def local(path):
            return None if path is None else str(path)
        return build_tokenizer(info["tokenizer_type"], vocab_file=local(info["vocab_file"]),
                               merge_file=local(info["merge_file"]),
                               tokenizer_model=local(info["tokenizer_model"]),
                               vocab_size=cfg.model.vocab_size)
    d = cfg.data
    kind = d.tokenizer_type or d.patch_tokenizer_type
    if kind is None and d.mock_data and cfg.model.vocab_size is not None:
        kind = "NullTokenizer"
    if kind is None:
        raise DataError(f"--load {load_dir}: the run's config names no tokenizer and "
                        f"{folder} holds none; give --tokenizer-type with its files")
    return build_tokenizer(kind, vocab_file=d.vocab_file, merge_file=d.merge_file,
                           tokenizer_model=d.tokenizer_model, vocab_size=cfg.model.vocab_size)
