"""The training loop, with Megatron-LM's semantics and log line.

One iteration: take this rank's micro-batches of the next global batch, count the
loss tokens of the whole global batch, run them through the pipeline stage (forward +
backward per micro-batch into fp32 gradient buffers), finish the gradients, then one
optimizer step and the MoE layers' bookkeeping. Loss sums and token counts stay on the
device: the host reads them with the optimizer's statistics, its one wait for the device
in an iteration. Evaluation runs `--eval-iters` global batches forward-only every
`--eval-interval` iterations.

A checkpoint due at an iteration is written before that iteration's evaluation (and the
last one before the final evaluation, as Megatron does): an evaluation that fails costs
no training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from paratron.config import Config, resolve_vocab_size
from paratron.data.sampler import build_pretraining_data_loader
from paratron.model.gpt import (GPTModel, logged_moe_losses, moe_bookkeeping,
                                 moe_loss_sums)
from paratron.model.mtp import logged_mtp_losses, mtp_loss_sums, set_mtp_backward_scale
from paratron.options import ConfigError
from paratron.parallel.config import rank_chunks
from paratron.parallel.context_parallel import split_for_context_parallel
from paratron.parallel.data_parallel import DataParallel
from paratron.parallel.pipeline import Stage, StageIO
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.schedule_check import refuse_unsafe_schedule
from paratron.parallel.random import seed_everything
from paratron.training.exit_conditions import ExitConditions
from paratron.training.faults import (NonFiniteError, non_finite_gradients,
                                      non_finite_message)
from paratron.training.flops import flops_per_iteration
from paratron.training.loss_scaler import DynamicLossScaler, build_loss_scaler
from paratron.training.lr_schedule import LRSchedule
from paratron.training.metrics import TrainingMetrics
from paratron.training.moe_logging import count_expert_load, layer_expert_load
from paratron.training.optimizer import MixedPrecisionOptimizer
from paratron.training.run_checkpoints import RunCheckpoints
from paratron.training.run_lock import hold_save_folder


def select_device(choice: str) -> torch.device:
    """CUDA when present (one GPU per local rank), else the CPU; `cpu` forces the CPU."""
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; use --device cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# CPUs multiply float16 matrices without vector units: measured 35-140x slower than
# bfloat16, which CPUs with AVX-512/AMX multiply natively.
FP16_ON_CPU = ("WARNING: --fp16 on a CPU: float16 matrix multiplies have no fast CPU kernels, "
               "so each iteration runs tens of times slower than with --bf16 (same memory, "
               "no loss scaling needed); use --bf16 on a CPU")


def params_dtype(training_config) -> torch.dtype:
    if training_config.bf16:
        return torch.bfloat16
    if training_config.fp16:
        return torch.float16
    if training_config.fp64:
        return torch.float64
    return torch.float32


def build_models(cfg: Config, pg: ProcessGroups, chunks, device, dtype) -> list[DataParallel]:
    """This rank's model chunks in `dtype` on `device`, wrapped in `DataParallel`: the
    trainer's model and, built on the meta device, the memory plan's."""
    p = cfg.parallel
    return [DataParallel(GPTModel(cfg.model, pg, pre_process=chunk.is_first,
                                  post_process=chunk.is_last, layer_numbers=chunk.layers,
                                  init_seed=cfg.training.seed).to(device=device, dtype=dtype),
                         pg, bucket_size=p.ddp_bucket_size,
                         overlap_grad_reduce=p.overlap_grad_reduce,
                         use_distributed_optimizer=p.use_distributed_optimizer,
                         overlap_param_gather=p.overlap_param_gather)
            for chunk in chunks]


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0
    losses: list[float] = field(default_factory=list)
    exit_reason: str | None = None  # why the run stopped early (signal, interval, time)


class Trainer:
    """Owns the model, optimizer and data of one run."""

    def __init__(self, cfg: Config, datasets: tuple, *, tokenizer_vocab_size: int | None = None,
                 log: Callable[[str], None] = print, pg: ProcessGroups | None = None):
        self.cfg, self.log = cfg, log
        self.pg = pg or ProcessGroups.single()
        self.device = select_device(cfg.training.device)
        # One run per --save folder, locked before anything is written there.
        self.save_lock = hold_save_folder(cfg.checkpoint.save, self.pg)
        try:
            self._build(datasets, tokenizer_vocab_size)
        except BaseException:
            self.release_save_folder()
            raise

    def _build(self, datasets: tuple, tokenizer_vocab_size: int | None) -> None:
        """The model chunks, optimizer, data and metrics, then the state from --load."""
        cfg, log = self.cfg, self.log
        self.dtype = params_dtype(cfg.training)
        if self.dtype == torch.float16 and self.device.type == "cpu":
            log(FP16_ON_CPU)
        cfg.model.padded_vocab_size = resolve_vocab_size(cfg, tokenizer_vocab_size)
        seed_everything(cfg.training.seed, self.pg, self.device)
        p, t = cfg.parallel, cfg.training
        chunks = rank_chunks(cfg, self.pg.pp.rank)
        self.models = build_models(cfg, self.pg, chunks, self.device, self.dtype)
        self.model = self.models[0]
        self.optimizer = MixedPrecisionOptimizer(
            self.models, cfg.optimizer, LRSchedule.from_config(cfg.optimizer, t.train_iters),
            build_loss_scaler(t))
        self.train_ds, self.valid_ds, self.test_ds = datasets
        self.state = TrainState()
        self._valid_iter = None
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.pg.dp.size)
        self.flops = flops_per_iteration(cfg.model, cfg.data.seq_length, t.global_batch_size)
        self.metrics = TrainingMetrics(cfg, self.pg, self.device, self.dtype, self.optimizer,
                                       self.flops, log)
        self.timers = self.metrics.timers
        sequence = (cfg.data.seq_length // self.pg.cp.size
                    // (self.pg.tp.size if p.sequence_parallel else 1))
        self.stage = Stage(self.models, chunks, self.pg, StageIO(
            (sequence, t.micro_batch_size, cfg.model.hidden_size), self.dtype, self.device),
            self.timers)
        refuse_unsafe_schedule(self.pg, len(chunks), self.num_microbatches)
        # fp16's dynamic loss scaling expects overflows: it skips and counts them.
        self.stop_on_non_finite = (t.check_for_nan_in_loss_and_grad and not
                                   isinstance(self.optimizer.loss_scaler, DynamicLossScaler))
        self.checkpoints = RunCheckpoints(cfg, self.models, self.optimizer, self.state, self.pg,
                                          self.device, tokenizer_vocab_size=tokenizer_vocab_size,
                                          log=log)
        self.checkpoints.load()
        self.checkpoints.restore_rng()
        self._train_iter = None  # made at the first step, from the state as it is then
        # The last step's MoE and MTP losses, as Megatron logs them.
        self.moe_losses: dict[str, float] = {}
        self._moe_bookkeeping(stepped=False)  # the first step's aux-loss scale

    # ----------------------------------------------------------------- data
    def _loader(self, dataset, consumed_samples: int, wrap_around: bool = False):
        """This rank's micro-batches from `consumed_samples` on (Megatron's sampler: each
        micro-batch step takes micro x DP consecutive samples, rank r keeps its slice,
        so samples do not depend on the layout and a resumed run continues exactly).
        `wrap_around`: start again at the first sample after the last (validation)."""
        loader = build_pretraining_data_loader(
            dataset, consumed_samples, self.cfg.training.micro_batch_size, self.pg.dp.rank,
            self.pg.dp.size, num_workers=self.cfg.data.num_workers,
            dataloader_type=self.cfg.data.dataloader_type, wrap_around=wrap_around,
            pin_memory=self.device.type == "cuda")
        return iter(loader) if loader is not None else None

    def _global_batch(self, iterator) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global batch, on the device; under
        context parallelism its two chunks of each sequence (load-balanced layout). On
        CUDA the copies leave pinned memory without blocking: the host goes on queueing."""
        cp, rank = self.pg.cp.size, self.pg.cp.rank
        return [{k: split_for_context_parallel(v.to(self.device, non_blocking=True), cp, rank,
                                               seq_dim=1)
                 for k, v in next(iterator).items()}
                for _ in range(self.num_microbatches)]

    def _total_tokens(self, batches) -> torch.Tensor:
        """Loss tokens of the whole global batch, over every micro-batch and DP rank (at
        least one), as a device scalar: nothing waits for it."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in batches:
            total = total + batch["loss_mask"].sum()
        return self.pg.all_reduce(total, "dp", "cp").clamp(min=1.0)

    def _forward_backward(self, batches, scale: torch.Tensor | float, forward_only: bool
                          ) -> torch.Tensor:
        """Run the stage over this rank's micro-batches, the loss of each scaled by `scale`
        for its backward; returns [loss sum, loss tokens] of the whole global batch (summed
        over PP and DP) on the device, float64, accumulated without reading anything."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)

        def loss_fn(batch, per_token_loss):
            nonlocal totals
            mask = batch["loss_mask"].float()
            loss_sum = (per_token_loss.float() * mask).sum()
            totals = totals + torch.stack([loss_sum.detach(), mask.sum()])
            return loss_sum * scale

        self.stage.forward_backward(batches, loss_fn, forward_only=forward_only)
        return self.pg.all_reduce(totals, "pp", "dp", "cp")

    def _moe_bookkeeping(self, stepped: bool) -> None:
        """The MoE layers' part of a step; their aux losses (and the MTP losses) get their
        gradient scaled like the lm loss: mean over the micro-batches and data-parallel
        ranks of the step.
        Under --moe-per-layer-logging the layers count their expert load (on the device;
        read at log steps)."""
        scale = self.optimizer.loss_scaler.scale / (self.num_microbatches * self.pg.dp.size)
        moe_bookkeeping([model.module for model in self.models], self.pg, scale, stepped)
        set_mtp_backward_scale([model.module for model in self.models], scale)
        if self.cfg.logging.moe_per_layer_logging:
            count_expert_load(self.models)

    # ----------------------------------------------------------------- steps
    def _counts_zeros(self) -> bool:
        """Zero gradients are counted for the log line only: at a log step, when asked."""
        return (self.cfg.logging.log_num_zeros_in_grad
                and self.metrics.is_log_step(self.state.iteration + 1))

    def train_step(self) -> tuple[float, bool, float | None, int | None]:
        """One optimizer step; returns (lm loss, stepped, grad norm, zeros in grad)."""
        if self._train_iter is None:
            self._train_iter = self._loader(self.train_ds, self.state.consumed_train_samples)
        with self.timers("batch-generator"):
            batches = self._global_batch(self._train_iter)
        total_tokens = self._total_tokens(batches)
        # loss scale / tokens in float64, then fp32 for the fp32 loss sums, as a Python
        # number would be (a plain `float / tensor` multiplies by the reciprocal instead).
        scale = torch.full((), self.optimizer.loss_scaler.scale, dtype=torch.float64,
                           device=self.device) / total_tokens
        with self.timers("forward-backward"):
            totals = self._forward_backward(batches, scale.float(), forward_only=False)
        self.stage.finish_gradients()
        moe_sums = moe_loss_sums([model.module for model in self.models], self.pg)
        mtp_sums = mtp_loss_sums([model.module for model in self.models], self.pg)
        # The step's one wait for the device: the optimizer reads its statistics with the
        # lm and MoE losses, once every micro-batch is queued and before the update is.
        with self.timers("optimizer"):
            report = self.optimizer.step(
                also_read=torch.cat([(totals[0] / total_tokens).reshape(1), moe_sums,
                                     mtp_sums]),
                count_zeros=self._counts_zeros())
        loss, *sums = report.also_read
        names = logged_moe_losses(self.cfg.model) + logged_mtp_losses(self.cfg.model)
        self.moe_losses = {name: sums[2 * i] / max(sums[2 * i + 1], 1.0)
                           for i, name in enumerate(names)}
        self._moe_bookkeeping(report.stepped)
        self.state.consumed_train_samples += self.cfg.training.global_batch_size
        return loss, report.stepped, report.grad_norm, report.num_zeros

    @torch.no_grad()
    def evaluate(self, iterator) -> float:
        """Mean per-token loss over the next --eval-iters global batches of `iterator`."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        iters = self.cfg.training.eval_iters
        for _ in self.metrics.progress(range(iters), iters, "evaluating"):
            totals = totals + self._forward_backward(
                self._global_batch(iterator), self.optimizer.loss_scaler.scale,
                forward_only=True)
        loss_sum, tokens = totals.tolist()
        return loss_sum / max(tokens, 1.0)

    def run_validation(self, prefix: str, before: Callable[[], object] | None = None
                       ) -> float | None:
        """Loss over the next --eval-iters validation batches (None without validation).

        `before` (a save) runs once those samples are counted as consumed and before they
        are read: its checkpoint resumes after them, exactly as if it had been written
        after the evaluation, and an evaluation that fails does not lose it. The samples
        are read on from the consumed count, wrapping around the split, so a run resumed
        with other evaluation settings than the checkpoint's always has samples to read."""
        t = self.cfg.training
        if self.valid_ds is None or len(self.valid_ds) == 0 or t.eval_iters == 0:
            if before is not None:
                before()
            return None
        if self._valid_iter is None:
            self._valid_iter = self._loader(self.valid_ds, self.state.consumed_valid_samples,
                                            wrap_around=True)
        self.state.consumed_valid_samples += t.eval_iters * t.global_batch_size
        if before is not None:
            before()
        with self.metrics.evaluating():
            loss = self.evaluate(self._valid_iter)
        self.metrics.report_validation(prefix, loss, self.state)
        return loss

    def release_save_folder(self) -> None:
        """Let another run write to --save (at the end of `train`, or when building failed)."""
        if self.save_lock is not None:
            self.save_lock.release()

    # ----------------------------------------------------------------- loop
    def train(self) -> TrainState:
        try:
            return self._train()
        finally:
            self.release_save_folder()

    def _train(self) -> TrainState:
        finished = False
        try:
            if self._nothing_to_do():
                return self.state
            with ExitConditions(self.cfg.training, self.pg.world_size, self.device) as exits:
                self._train_loop(exits)
            if self.state.iteration != self.checkpoints.last_saved and self.state.iteration > 0:
                self.checkpoints.save()
            self.checkpoints.wait()
            if self.state.exit_reason is None:
                self._final_evaluation()
            finished = True
        finally:
            self.metrics.close(self.state, finished)
        return self.state

    def _nothing_to_do(self) -> bool:
        """A run resumed from a checkpoint at or past --train-iters says so and stops:
        rerunning a finished run's command must not evaluate or save again."""
        iteration, wanted = self.state.iteration, self.cfg.training.train_iters
        if iteration == 0 or iteration < wanted:
            return False
        self.log(f" nothing to do: the checkpoint loaded from {self.cfg.checkpoint.load} is "
                 f"at iteration {iteration} and --train-iters is {wanted}; give a larger "
                 f"--train-iters to train further")
        return True

    def _train_loop(self, exits: ExitConditions) -> None:
        t = self.cfg.training
        self.metrics.start()
        while self.state.iteration < t.train_iters:
            loss, stepped, grad_norm, num_zeros = self.train_step()
            if self.stop_on_non_finite and not (stepped and math.isfinite(loss)):
                self._stop_on_non_finite(loss)
            self.state.iteration += 1
            if not stepped:
                self.state.skipped_iterations += 1
            if not math.isfinite(loss):
                self.state.nan_iterations += 1
            self.state.losses.append(loss)
            expert_load = (layer_expert_load(self.models, self.pg)
                           if self.cfg.logging.moe_per_layer_logging
                           and self.metrics.is_log_step(self.state.iteration) else None)
            self.metrics.step(self.state, loss, stepped, grad_norm, num_zeros, self.moe_losses,
                              expert_load)
            self._evaluate_and_save()
            reason = exits.reason(self.state.iteration)
            if reason is not None:
                self.state.exit_reason = reason
                self.log(f" exiting program at iteration {self.state.iteration}: {reason}")
                return

    def _evaluate_and_save(self) -> None:
        """This iteration's evaluation and checkpoint, each when its interval is due (the
        last iteration's checkpoint is always due); the checkpoint is written first (see
        `run_validation`)."""
        t, it = self.cfg.training, self.state.iteration
        every, save_interval = t.eval_interval, self.cfg.checkpoint.save_interval
        due = (bool(save_interval) and it % save_interval == 0) or it == t.train_iters
        save = self._save_between_iterations if due else None
        if every and it % every == 0:
            self.run_validation(f"iteration {it}", before=save)
        elif save is not None:
            save()

    def _save_between_iterations(self) -> None:
        with self.metrics.paused():
            self.checkpoints.save()

    def _stop_on_non_finite(self, loss: float) -> None:
        """A NaN/Inf loss or gradient (not fp16 overflow): save what was trained so far,
        then stop with a line naming the iteration and the value. Every rank gets here
        at once: the loss and the gradient norm are global. The checkpoint holds the
        weights before the bad step; a run resumed from it goes on with the next batch."""
        gradients = [] if not math.isfinite(loss) else non_finite_gradients(self.optimizer,
                                                                            self.models)
        saved = self.checkpoints.save()
        self.checkpoints.wait()
        raise NonFiniteError(non_finite_message(self.state.iteration + 1, loss, gradients,
                                                self.cfg.checkpoint.save if saved else None))

    def _final_evaluation(self) -> None:
        t = self.cfg.training
        if t.eval_interval and self.state.iteration % t.eval_interval != 0:
            self.run_validation(f"iteration {self.state.iteration} on validation set")
        if self.test_ds is not None and len(self.test_ds) and t.eval_iters:
            with self.metrics.evaluating():
                loss = self.evaluate(self._loader(self.test_ds, 0))
            self.metrics.report_validation(f"iteration {self.state.iteration} on test set",
                                           loss, self.state, split="test")
