"""Paratron checkpoints as conversion sources and targets.

Reading takes the newest complete checkpoint of a save folder (or one `iter_NNNNNNN`
folder), verifies every file's size and SHA-256 and checks the tensors against its
config before anything is produced; only weights and persistent buffers travel. Writing
validates the target layout against the model as a run would, pads the vocabulary for
that TP with Megatron's rule and records the sizes; the tensors are logical, so any
layout loads the result.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from paratron.checkpoint import files as ckpt_files
from paratron.checkpoint.checkpointing import TensorReader
from paratron.checkpoint.files import TOKENIZER_DIR
from paratron.checkpoint.megatron_folder import megatron_load_problem
from paratron.checkpoint.state import VOCAB_ROWS, resize_rows
from paratron.checkpoint.writer import LogicalCheckpointWriter
from paratron.config import Config, finalize, pad_vocab_size, validate
from paratron.convert.errors import ConversionError
from paratron.convert.hf_config import transformer_config
from paratron.convert.streaming import (StreamedModel, cast, model_layout, progress,
                                        resize_vocab, staged_output)
from paratron.convert.tokenizer_files import (TokenizerFiles, copy_into, describe,
                                             vocab_size as tokenizer_vocab_size)
from paratron.model.config import UNRECORDED_VALUES, TransformerConfig
from paratron.options import ConfigError

_TRANSFORMER_FIELDS = {f.name for f in dataclasses.fields(TransformerConfig)}


def find_checkpoint(load_dir: str | Path) -> Path:
    """The checkpoint directory `load_dir` names: itself when it holds metadata.json,
    else the iteration `latest_checkpointed_iteration.txt` names, else the newest."""
    load_dir = Path(load_dir)
    problem = megatron_load_problem(load_dir, "--load-dir")
    if problem:
        raise ConversionError(problem)
    if (load_dir / ckpt_files.METADATA).exists():
        return load_dir
    if not load_dir.is_dir():
        raise ConversionError(f"--load-dir {load_dir}: not a folder")
    iteration = ckpt_files.read_latest(load_dir)
    if iteration is None:
        found = ckpt_files.list_iterations(load_dir)
        if not found:
            raise ConversionError(f"--load-dir {load_dir}: no Paratron checkpoint "
                                  f"(no {ckpt_files.LATEST} and no iter_<7-digit iteration> folder)")
        iteration = found[0]
    return ckpt_files.checkpoint_dir(load_dir, iteration)


def checkpoint_tokenizer(path: Path) -> TokenizerFiles | None:
    """The tokenizer a run saved next to its checkpoints (`<save>/tokenizer/`), if any."""
    for folder in (path.parent / TOKENIZER_DIR, path / TOKENIZER_DIR):
        if folder.is_dir():
            found = describe(folder)
            if found is not None:
                return found
    return None


def read_paratron_checkpoint(load_dir: str | Path) -> StreamedModel:
    """A Paratron checkpoint's weights, verified, as a stream of layer groups."""
    path = find_checkpoint(load_dir)
    problems = ckpt_files.verify_checkpoint(path)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ConversionError(f"{problems[0]}{more}; the checkpoint is incomplete or corrupt")
    meta = ckpt_files.read_metadata(path)
    saved = meta.get("config") or {}
    fields = {k: v for k, v in {**UNRECORDED_VALUES, **(saved.get("model") or {})}.items()
              if k in _TRANSFORMER_FIELDS and k not in ("sequence_parallel", "cp_comm_type")}
    if not fields.get("padded_vocab_size"):
        raise ConversionError(f"{path / ckpt_files.METADATA}: the config has no "
                              f"padded_vocab_size; it was not written by a Paratron run")
    config = transformer_config(fields)
    layout = model_layout(config)
    index = meta["tensors"]
    expected = {layout.key(n): list(layout.shape(n)) for g in layout.groups for n in g}
    for key, shape in expected.items():
        entry = index.get(key)
        if entry is None:
            raise ConversionError(f"{path}: no tensor {key}, which its config implies (a "
                                  f"checkpoint of another model?)")
        if entry["shape"] != shape:
            raise ConversionError(f"{path}: {key} has shape {entry['shape']}, its config "
                                  f"implies {shape} (a checkpoint of another model?)")
    extra = sorted(k for k in index if k.startswith(("model/", "buffer/")) and k not in expected)
    if extra:
        raise ConversionError(f"{path}: tensor {extra[0]} is not part of the model its config "
                              f"describes ({len(extra)} such tensors)")

    tokenizer = checkpoint_tokenizer(path)
    if config.vocab_size:
        vocab = config.vocab_size + config.extra_vocab_size
    elif tokenizer is not None and (n := tokenizer_vocab_size(tokenizer)):
        vocab = n + config.extra_vocab_size
    else:
        vocab = config.padded_vocab_size
    vocab = min(vocab, config.padded_vocab_size)

    def groups():
        read = TensorReader(path, meta)
        for names in layout.groups:
            yield {layout.key(n): read(layout.key(n)) for n in names}

    notes = ["optimizer state is not converted"] if meta.get("optimizer") else []
    return StreamedModel(config=config, vocab_size=vocab, groups=groups,
                         num_groups=len(layout.groups), source=str(path),
                         tokenizer=tokenizer,
                         saved_config=saved, notes=notes)


@dataclasses.dataclass(frozen=True)
class TargetLayout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    make_vocab_size_divisible_by: int = 128
    first_stage_layers: int | None = None  # an uneven pipeline split (DeepSeek: 6 at PP4)


_TARGET_FLAGS = {"--tensor-model-parallel-size": "--target-tensor-parallel-size",
                 "--pipeline-model-parallel-size": "--target-pipeline-parallel-size",
                 "--expert-model-parallel-size": "--target-expert-parallel-size",
                 "--decoder-first-pipeline-num-layers":
                     "--target-decoder-first-pipeline-num-layers"}


def target_config(model: TransformerConfig, target: TargetLayout, vocab_size: int) -> Config:
    """A run config holding `model` at the target layout, vocabulary padded for its TP,
    validated as a training run with these sizes would be."""
    cfg = Config()
    cfg.model = dataclasses.replace(
        model, vocab_size=vocab_size, extra_vocab_size=0,
        make_vocab_size_divisible_by=target.make_vocab_size_divisible_by,
        padded_vocab_size=pad_vocab_size(vocab_size, target.make_vocab_size_divisible_by,
                                         target.tp))
    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = target.tp, target.pp
    p.expert_model_parallel_size = target.ep
    p.decoder_first_pipeline_num_layers = target.first_stage_layers
    cfg.data.seq_length = model.max_position_embeddings
    probe = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model),
                                parallel=dataclasses.replace(p, world_size=target.tp * target.pp
                                                             * target.ep),
                                training=dataclasses.replace(cfg.training, train_iters=1),
                                optimizer=dataclasses.replace(cfg.optimizer, lr=1e-4))
    finalize(probe, probe.parallel.world_size)
    try:
        validate(probe)
    except ConfigError as exc:
        message = str(exc)
        for flag, target_flag in _TARGET_FLAGS.items():
            message = message.replace(flag, target_flag)
        raise ConversionError(f"the target layout does not fit the model: {message}") from None
    finalize(cfg, 1)
    return cfg


def save_paratron_checkpoint(model: StreamedModel, save_dir: str | Path, target: TargetLayout,
                             dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a Paratron checkpoint (iteration 0) at `save_dir`, crash-safely."""
    cfg = target_config(model.config, target, model.vocab_size)
    rows = cfg.model.padded_vocab_size
    if dtype is not None:
        t = cfg.training
        t.bf16, t.fp16, t.fp64 = (dtype == d for d in (torch.bfloat16, torch.float16,
                                                        torch.float64))
    final = Path(save_dir).resolve()
    if model.tokenizer is not None:
        cfg.data.tokenizer_type = model.tokenizer.tokenizer_type
        if model.tokenizer.kind == "gpt2":
            cfg.data.vocab_file = str(final / TOKENIZER_DIR / "vocab.json")
            cfg.data.merge_file = str(final / TOKENIZER_DIR / "merges.txt")
        else:
            cfg.data.tokenizer_model = str(final / TOKENIZER_DIR)
    saved = cfg.to_dict()
    if model.saved_config:  # a Paratron run's config: keep its settings, new model/layout
        saved = {**model.saved_config, "model": saved["model"],
                 "parallel": {**model.saved_config.get("parallel", {}),
                              **{k: saved["parallel"][k] for k in (
                                  "tensor_model_parallel_size", "pipeline_model_parallel_size",
                                  "expert_model_parallel_size")}}}
    carry = model.optimizer
    if carry is not None:  # a Megatron run continues: its optimizer settings and progress
        for section, values in carry.settings.items():
            saved[section] = {**saved.get(section, {}), **values}
    with staged_output(save_dir) as tmp:
        writer = LogicalCheckpointWriter(tmp, iteration=carry.iteration if carry else 0)
        with progress(model.num_groups, "writing Paratron checkpoint") as bar:
            for group in model.groups():
                tensors = cast(resize_vocab(group, rows), dtype)
                if carry is not None:
                    tensors.update(_optimizer_tensors(carry, group, tensors, rows))
                writer.add(tensors)
                bar.update()
        if model.tokenizer is not None:
            copy_into(model.tokenizer, tmp / TOKENIZER_DIR)
        if carry is None:
            writer.finish(config=saved)
        else:
            writer.finish(config=saved, train_state=carry.train_state,
                          optimizer=carry.optimizer)
    return final


def _optimizer_tensors(carry, stored: dict, weights: dict, rows: int) -> dict:
    """A layer group's optimizer tensors in Paratron's keys: fp32 main weights only when
    the saved weights are not fp32 (as a run saves them), vocabulary rows as the weights'."""
    names = [key.split("/", 1)[1] for key in stored if key.startswith("model/")]
    out = {}
    for key, t in carry.tensors(names, stored).items():
        name = key.split("/", 2)[2]
        if key.startswith("optim/main/") and weights[f"model/{name}"].dtype == torch.float32:
            continue
        out[key] = resize_rows(t, rows) if name.endswith(VOCAB_ROWS) else t
    return out

