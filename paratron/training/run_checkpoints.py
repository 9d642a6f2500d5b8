"""`--save` / `--load` for a training run, with Megatron-LM's meanings.

    --load DIR        resume from the newest complete checkpoint in DIR: weights,
                      optimizer and lr schedule (--no-load-optim skips both), RNG states
                      (--no-load-rng), iteration and consumed samples; none in DIR starts
                      from scratch with a warning (--exit-on-missing-checkpoint stops).
    --finetune        weights only; iteration, samples, optimizer and RNG start afresh.
    --save DIR        every --save-interval iterations and at the end; --no-save-optim /
                      --no-save-rng leave those out; --async-save writes in the background.

Both `--ckpt-format torch_dist` and `torch` write `paratron.checkpoint`'s one sharded,
layout-free format. Beside the checkpoints, `DIR/tokenizer/` holds the tokenizer's files
(for conversion and generation) and `DIR/run_config.yaml` the run's settings as a
`--config` file.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from paratron.checkpoint import files
from paratron.checkpoint.files import RUN_CONFIG, TOKENIZER_DIR, TOKENIZER_INFO
from paratron.checkpoint.megatron_folder import megatron_load_problem
from paratron.checkpoint.checkpointing import (PendingSave, load_checkpoint, load_rng_states,
                                               save_checkpoint)
from paratron.cli.args import config_to_yaml
from paratron.config import Config
from paratron.model.identity import (TOKENS, first_difference, flag_fix,
                                     saved_model_config, vocabulary_difference)
from paratron.options import ConfigError
from paratron.training.lr_schedule import LRSchedule

# Files of a tokenizer folder worth keeping (a Hugging Face model folder also holds the
# weights, which are not copied).
_TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json",
                    "added_tokens.json", "*.model", "*.tiktoken", "chat_template*")
# The flag behind each field of the learning-rate schedule.
_SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "warmup_steps": "--lr-warmup-iters",
                   "decay_steps": "--lr-decay-iters", "decay_style": "--lr-decay-style",
                   "init_lr": "--lr-warmup-init", "wsd_decay_steps": "--lr-wsd-decay-iters",
                   "wsd_decay_style": "--lr-wsd-decay-style"}


def find_checkpoint(load_dir: str, *, required: bool, log: Callable[[str], None]):
    """(iteration, path) of the newest complete checkpoint in `load_dir`, or None with
    Megatron's warning (a ConfigError with --exit-on-missing-checkpoint). A Megatron-LM
    checkpoint is refused with the command that converts it, whatever the flags."""
    problem = megatron_load_problem(load_dir)
    if problem:
        raise ConfigError(problem)
    found = files.find_latest_valid(load_dir, log=log)
    if found is not None:
        newer = [i for i in files.interrupted_saves(load_dir) if i > found[0]]
        if newer:
            log(f"WARNING: the save of iteration {newer[-1]} in {load_dir} was interrupted "
                f"(iter_{newer[-1]:07d}.tmp is incomplete); loading the previous checkpoint, "
                f"iteration {found[0]}")
        return found
    broken = files.list_iterations(load_dir)
    if broken:  # corrupt ones were named above; starting afresh would hide the damage
        raise ConfigError(f"--load {load_dir}: no complete checkpoint (iterations "
                          f"{', '.join(map(str, broken[:5]))} are incomplete or corrupt); "
                          f"remove them to start afresh, or give another --load")
    why = "no checkpoint"
    if Path(load_dir, "config.json").is_file() and any(Path(load_dir).glob("*.safetensors")):
        why = ("a Hugging Face model, not a Paratron checkpoint: convert it with `paratron "
               "convert --loader hf --saver paratron`")
    if required:
        raise ConfigError(f"--load {load_dir}: {why}; --exit-on-missing-checkpoint is set")
    log(f"WARNING: --load {load_dir}: {why}; training starts from randomly initialised "
        f"weights")
    return None


def tokenizer_files(cfg: Config) -> list[Path]:
    """The files the run's tokenizer was built from (vocab, merges, model or folder)."""
    d = cfg.data
    out = [Path(f) for f in (d.vocab_file, d.merge_file) if f and Path(f).is_file()]
    if d.tokenizer_model:
        source = Path(d.tokenizer_model)
        if source.is_file():
            out.append(source)
        elif source.is_dir():
            out += sorted({f for pattern in _TOKENIZER_FILES for f in source.glob(pattern)
                           if f.is_file()})
    return out


def save_tokenizer(cfg: Config, save_dir: str) -> None:
    """Copy the tokenizer's files to `<save>/tokenizer/` (once; rank 0) with a small JSON
    saying which tokenizer type reads them."""
    d = cfg.data
    target = Path(save_dir) / TOKENIZER_DIR
    sources = tokenizer_files(cfg)
    if not sources or (target / TOKENIZER_INFO).is_file():
        return
    files.make_dir(target)
    for source in sources:
        files.copy_atomic(source, target / source.name)
    info = {"tokenizer_type": d.tokenizer_type or d.patch_tokenizer_type,
            "vocab_file": Path(d.vocab_file).name if d.vocab_file else None,
            "merge_file": Path(d.merge_file).name if d.merge_file else None,
            "tokenizer_model": (Path(d.tokenizer_model).name if d.tokenizer_model
                                and Path(d.tokenizer_model).is_file() else
                                "." if d.tokenizer_model else None)}
    files.write_atomic(target / TOKENIZER_INFO, json.dumps(info, indent=1))


class RunCheckpoints:
    """Loads a run's model chunks (`DataParallel`s), optimizer and train state from --load
    and saves them to --save; `tokenizer_vocab_size` lets a resume compare vocabularies."""

    def __init__(self, cfg: Config, models: list, optimizer, state, pg, device, *,
                 tokenizer_vocab_size: int | None, log: Callable[[str], None]):
        self.cfg, self.models, self.optimizer, self.state = cfg, models, optimizer, state
        self.pg, self.device, self.log = pg, device, log
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.pending: PendingSave | None = None
        self._rng_from: Path | None = None
        self.last_saved: int | None = None

    # ----------------------------------------------------------------- load
    def load(self) -> None:
        """Weights (and optimizer, train state) from --load; RNG states wait for
        `restore_rng`."""
        c = self.cfg.checkpoint
        if c.load is None:
            return
        found = find_checkpoint(c.load, required=c.exit_on_missing_checkpoint, log=self.log)
        if found is None:
            return
        iteration, path = found
        recorded = files.read_metadata(path).get("config") or {}  # the run that saved it
        self._check_same_model(path, recorded.get("model"))
        load_optim = not (c.no_load_optim or c.finetune)
        try:
            meta = load_checkpoint(path, self.models, self.pg,
                                   self.optimizer if load_optim else None, load_rng=False,
                                   log=self.log)
        except ValueError as error:
            raise ConfigError(f"--load {c.load}: {error}") from None
        if c.finetune:
            self.log(f" loaded weights of iteration {iteration} from {path} (--finetune: "
                     f"training starts at iteration 0)")
            return
        for key, value in meta.get("train_state", {}).items():
            if hasattr(self.state, key):
                setattr(self.state, key, value)
        if not c.no_load_rng:
            self._rng_from = path
        if load_optim:
            self._warn_schedule_change(recorded)
        self.last_saved = self.state.iteration
        self.log(f" successfully loaded checkpoint from {c.load} at iteration {iteration}")

    def _check_same_model(self, path: Path, record) -> None:
        """Refuse a checkpoint of another model (see `paratron.model.identity`): its
        tensors would be loaded by name, skipped or cut, into a model they do not fit.
        The parallel layout and run-only settings may differ; --finetune loads weights
        too, so it is checked alike."""
        c = self.cfg.checkpoint
        if record is None:
            self.log(f"WARNING: {path} records no model configuration; its tensors are "
                     f"loaded by name and shape only")
            return
        try:
            saved = saved_model_config(record)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"--load {c.load}: {path / files.METADATA}: the recorded model "
                              f"configuration is unusable ({error}); give a checkpoint "
                              f"Paratron wrote") from None
        run = self.cfg.model
        found = (first_difference(saved, run)
                 or vocabulary_difference(saved, run, self._run_tokens()))
        if found is None:
            return
        key, there, here = found
        if key == TOKENS:
            raise ConfigError(f"--load {c.load}: the checkpoint's vocabulary covers {there} "
                              f"tokens, this run's tokenizer has {here}; give the tokenizer "
                              f"the checkpoint was trained with")
        fix = flag_fix(key, saved)
        fix += " or --use-checkpoint-args" if fix.startswith("give") else \
            " or give --use-checkpoint-args"
        raise ConfigError(f"--load {c.load}: {path.name} is a checkpoint of another model: "
                          f"{key} is {there} there, {here} here; {fix}")

    def _warn_schedule_change(self, saved: dict) -> None:
        """Say when the resumed run's learning-rate schedule is not the checkpoint's. The
        checkpoint gives the step count, this run's flags the schedule, and
        --lr-decay-iters defaults to --train-iters: asking for a few more iterations
        would otherwise silently stretch (or cut) the decay already under way."""
        optimizer, training = saved.get("optimizer"), saved.get("training")
        if not (isinstance(optimizer, dict) and isinstance(training, dict)):
            return
        try:
            before = LRSchedule.from_config(SimpleNamespace(**optimizer),
                                            training.get("train_iters"))
        except (AttributeError, TypeError):  # an older or foreign record: nothing to compare
            return
        now = self.optimizer.schedule
        changed = [f"{_SCHEDULE_FLAGS[f.name]} {getattr(before, f.name)} there, "
                   f"{getattr(now, f.name)} here" for f in fields(now)
                   if getattr(before, f.name) != getattr(now, f.name)]
        if not changed:
            return
        old_iters, new_iters = training.get("train_iters"), self.cfg.training.train_iters
        cause = (f" (--train-iters is {new_iters} here, {old_iters} there, and "
                 f"--lr-decay-iters defaults to it)" if old_iters != new_iters else "")
        keep = (f"; give --lr-decay-iters {before.decay_steps} to keep the checkpoint's decay"
                if before.decay_steps != now.decay_steps else "")
        self.log(f"WARNING: the learning-rate schedule changes on this resume{cause}: "
                 f"{'; '.join(changed)}{keep}")

    def _run_tokens(self) -> int | None:
        """The tokens this run's vocabulary holds before padding, when known."""
        m = self.cfg.model
        base = self.tokenizer_vocab_size if self.tokenizer_vocab_size is not None else m.vocab_size
        return None if base is None else base + m.extra_vocab_size

    def restore_rng(self) -> None:
        """Restore the loaded checkpoint's RNG states, once the training data iterator
        exists (see the module docstring)."""
        if self._rng_from is not None:
            load_rng_states(self._rng_from, self.models, self.pg, log=self.log)
            self._rng_from = None

    # ----------------------------------------------------------------- save
    def save(self) -> Path | None:
        """Write a checkpoint of the current iteration to --save (None without it)."""
        c = self.cfg.checkpoint
        if c.save is None:
            return None
        self.wait()
        if self.pg.rank == 0:
            try:
                Path(c.save).mkdir(parents=True, exist_ok=True)
                save_tokenizer(self.cfg, c.save)
                files.write_atomic(Path(c.save) / RUN_CONFIG, config_to_yaml(self.cfg))
            except OSError as error:
                raise files.CheckpointError(f"--save {c.save}: cannot write "
                                            f"{error.filename or c.save} ({error.strerror})"
                                            ) from None
        s = self.state
        train_state = {f.name: getattr(s, f.name) for f in fields(s)
                       if f.name not in ("losses", "exit_reason")}
        result = save_checkpoint(c.save, s.iteration, self.models, self.pg,
                                 None if c.no_save_optim else self.optimizer,
                                 config=self.cfg.to_dict(), train_state=train_state,
                                 save_rng=not c.no_save_rng, device=self.device,
                                 background=c.async_save)
        self.last_saved = s.iteration
        if isinstance(result, PendingSave):
            self.pending = result
            self.log(f" saving checkpoint at iteration {s.iteration:7d} to {c.save} in the "
                     f"background")
            return files.checkpoint_dir(c.save, s.iteration)
        self.log(f" successfully saved checkpoint at iteration {s.iteration:7d} to {c.save}")
        return result

    def wait(self) -> None:
        """Complete a background save (collective)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            path = pending.finish()
            self.log(f" successfully saved checkpoint at iteration {pending.iteration:7d} "
                     f"to {path.parent}")
