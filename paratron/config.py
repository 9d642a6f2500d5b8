"""The run's configuration tree (`Config`, one section per owner; field names are
Megatron-LM's `args.<dest>`), and the one place its values are derived (`finalize`) and
checked (`validate`: one line per refusal, before any process group or tensor exists)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from paratron.data.config import DataConfig
from paratron.model.config import (TransformerConfig, check_experts_and_mla, check_model,
                                   check_mtp, check_tensor_parallel, derive_model)
from paratron.model.fp8 import check_fp8
from paratron.options import MAX_SEED, ConfigError, check_numbers, fields_with_flags, opt
from paratron.parallel.config import (ParallelConfig, check_context_parallel,
                                      check_pipeline)
from paratron.parallel.launch import launched_world_size
from paratron.parallel.process_groups import check_layout


@dataclass
class TrainingConfig:
    """Batches, iterations, precision and evaluation."""

    GROUP: ClassVar[str] = "training"

    micro_batch_size: int = opt(1, "Samples per micro-batch per data-parallel rank.", type=int,
                                positive=True)
    global_batch_size: int | None = opt(None, "Samples per optimizer step; default "
                                        "micro-batch-size x data-parallel size.", type=int,
                                        positive=True)
    rampup_batch_size: list[str] | None = opt(None, "Batch-size ramp-up (start increment "
                                              "samples).", nargs="*")
    train_iters: int | None = opt(None, "Training iterations.", type=int)
    train_samples: int | None = opt(None, "Training samples (instead of --train-iters).",
                                    type=int)
    exit_interval: int | None = opt(None, "Exit after an iteration divisible by this.",
                                    type=int, positive=True)
    exit_duration_in_mins: int | None = opt(None, "Exit after this many minutes.", type=int,
                                            positive=True)
    exit_signal_handler: bool = opt(False, "Save and exit on SIGTERM/SIGINT.")
    skip_train: bool = opt(False, "Only evaluate.")
    seed: int = opt(1234, "Random seed.", type=int, group="initialization", maximum=MAX_SEED)
    device: str = opt("auto", "Where to train: CUDA when present, else CPU.",
                      choices=["auto", "cuda", "cpu"])
    train_mode: str = opt("pretrain", "Pai-Megatron-Patch train mode.",
                          choices=["pretrain", "finetune"])
    check_for_nan_in_loss_and_grad: bool = opt(
        True, "Do not stop on a NaN/Inf loss or gradient (the step is skipped and counted); "
        "by default the run saves a checkpoint (with --save) and stops. fp16 with dynamic "
        "loss scaling always skips and counts.", flag="--no-check-for-nan-in-loss-and-grad")
    loss_spike_factor: float = opt(3.0, "Warn when the loss exceeds this many times the mean "
                                   "of the last 100 iterations (0 turns it off).", type=float)
    calculate_per_token_loss: bool = opt(False, "Normalise the loss by tokens over the whole "
                                         "global batch (always the case in Paratron).")
    bf16: bool = opt(False, "bf16 weights and compute, fp32 main weights and gradients.",
                     group="mixed precision")
    fp16: bool = opt(False, "fp16 weights and compute with dynamic loss scaling.",
                     group="mixed precision")
    fp64: bool = opt(False, "float64 weights, gradients and compute with fp32 main weights "
                     "and optimizer state, for numerics checks: sums split over ranks then "
                     "agree with whole ones to ~1e-16, so every layout (FP8 included) "
                     "trains bit for bit like one process.", group="mixed precision")
    loss_scale: float | None = opt(None, "Static loss scale (dynamic when unset).",
                                   type=float, group="mixed precision", positive=True)
    initial_loss_scale: float = opt(2.0 ** 32, "Initial dynamic loss scale.", type=float,
                                    group="mixed precision", positive=True)
    min_loss_scale: float = opt(1.0, "Minimum dynamic loss scale.", type=float,
                                group="mixed precision", positive=True)
    loss_scale_window: int = opt(1000, "Clean steps before the loss scale doubles.", type=int,
                                 group="mixed precision", positive=True)
    hysteresis: int = opt(2, "Overflows tolerated before the loss scale halves.", type=int,
                          group="mixed precision", positive=True)
    eval_interval: int = opt(1000, "Iterations between evaluations.", type=int,
                             group="validation", positive=True)
    eval_iters: int = opt(100, "Batches per evaluation.", type=int, group="validation")


@dataclass
class OptimizerConfig:
    """Optimizer, learning-rate schedule and regularisation."""

    GROUP: ClassVar[str] = "learning rate"

    optimizer: str = opt("adam", "Optimizer (adam is AdamW: decoupled weight decay).",
                         choices=["adam", "sgd"], group="optimizer")
    lr: float | None = opt(None, "Peak learning rate.", type=float)
    min_lr: float = opt(0.0, "Floor of the decayed learning rate.", type=float)
    lr_decay_style: str = opt("linear", "Decay after warm-up.",
                              choices=["constant", "linear", "cosine", "inverse-square-root",
                                       "WSD"])
    lr_decay_iters: int | None = opt(None, "Iterations to decay over (default train-iters).",
                                     type=int, positive=True)
    lr_decay_samples: int | None = opt(None, "Samples to decay over.", type=int, positive=True)
    lr_warmup_iters: int = opt(0, "Warm-up iterations.", type=int)
    lr_warmup_samples: int = opt(0, "Warm-up samples.", type=int)
    lr_warmup_fraction: float | None = opt(None, "Warm-up as a fraction of the decay "
                                           "iterations.", type=float, maximum=1)
    lr_warmup_init: float = opt(0.0, "Learning rate at the start of warm-up.", type=float)
    lr_wsd_decay_style: str = opt("exponential", "Annealing shape of WSD.",
                                  choices=["exponential", "linear", "cosine", "minus_sqrt"])
    lr_wsd_decay_iters: int | None = opt(None, "Annealing iterations of WSD.", type=int,
                                         positive=True)
    lr_wsd_decay_samples: int | None = opt(None, "Annealing samples of WSD.", type=int,
                                           positive=True)
    weight_decay: float = opt(0.01, "Weight decay (not on biases and norm weights).",
                              type=float, group="regularization")
    clip_grad: float = opt(1.0, "Clip gradients to this global norm (0 disables).",
                           type=float, group="regularization")
    adam_beta1: float = opt(0.9, "Adam beta1.", type=float, group="regularization")
    adam_beta2: float = opt(0.999, "Adam beta2.", type=float, group="regularization")
    adam_eps: float = opt(1e-8, "Adam epsilon.", type=float, group="regularization", positive=True)
    sgd_momentum: float = opt(0.9, "SGD momentum.", type=float, group="regularization")
    optimizer_cpu_offload: bool = opt(False, "Keep optimizer state on the CPU.",
                                      group="optimizer")
    optimizer_offload_fraction: float = opt(1.0, "Fraction of the optimizer offloaded.",
                                            type=float, group="optimizer")
    optimizer_implementation: str = opt("auto", "torch optimizer kernels: one tensor at a "
                                        "time, multi-tensor (foreach) or fused; auto is "
                                        "torch's choice for the device.",
                                        choices=["auto", "for-loop", "foreach", "fused"],
                                        group="optimizer")


@dataclass
class CheckpointConfig:
    """Saving and loading."""

    GROUP: ClassVar[str] = "checkpointing"

    save: str | None = opt(None, "Directory to save checkpoints to.")
    save_interval: int | None = opt(None, "Iterations between checkpoints.", type=int,
                                    positive=True)
    no_save_optim: bool = opt(False, "Do not save the optimizer state.")
    no_save_rng: bool = opt(False, "Do not save RNG states.")
    load: str | None = opt(None, "Directory to load a checkpoint from.")
    no_load_optim: bool = opt(False, "Do not load the optimizer state.")
    no_load_rng: bool = opt(False, "Do not load RNG states.")
    finetune: bool = opt(False, "Load weights only and start from iteration 0.")
    ckpt_format: str = opt("torch_dist", "Checkpoint format: torch_dist and torch both "
                           "write Paratron's sharded, layout-free safetensors checkpoints.",
                           choices=["torch", "torch_dist", "zarr"])
    async_save: bool = opt(False, "Save in the background.")
    use_checkpoint_args: bool = opt(False, "Take the model configuration from the checkpoint.")
    exit_on_missing_checkpoint: bool = opt(False, "Exit if --load finds no checkpoint.")


@dataclass
class LoggingConfig:
    """Console, TensorBoard and W&B logging."""

    GROUP: ClassVar[str] = "logging"

    log_interval: int = opt(100, "Iterations between log lines.", type=int, positive=True)
    log_throughput: bool = opt(False, "Log TFLOP/s per GPU and tokens/s.")
    log_params_norm: bool = opt(False, "Log the norm of the parameters.")
    log_num_zeros_in_grad: bool = opt(False, "Log the count of zero gradients (a pass "
                                      "over every gradient at each log step).")
    timing_log_level: int = opt(0, "Detail of the timers.", type=int, choices=[0, 1, 2])
    tensorboard_dir: str | None = opt(None, "TensorBoard event directory.")
    log_timers_to_tensorboard: bool = opt(False, "Write timers to TensorBoard.")
    log_validation_ppl_to_tensorboard: bool = opt(False, "Write validation PPL to TensorBoard.")
    log_memory_to_tensorboard: bool = opt(False, "Write memory use to TensorBoard.")
    log_loss_scale_to_tensorboard: bool = opt(True, "Write the loss scale to TensorBoard.",
                                              flag="--no-log-loss-scale-to-tensorboard")
    wandb_project: str | None = opt(None, "Weights & Biases project.")
    wandb_exp_name: str | None = opt(None, "Weights & Biases run name.")
    wandb_save_dir: str | None = opt(None, "Weights & Biases directory.")
    peak_tflops: float | None = opt(None, "Dense peak TFLOP/s of one device for MFU (default: "
                                    "the GPU's published figure; none on a CPU).", type=float,
                                    positive=True)
    metrics_jsonl: str | None = opt(None, "Write one JSON object per log interval and per "
                                    "evaluation to this file.", metavar="PATH")
    performance_summary: str | None = opt(None, "Write iteration times, throughput, MFU, peak "
                                          "memory and the layout as JSON at the end.",
                                          metavar="PATH")
    straggler_threshold: float = opt(0.2, "Report the slowest rank when the ranks' own work "
                                     "per iteration differs by more than this fraction.",
                                     type=float)
    moe_per_layer_logging: bool = opt(False, "At each log interval, log per MoE layer the "
                                      "tokens per expert (min, max, coefficient of "
                                      "variation), the aux and z losses and the dropped "
                                      "tokens.", group="moe")


@dataclass
class Config:
    """One run: the whole tree."""

    model: TransformerConfig = field(default_factory=TransformerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    model_size: str | None = None

    # Filled in by `finalize`: the processes of the launch, and the data-parallel size
    # they leave (0 when the model-parallel sizes do not divide them).
    world_size: int = 1
    data_parallel_size: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("model", "parallel", "training", "optimizer", "data", "checkpoint", "logging")
# The sections of a recorded Config that say where and how a run ran (its layout, where it
# saved and logged), not what it computed: a run rebuilt elsewhere from its checkpoint
# (generation, replay) takes their defaults.
PLACEMENT_SECTIONS = ("parallel", "checkpoint", "logging")


def recorded_settings(saved: dict, where) -> dict[str, Any]:
    """A checkpoint's record of its run (`Config.to_dict()`) as one table by dest name,
    without the placement sections. A section that is not a table is refused in one line
    (the folder may be hostile)."""
    flat: dict[str, Any] = {}
    for section in SECTIONS:
        recorded = saved.get(section) or {}
        if not isinstance(recorded, dict):
            raise ConfigError(f"{where}: the recorded settings' {section!r} is not a table")
        if section not in PLACEMENT_SECTIONS:
            flat.update(recorded)
    return flat


def config_of(values: dict[str, Any], model_size: str | None = None) -> Config:
    """A Config holding `values`, keyed by Megatron dest names, in their sections."""
    cfg = Config(model_size=model_size)
    where = {f.name: section for section in SECTIONS
             for f in fields_with_flags(type(getattr(cfg, section)))}
    for dest, value in values.items():
        if dest not in where:
            raise ConfigError(f"unknown setting {dest!r}")
        setattr(getattr(cfg, where[dest]), dest, value)
    return cfg


def config_from_dict(values: dict[str, Any], training: bool = True) -> Config:
    """A Config from Megatron dest names (for tests and library use); finalized and
    validated (without the training-only checks when `training` is False)."""
    cfg = config_of(values)
    finalize(cfg, launched_world_size(cfg.parallel.world_size))
    validate(cfg, training)
    return cfg


def finalize(cfg: Config, world_size: int) -> None:
    """Fill in the values Megatron derives from others for a launch of `world_size`
    processes (after `check_numbers`, since the derivations compute with them). The
    padded vocabulary waits for the tokenizer (`resolve_vocab_size`)."""
    for section in SECTIONS:
        check_numbers(getattr(cfg, section))
    m, t, o, p = cfg.model, cfg.training, cfg.optimizer, cfg.parallel
    if p.tensor_model_parallel_size == 1:
        p.sequence_parallel = False
    derive_model(m, cfg.data.seq_length, p.sequence_parallel, p.cp_comm_type)
    model_parallel = p.model_parallel_size
    cfg.world_size = world_size
    cfg.data_parallel_size = (max(world_size // model_parallel, 1)
                              if world_size % model_parallel == 0 else 0)
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * max(cfg.data_parallel_size, 1)
    if t.train_iters is None and t.train_samples is not None and t.global_batch_size:
        t.train_iters = t.train_samples // t.global_batch_size
    if o.lr_decay_iters is None:
        o.lr_decay_iters = t.train_iters
    if o.lr_warmup_fraction is not None and o.lr_decay_iters:
        o.lr_warmup_iters = int(o.lr_warmup_fraction * o.lr_decay_iters)
    cfg.data.default_tokenizer()


def resolve_vocab_size(cfg: Config, tokenizer_vocab_size: int | None) -> int:
    """Megatron's padded vocabulary: tokenizer size (+ extra) up to a multiple of
    make-vocab-size-divisible-by x TP, unless --padded-vocab-size says otherwise."""
    m = cfg.model
    base = tokenizer_vocab_size if tokenizer_vocab_size is not None else m.vocab_size
    if m.padded_vocab_size is not None:
        if base is not None and base + m.extra_vocab_size > m.padded_vocab_size:
            raise ConfigError(f"--padded-vocab-size {m.padded_vocab_size} is smaller than the "
                              f"tokenizer's vocabulary {base + m.extra_vocab_size}")
        return m.padded_vocab_size
    if base is None:
        raise ConfigError("the vocabulary size is unknown: give --tokenizer-type with its "
                          "files, or --vocab-size, or --padded-vocab-size")
    return pad_vocab_size(base + m.extra_vocab_size, m.make_vocab_size_divisible_by,
                          cfg.parallel.tensor_model_parallel_size)


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's padding: up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def validate(cfg: Config, training: bool = True) -> None:
    """Refuse inconsistent or not-yet-available settings, one line each, once `finalize`
    has checked every number. `training` False leaves out what only a training run
    needs (iterations, learning-rate schedule, optimizer), for a model rebuilt to
    generate or convert."""
    m, p, t, d = cfg.model, cfg.parallel, cfg.training, cfg.data
    required = [("--num-layers", m.num_layers), ("--hidden-size", m.hidden_size),
                ("--num-attention-heads", m.num_attention_heads),
                ("--seq-length", d.seq_length)]
    for flag, value in required:
        if value is None:
            raise ConfigError(f"{flag} is required (or pick a preset with --model-size)")
    if t.fp16 and t.bf16:
        raise ConfigError("--fp16 and --bf16 are both set; choose one")
    if t.fp64 and (t.bf16 or t.fp16):
        raise ConfigError(f"--{'bf16' if t.bf16 else 'fp16'} and --fp64 are both set; "
                          f"choose one")
    check_model(m, d.seq_length)
    if training:
        _validate_schedule(cfg)
    tp = p.tensor_model_parallel_size
    if cfg.data_parallel_size == 0:
        world = cfg.world_size
        raise ConfigError(f"world size is not divisible by tensor x pipeline x context "
                          f"parallel size ({p.model_parallel_size}): this launch has {world} "
                          f"process{'es' if world > 1 else ''}; change the sizes or the "
                          f"number of processes")
    try:
        check_layout(cfg.world_size, tp, p.pipeline_model_parallel_size,
                     p.context_parallel_size, p.expert_model_parallel_size,
                     p.expert_tensor_parallel_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    micro_dp = t.micro_batch_size * cfg.data_parallel_size
    if t.global_batch_size % micro_dp:
        raise ConfigError(f"--global-batch-size {t.global_batch_size} is not divisible by "
                          f"--micro-batch-size {t.micro_batch_size} x data-parallel size "
                          f"{cfg.data_parallel_size}; make it a multiple of {micro_dp}")
    check_tensor_parallel(m, tp, d.seq_length)
    _validate_fp8(cfg)
    check_pipeline(cfg)
    check_experts_and_mla(m, tp, p.expert_model_parallel_size, p.expert_tensor_parallel_size)
    check_mtp(m, p.pipeline_model_parallel_size, p.context_parallel_size)
    check_context_parallel(cfg)
    _validate_logging(cfg)
    _validate_memory_and_speed(cfg)
    _refuse_unavailable(cfg)


def _validate_schedule(cfg: Config) -> None:
    """Iterations, learning-rate schedule and optimizer: what a training run needs."""
    t, o = cfg.training, cfg.optimizer
    if t.train_iters is None:
        raise ConfigError("give --train-iters or --train-samples")
    if t.train_iters is not None and t.train_samples is not None \
            and t.train_iters != t.train_samples // t.global_batch_size:
        raise ConfigError("--train-iters and --train-samples are both set; give only one")
    if o.lr is None:
        raise ConfigError("--lr is required")
    if o.min_lr > o.lr:
        raise ConfigError(f"--min-lr {o.min_lr} is above --lr {o.lr}")
    if o.lr_decay_iters is not None and o.lr_warmup_iters > o.lr_decay_iters:
        raise ConfigError(f"--lr-warmup-iters {o.lr_warmup_iters} exceeds --lr-decay-iters "
                          f"{o.lr_decay_iters}; shorten the warm-up or lengthen the decay")
    if o.lr_decay_style == "WSD" and o.lr_wsd_decay_iters is None:
        raise ConfigError("--lr-decay-style WSD needs --lr-wsd-decay-iters")
    if o.lr_wsd_decay_iters is not None and o.lr_decay_iters is not None \
            and o.lr_wsd_decay_iters > o.lr_decay_iters:
        raise ConfigError("--lr-wsd-decay-iters exceeds --lr-decay-iters")
    if o.optimizer == "adam" and max(o.adam_beta1, o.adam_beta2) >= 1:
        raise ConfigError(f"--adam-beta1 {o.adam_beta1} and --adam-beta2 {o.adam_beta2} "
                          f"must both be below 1")


def _validate_memory_and_speed(cfg: Config) -> None:
    """Activation and optimizer offload, chunked cross entropy: values that make sense."""
    m, o = cfg.model, cfg.optimizer
    if m.cpu_offloading and not 0 < m.cpu_offloading_num_layers <= m.num_layers:
        raise ConfigError(f"--cpu-offloading needs --cpu-offloading-num-layers between 1 and "
                          f"--num-layers {m.num_layers}, got {m.cpu_offloading_num_layers}")
    if o.optimizer_cpu_offload and not 0 <= o.optimizer_offload_fraction <= 1:
        raise ConfigError(f"--optimizer-offload-fraction must be in [0, 1], got "
                          f"{o.optimizer_offload_fraction}")
    if m.torch_compile and m.recompute_granularity == "selective":
        raise ConfigError("--torch-compile compiles whole layers and cannot hold selective "
                          "recompute inside them; use --recompute-granularity full or drop "
                          "one of the two")


def _validate_logging(cfg: Config) -> None:
    """Metrics and fault-check settings that make sense, and W&B only when installed."""
    lg, t = cfg.logging, cfg.training
    if lg.moe_per_layer_logging and not cfg.model.num_experts:
        raise ConfigError("--moe-per-layer-logging needs an MoE model (--num-experts); "
                          "drop it for a dense model")
    if lg.moe_per_layer_logging and cfg.model.mtp_num_layers:
        raise ConfigError("--moe-per-layer-logging counts the decoder's layers only: drop it "
                          "with --mtp-num-layers")
    if t.loss_spike_factor != 0 and t.loss_spike_factor <= 1:
        raise ConfigError(f"--loss-spike-factor must be above 1 (or 0 to turn the warning "
                          f"off), got {t.loss_spike_factor}")
    for flag, path in (("--metrics-jsonl", lg.metrics_jsonl),
                       ("--performance-summary", lg.performance_summary)):
        if path is not None and os.path.isdir(path):
            raise ConfigError(f"{flag} {path} is a folder; give a file name")
    if lg.wandb_project:
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("--wandb-project needs the wandb package: pip install wandb "
                              "(or drop --wandb-project)")


def _validate_fp8(cfg: Config) -> None:
    """FP8's refusals (model/fp8.py), and the tokens of a micro-batch on one rank, which
    every FP8 GEMM of the weight gradient multiplies over: a multiple of 16."""
    m, p = cfg.model, cfg.parallel
    check_fp8(m)
    if m.fp8 is None:
        return
    split = p.context_parallel_size * (p.tensor_model_parallel_size if m.sequence_parallel
                                       else 1)
    tokens = cfg.training.micro_batch_size * cfg.data.seq_length // split
    if tokens % 16:
        raise ConfigError(f"--fp8-format: a micro-batch gives {tokens} tokens per rank "
                          f"(--micro-batch-size x --seq-length / context and sequence "
                          f"parallel ranks), which FP8 GEMMs cannot take (a multiple of "
                          f"16); change --seq-length or --micro-batch-size")


def _refuse_unavailable(cfg: Config) -> None:
    """Features whose flags parse today but whose implementation arrives later; each
    leaves this table as it lands."""
    t, c = cfg.training, cfg.checkpoint
    for requested, what in [(t.rampup_batch_size is not None, "--rampup-batch-size"),
                            (c.ckpt_format == "zarr", "--ckpt-format zarr (use torch_dist)")]:
        if requested:
            raise ConfigError(f"{what} is not supported yet in this version of Paratron; "
                              f"remove it to run")


def format_config(cfg: Config) -> str:
    """Megatron's 'arguments' block: every setting, one per line, sorted; a setting two
    sections share (copied by `finalize`) once."""
    rows = sorted({k: v for section in SECTIONS
                   for k, v in vars(getattr(cfg, section)).items()}.items())
    width = max(len(k) for k, _ in rows) + 2
    lines = ["------------------------ arguments ------------------------"]
    lines += [f"  {k} {'.' * (width - len(k))} {v}" for k, v in rows]
    lines.append("-------------------- end of arguments ---------------------")
    return "\n".join(lines)
