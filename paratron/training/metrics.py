"""Everything the training loop reports, behind one object the trainer calls.

`TrainingMetrics` keeps each interval's sums, warns on loss spikes, writes per-iteration
scalars, and at each `--log-interval` prints Megatron's log line (with throughput under
`--log-throughput`), the memory line once, the timers block and the straggler report; the
first iteration gets a short line of its own, so a slow start never looks like a hang.
As in Megatron the last rank writes TensorBoard, W&B, `--metrics-jsonl` and the
performance summary, and console lines go through `log`, given to one rank. Every rank
must call `step` and `report_validation` in the same order: the timers and straggler
report gather one small tensor per interval over all ranks.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterable

import torch

from paratron.config import Config
from paratron.parallel.config import virtual_stages
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.faults import LossSpikeDetector, straggler_line
from paratron.training.hardware import (MEMORY_TAGS, device_name, memory_line, memory_stats,
                                        mfu, peak_tflops)
from paratron.training.moe_logging import (ExpertLoad, expert_load_scalars,
                                           format_expert_load)
from paratron.training.timers import (TIMER_LEVELS, Timers, format_min_max, gather_over_ranks,
                                      min_max)
from paratron.training.writers import (JsonlWriter, ScalarWriters, TensorBoardWriter,
                                       WandbWriter, write_json_atomically)

# Evaluations of at least this many iterations show a progress bar (on a terminal).
EVAL_PROGRESS_MIN_ITERS = 20
# The timers of one iteration (evaluation is reported on its own) and the ones that
# measure a rank's own work, which the straggler report compares.
ITERATION_TIMERS = [name for name in TIMER_LEVELS if name != "evaluate"]
OWN_WORK_TIMERS = ("batch-generator", "forward-compute")


@dataclass
class _Interval:
    """Sums over the iterations since the last log line."""

    iterations: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    moe: dict[str, list[float]] = field(default_factory=dict)
    skipped: int = 0
    nan: int = 0
    grad_norm: float | None = None
    num_zeros: int | None = None


def params_norm(optimizer) -> float:
    """L2 norm of all weights, each element counted once over TP, PP, DP shards and
    experts: the optimizer's fp32 main weights summed as its gradient norm is."""
    stats = {}
    for expert in (False, True):
        total = torch.zeros(2, dtype=torch.float64, device=optimizer.segments[0].main.device)
        for s in optimizer.segments:
            if s.expert == expert:
                w = s.main if s.duplicate is None else s.main.masked_fill(s.duplicate, 0.0)
                total[0] += w.double().square().sum()
        stats[expert] = total
    return math.sqrt(float(optimizer._global_sum(stats[False], stats[True])[0]))


class TrainingMetrics:
    def __init__(self, cfg: Config, pg: ProcessGroups, device: torch.device,
                 dtype: torch.dtype, optimizer, flops_per_iteration: float,
                 log: Callable[[str], None] = print):
        lg, t = cfg.logging, cfg.training
        self.cfg, self.pg, self.device, self.dtype = cfg, pg, device, dtype
        self.optimizer, self.flops, self.log = optimizer, flops_per_iteration, log
        self.timers = Timers(lg.timing_log_level, device, pg.world_size)
        self.peak = peak_tflops(device, dtype, lg.peak_tflops)
        self.writes = pg.rank == pg.world_size - 1  # Megatron's writing rank
        sinks = []
        if self.writes and lg.tensorboard_dir:
            sinks.append(TensorBoardWriter(lg.tensorboard_dir))
        if self.writes and lg.wandb_project:
            save_dir = lg.wandb_save_dir or (f"{cfg.checkpoint.save}/wandb"
                                             if cfg.checkpoint.save else None)
            sinks.append(WandbWriter(lg.wandb_project, lg.wandb_exp_name, save_dir,
                                     cfg.to_dict()))
        self.writers = ScalarWriters(sinks)
        self.jsonl = JsonlWriter(lg.metrics_jsonl) if self.writes and lg.metrics_jsonl else None
        self.spikes = LossSpikeDetector(t.loss_spike_factor)
        self.interval = _Interval()
        self.iteration_seconds: list[float] = []
        self.last_loss: float | None = None
        self._mark: float | None = None  # end of the last iteration; None while paused
        self._memory_reported = False

    # ------------------------------------------------------------ the clock
    def start(self) -> None:
        """Start timing iterations (at the top of the training loop)."""
        self._mark = time.perf_counter()

    @contextmanager
    def paused(self):
        """Work between iterations (evaluation, saving) stays out of the iterations' time."""
        running = self._mark is not None
        self._mark = None
        try:
            yield
        finally:
            if running:
                self._mark = time.perf_counter()

    @contextmanager
    def evaluating(self):
        """Evaluation counts in the 'evaluate' timer only: neither in the iterations'
        time nor in the per-iteration timers its forward passes touch."""
        kept = self.timers.snapshot()
        with self.paused(), self.timers("evaluate"):
            yield
        self.timers.restore(kept, keep=("evaluate",))

    def progress(self, iterable: Iterable, total: int, what: str) -> Iterable:
        """A progress bar on stderr for long evaluations (console rank, terminals only)."""
        if total < EVAL_PROGRESS_MIN_ITERS or self.pg.rank != 0:
            return iterable
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=what, unit="batch", file=sys.stderr,
                    disable=None, leave=False, dynamic_ncols=True)

    # ------------------------------------------------------------ iterations
    def step(self, state, loss: float, stepped: bool, grad_norm: float | None,
             num_zeros: int | None, moe_losses: dict[str, float],
             expert_load: list[ExpertLoad] | None = None) -> None:
        """Account one finished iteration (`state.iteration` already counts it);
        `expert_load`, at log steps under --moe-per-layer-logging, holds the interval's
        per-layer counts (`paratron.training.moe_logging`)."""
        now = time.perf_counter()
        seconds = now - self._mark if self._mark is not None else 0.0
        self._mark = now
        self.iteration_seconds.append(seconds)
        iv = self.interval
        iv.iterations += 1
        iv.seconds += seconds
        if stepped:
            iv.losses.append(loss)
            for name, value in moe_losses.items():
                iv.moe.setdefault(name, []).append(value)
            iv.grad_norm, iv.num_zeros = grad_norm, num_zeros
        else:
            iv.skipped += 1
        if not math.isfinite(loss):
            iv.nan += 1
        else:
            self.last_loss = loss
        warning = self.spikes.check(state.iteration, loss)
        if warning:
            self.log(warning)
        self._write_step(state, loss if math.isfinite(loss) else None, stepped, grad_norm,
                         num_zeros, moe_losses)
        if self.is_log_step(state.iteration):
            self._report_interval(state, expert_load or [])
        elif len(self.iteration_seconds) == 1:
            self.log(self._first_line(state, seconds, loss))

    def is_log_step(self, iteration: int) -> bool:
        """Whether `iteration` prints Megatron's log line (the only steps that count zero
        gradients)."""
        return iteration % self.cfg.logging.log_interval == 0

    def _first_line(self, state, seconds: float, loss: float) -> str:
        """The first iteration's sign of life: its time, its loss and when the next line
        comes. Console only: the interval's sums, timers and writers are left alone, and
        it does not read as Megatron's log line, which log parsers count."""
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        interval = self.cfg.logging.log_interval
        upcoming = (state.iteration // interval + 1) * interval
        return (f" [{stamp}] first iteration done: iteration {state.iteration}/"
                f"{self.cfg.training.train_iters} took {seconds:.1f} s (loss {loss:.4f}); "
                f"next log line at iteration {upcoming} (--log-interval {interval})")

    def _write_step(self, state, loss, stepped, grad_norm, num_zeros, moe_losses) -> None:
        """Megatron's per-iteration TensorBoard / W&B scalars."""
        if not self.writers:
            return
        w, it, samples = self.writers, state.iteration, state.consumed_train_samples
        w.scalar("learning-rate", self.optimizer.lr, it, samples)
        w.scalar("batch-size", self.cfg.training.global_batch_size, it, samples)
        w.scalar("lm loss", loss, it, samples)
        for name, value in moe_losses.items():
            w.scalar(name, value, it)
        if self.cfg.logging.log_loss_scale_to_tensorboard:
            w.scalar("loss-scale", self.optimizer.loss_scaler.scale, it, samples)
        if stepped:
            w.scalar("grad-norm", grad_norm, it, samples)
            w.scalar("num-zeros", num_zeros, it, samples)

    def _throughput(self, seconds: float) -> dict[str, float | None]:
        t, world = self.cfg.training, self.pg.world_size
        tflops = self.flops / (seconds * world * 1e12)
        return {"tflops_per_gpu": tflops, "mfu": mfu(tflops, self.peak),
                "tokens_per_sec_per_gpu": (t.global_batch_size * self.cfg.data.seq_length
                                           / (seconds * world))}

    def _report_interval(self, state, expert_load: list[ExpertLoad]) -> None:
        iv, lg, it = self.interval, self.cfg.logging, state.iteration
        elapsed = iv.seconds / max(iv.iterations, 1)
        rates = self._throughput(elapsed) if elapsed > 0 else None
        norm = params_norm(self.optimizer) if lg.log_params_norm else None
        self.log(self._log_line(state, elapsed, rates if lg.log_throughput else None, norm))
        self._report_expert_load(expert_load, it)
        memory = memory_stats(self.device)
        if not self._memory_reported:
            self.log(memory_line(self.pg.rank, it, memory, self.device))
            self._memory_reported = True
        timers, rank_ms = self._gather_timers(iv.iterations)
        for line in (format_min_max(*timers), rank_ms[1]):
            if line:
                self.log(line)
        self._write_interval(state, elapsed, rates, norm, memory, timers)
        if self.jsonl is not None:
            self.jsonl.write(self._interval_record(state, elapsed, rates, norm, memory, timers,
                                                   rank_ms[0]))
        self.interval = _Interval()

    def _report_expert_load(self, expert_load: list[ExpertLoad], iteration: int) -> None:
        """One console line and the TensorBoard / W&B scalars per MoE layer, the counts
        per iteration of the interval."""
        per_iteration = 1.0 / max(self.interval.iterations, 1)
        capacity = self.cfg.model.moe_expert_capacity_factor is not None
        for load in expert_load:
            self.log(format_expert_load(load, per_iteration, capacity))
            for tag, value in expert_load_scalars(load, per_iteration, capacity).items():
                self.writers.scalar(tag, value, iteration)

    def _gather_timers(self, iterations: int):
        """Reported timers' (min, max) ms per iteration over ranks, and the straggler
        report: one all_gather of every timer plus this rank's own-work time."""
        values = self.timers.pop_ms(ITERATION_TIMERS, normalizer=max(iterations, 1))
        own = sum(max(values[ITERATION_TIMERS.index(n)], 0.0) for n in OWN_WORK_TIMERS)
        table = (gather_over_ranks(values + [own], self.device) if self.pg.world_size > 1
                 else torch.tensor([values + [own]], dtype=torch.float64))
        spans = min_max(table[:, :-1])
        names = self.timers.reported(ITERATION_TIMERS)
        picked = [spans[ITERATION_TIMERS.index(n)] for n in names]
        rank_ms = table[:, -1].tolist()
        line = straggler_line(rank_ms, self.cfg.logging.straggler_threshold,
                              always=self.cfg.logging.timing_log_level >= 1)
        return (names, picked), (rank_ms, line)

    def _log_line(self, state, elapsed: float, rates: dict | None,
                  norm: float | None) -> str:
        """Megatron's training log line (MFU beside the throughput)."""
        t, iv = self.cfg.training, self.interval
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        parts = [f" [{stamp}] iteration {state.iteration:8d}/{t.train_iters:8d}",
                 f" consumed samples: {state.consumed_train_samples:12d}",
                 f" elapsed time per iteration (ms): {elapsed * 1000.0:.1f}"]
        if rates is not None:
            parts.append(f" throughput per GPU (TFLOP/s/GPU): {rates['tflops_per_gpu']:.1f}")
            if rates["mfu"] is not None:
                parts.append(f" MFU: {100.0 * rates['mfu']:.1f}%")
            parts.append(f" tokens per second per GPU: {rates['tokens_per_sec_per_gpu']:.1f}")
        parts.append(f" learning rate: {self.optimizer.lr:.6E}")
        parts.append(f" global batch size: {t.global_batch_size:5d}")
        if iv.losses:
            parts.append(f" lm loss: {sum(iv.losses) / len(iv.losses):.6E}")
        for name, values in iv.moe.items():
            parts.append(f" {name}: {sum(values) / len(values):.6E}")
        parts.append(f" loss scale: {self.optimizer.loss_scaler.scale:.1f}")
        if iv.grad_norm is not None:
            parts.append(f" grad norm: {iv.grad_norm:.3f}")
        if iv.num_zeros is not None:
            parts.append(f" num zeros: {float(iv.num_zeros):.1f}")
        if norm is not None:
            parts.append(f" params norm: {norm:.3f}")
        parts.append(f" number of skipped iterations: {iv.skipped:3d}")
        parts.append(f" number of nan iterations: {iv.nan:3d}")
        return " |".join(parts) + " |"

    def _write_interval(self, state, elapsed, rates, norm, memory, timers) -> None:
        if not self.writers:
            return
        w, lg, it = self.writers, self.cfg.logging, state.iteration
        if rates is not None and lg.log_throughput:
            w.scalar("throughput", rates["tflops_per_gpu"], it)
            w.scalar("tokens-per-sec-per-gpu", rates["tokens_per_sec_per_gpu"], it)
            w.scalar("mfu", rates["mfu"], it)
        w.scalar("params-norm", norm, it)
        if lg.log_memory_to_tensorboard:
            for name, mb in memory.items():
                w.scalar(MEMORY_TAGS[name], mb * 2 ** 20, it)
        if lg.log_timers_to_tensorboard:
            w.scalar("iteration-time", elapsed, it)
            for name, span in zip(*timers):
                if span is not None:
                    w.scalar(f"{name}-time", span[1], it)

    def _interval_record(self, state, elapsed, rates, norm, memory, timers, rank_ms) -> dict:
        iv = self.interval
        record = {"kind": "train", "iteration": state.iteration,
                  "consumed_samples": state.consumed_train_samples,
                  "elapsed_ms_per_iteration": elapsed * 1000.0,
                  "learning_rate": self.optimizer.lr,
                  "global_batch_size": self.cfg.training.global_batch_size,
                  "lm_loss": sum(iv.losses) / len(iv.losses) if iv.losses else None,
                  **{name: sum(v) / len(v) for name, v in iv.moe.items()},
                  "loss_scale": self.optimizer.loss_scaler.scale,
                  "grad_norm": iv.grad_norm, "num_zeros": iv.num_zeros,
                  "params_norm": norm, "skipped_iterations": iv.skipped,
                  "nan_iterations": iv.nan, "memory_mb": memory,
                  "timers_ms": {name: list(span) for name, span in zip(*timers) if span},
                  "rank_own_work_ms": rank_ms}
        if rates is not None:
            record.update(rates)
        return record

    # ------------------------------------------------------------ evaluation
    def report_validation(self, prefix: str, loss: float, state, split: str = "validation"):
        """Megatron's evaluate timer and validation lines; TensorBoard, W&B and JSONL."""
        (ms,) = self.timers.pop_ms(["evaluate"])
        table = (gather_over_ranks([ms], self.device) if self.pg.world_size > 1
                 else torch.tensor([[ms]], dtype=torch.float64))
        block = format_min_max(["evaluate"], min_max(table))
        if block:
            self.log(block)
        ppl = math.exp(min(20.0, loss))
        line = (f" validation loss at {prefix} | lm loss value: {loss:.6E} | "
                f"lm loss PPL: {ppl:.6E} | ")
        self.log("-" * (len(line) + 1))
        self.log(line)
        self.log("-" * (len(line) + 1))
        if split == "validation":
            it, samples = state.iteration, state.consumed_train_samples
            self.writers.scalar("lm loss validation", loss, it, samples)
            if self.cfg.logging.log_validation_ppl_to_tensorboard:
                self.writers.scalar("lm loss validation ppl", ppl, it, samples)
        if self.jsonl is not None:
            self.jsonl.write({"kind": split, "iteration": state.iteration,
                              "consumed_samples": state.consumed_train_samples,
                              "lm_loss": loss, "ppl": ppl, "evaluate_ms": ms})

    # ------------------------------------------------------------ the end
    def summary(self, state) -> dict:
        """Iteration times after warm-up (the first tenth of the iterations, at least
        one), throughput, MFU, peak memory and the layout of the run."""
        times = self.iteration_seconds
        warmup = min(max(1, len(times) // 10), len(times) - 1) if len(times) > 1 else 0
        timed = times[warmup:]
        mean = statistics.fmean(timed) if timed else None
        rates = self._throughput(mean) if mean else {}
        cfg, p, t, pg = self.cfg, self.cfg.parallel, self.cfg.training, self.pg
        memory = memory_stats(self.device)
        return {
            "iterations": len(times), "last_iteration": state.iteration,
            "warmup_iterations": warmup,
            "iteration_time_mean_s": mean,
            "iteration_time_median_s": statistics.median(timed) if timed else None,
            "tokens_per_sec_per_gpu": rates.get("tokens_per_sec_per_gpu"),
            "tflops_per_gpu": rates.get("tflops_per_gpu"),
            "mfu": rates.get("mfu"), "peak_tflops": self.peak,
            "peak_memory_mb": memory.get("max allocated", memory.get("max rss")),
            "memory_kind": "cuda allocator" if self.device.type == "cuda" else "process rss",
            "skipped_iterations": state.skipped_iterations,
            "nan_iterations": state.nan_iterations, "last_lm_loss": self.last_loss,
            "layout": {"world_size": pg.world_size, "tensor_model_parallel": pg.tp.size,
                       "pipeline_model_parallel": pg.pp.size,
                       "virtual_stages": virtual_stages(cfg),
                       "context_parallel": pg.cp.size, "expert_model_parallel": pg.ep.size,
                       "data_parallel": pg.dp.size,
                       "sequence_parallel": p.sequence_parallel,
                       "distributed_optimizer": p.use_distributed_optimizer,
                       "micro_batch_size": t.micro_batch_size,
                       "global_batch_size": t.global_batch_size,
                       "seq_length": cfg.data.seq_length,
                       "precision": str(self.dtype).replace("torch.", ""),
                       "device": device_name(self.device)},
        }

    def close(self, state, finished: bool = True) -> None:
        """Write the performance summary (if asked, and the run finished) and close the
        writers."""
        try:
            if finished and self.writes and self.cfg.logging.performance_summary:
                write_json_atomically(self.cfg.logging.performance_summary, self.summary(state),
                                      "--performance-summary")
        finally:
            self.writers.close()
            if self.jsonl is not None:
                self.jsonl.close()
