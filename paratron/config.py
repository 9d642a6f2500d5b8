"""The configuration tree, and the one place that maps Megatron-LM's flags onto it.

A run is described by `Config`, a tree of dataclasses (model, parallel, training,
optimizer, data, checkpoint, logging). Every field that a user can set carries its
command-line spelling, help text and argparse group in its metadata, so the parser
is generated from the tree and cannot drift from it. Field names are Megatron-LM's
`args.<dest>` names, so `--disable-bias-linear` lands in `add_bias_linear` exactly
as in Megatron.

Precedence: built-in defaults < `--model-size` preset < `--config file.yaml` <
command line. Derived values (ffn size, kv channels, warm-up steps, ...) are filled
in by `finalize`, and `validate` refuses inconsistent combinations with one line
each, before any process group or tensor exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A refused configuration; the message is one line naming the flag and the fix."""


def opt(default: Any, help: str, *, flag: str | None = None, type=None, choices=None,
        action: str | None = None, nargs=None, group: str | None = None, metavar=None,
        positive: bool = False, maximum: int | None = None):
    """A config field with its command-line flag.

    `flag` defaults to `--` + the field name with dashes; booleans become switches
    (store_true, or store_false when the default is True and the flag negates it).
    Numbers (`type` int or float) are finite and not negative; `positive` also refuses
    zero (a size, a divisor, an interval) and `maximum` caps them (see `number_problem`).
    """
    meta = dict(help=help, flag=flag, type=type, choices=choices, action=action,
                nargs=nargs, group=group, metavar=metavar, positive=positive,
                maximum=maximum)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# Seeds numpy's legacy generator takes are below 2**32; Paratron adds rank offsets
# (100 per pipeline stage, 2718 + TP rank, 1024 + 100 per expert rank) to --seed.
MAX_SEED = 2 ** 31 - 1


def number_problem(value: Any, kind: type, positive: bool | None = False,
                   maximum: int | None = None) -> str | None:
    """What is wrong with `value` as a setting of numeric type `kind` (int or float), or
    None. Every number Paratron takes is a count, a size, a rate or a coefficient: NaN,
    infinities and negative values mean nothing for any of them and would otherwise
    surface steps later as a traceback in torch or numpy, or as a silently broken run.
    `positive` None checks the kind only (the range is checked elsewhere)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "is not an integer" if kind is int else "is not a number"
    if kind is int and not isinstance(value, int):
        return "is not a whole number"
    if not math.isfinite(value):
        return "is not a finite number"
    if positive is None:
        return None
    if positive and value <= 0:
        return "must be positive"
    if value < 0:
        return "must be 0 or more"
    if maximum is not None and value > maximum:
        return f"must be at most {maximum}"
    return None


def parse_number(text: Any, kind: type) -> Any:
    """`text` (a command-line or YAML value) as an int or a float. An integer may be
    written as 1e9 or 64.0 when its value is whole; anything else is returned as is,
    for `number_problem` to name."""
    if isinstance(text, str):
        try:
            return kind(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return text
        text = value
    if kind is int and isinstance(text, float) and math.isfinite(text) and text == int(text):
        return int(text)
    return text


class NumberType:
    """argparse `type` of a numeric flag: converts with `parse_number`, so that NaN,
    infinities and fractions of integers are invalid values like any other text. The
    range is left to the command (`check_numbers` for the config tree's flags, which
    also sees the values that come from elsewhere)."""

    def __init__(self, kind: type):
        self.kind = kind
        self.__name__ = kind.__name__  # argparse: "invalid int value: 'x'"

    def __call__(self, text):
        value = parse_number(text, self.kind)
        if number_problem(value, self.kind, None):
            raise ValueError(text)
        return value


@dataclass
class TransformerConfig:
    """The model architecture (Megatron-Core's TransformerConfig, flag names as Megatron)."""

    GROUP: ClassVar[str] = "network size"

    num_layers: int | None = opt(None, "Number of transformer layers.", type=int, positive=True)
    hidden_size: int | None = opt(None, "Transformer hidden size.", type=int, positive=True)
    ffn_hidden_size: int | None = opt(None, "MLP hidden size; default 4 x hidden-size "
                                      "(x 2/3, down to a multiple of 64, with --swiglu).", type=int,
                                      positive=True)
    num_attention_heads: int | None = opt(None, "Number of attention heads.", type=int,
                                          positive=True)
    group_query_attention: bool = opt(False, "Use grouped-query attention.")
    num_query_groups: int = opt(1, "Number of key/value head groups with "
                                "--group-query-attention.", type=int, positive=True)
    kv_channels: int | None = opt(None, "Head dimension; default hidden-size / "
                                  "num-attention-heads.", type=int, positive=True)
    max_position_embeddings: int | None = opt(None, "Maximum sequence length the position "
                                              "embeddings cover.", type=int, positive=True)
    position_embedding_type: str = opt("learned_absolute", "Position embedding type.",
                                       choices=["learned_absolute", "rope", "yarn", "none"])
    use_rotary_position_embeddings: bool = opt(False, "Deprecated spelling of "
                                               "--position-embedding-type rope.")
    rotary_base: float = opt(10000.0, "RoPE base (theta).", type=float, positive=True)
    rotary_percent: float = opt(1.0, "Fraction of the head dimension that is rotated.",
                                type=float)
    rotary_interleaved: bool = opt(False, "Rotate interleaved pairs (GPT-J style) instead "
                                   "of halves.")
    rotary_seq_len_interpolation_factor: float | None = opt(
        None, "Linear position interpolation factor for RoPE.", type=float, positive=True)
    use_rope_scaling: bool = opt(False, "Llama-3.x style RoPE frequency scaling.")
    rope_scaling_factor: float = opt(8.0, "Factor for --use-rope-scaling.", type=float,
                                     positive=True)
    rotary_scaling_factor: float = opt(1.0, "YaRN scaling factor (DeepSeek-V2 uses 40).",
                                       type=float, positive=True)
    original_max_position_embeddings: int | None = opt(
        None, "Context length the model was trained for before YaRN / Llama-3 scaling.",
        type=int, positive=True)
    beta_fast: float = opt(32.0, "YaRN beta_fast.", type=float)
    beta_slow: float = opt(1.0, "YaRN beta_slow.", type=float)
    mscale: float = opt(1.0, "YaRN mscale.", type=float)
    mscale_all_dim: float = opt(0.0, "YaRN mscale_all_dim.", type=float)
    normalization: str = opt("LayerNorm", "Normalisation layer.", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = opt(1e-5, "Epsilon of the normalisation layers.", type=float)
    swiglu: bool = opt(False, "SwiGLU MLP (gated linear unit with SiLU).")
    openai_gelu: bool = opt(False, "tanh-approximated GeLU, as the original GPT-2.")
    squared_relu: bool = opt(False, "Squared ReLU activation.")
    add_bias_linear: bool = opt(True, "Drop the biases of all linear layers.",
                                flag="--disable-bias-linear")
    add_qkv_bias: bool = opt(False, "Keep a bias on the QKV projection (Qwen2.5) even with "
                             "--disable-bias-linear.")
    qk_layernorm: bool = opt(False, "Normalise queries and keys per head (Qwen3); "
                             "multi-latent attention always normalises its latents.")
    untie_embeddings_and_output_weights: bool = opt(False, "Separate output layer weights.")
    make_vocab_size_divisible_by: int = opt(128, "Pad the vocabulary to a multiple of this "
                                            "(times TP).", type=int, positive=True)
    padded_vocab_size: int | None = opt(None, "Use exactly this vocabulary size.", type=int,
                                        positive=True)
    vocab_size: int | None = opt(None, "Vocabulary size of the NullTokenizer or of "
                                 "mock data without a tokenizer.", type=int, positive=True)
    extra_vocab_size: int = opt(0, "Extra tokens added to the tokenizer's vocabulary "
                                "(Pai-Megatron-Patch).", type=int)
    attention_dropout: float = opt(0.1, "Dropout on attention probabilities.", type=float,
                                   group="regularization")
    hidden_dropout: float = opt(0.1, "Dropout on the residual branches and embeddings.",
                                type=float, group="regularization")
    init_method_std: float = opt(0.02, "Standard deviation of the normal initialisation.",
                                 type=float, group="initialization")
    recompute_activations: bool = opt(False, "Shorthand for --recompute-granularity "
                                      "selective.", group="training")
    recompute_granularity: str | None = opt(None, "Activation recompute granularity.",
                                            choices=["full", "selective"], group="training")
    recompute_method: str | None = opt(None, "Which layers full recompute covers.",
                                       choices=["uniform", "block"], group="training")
    recompute_num_layers: int | None = opt(None, "Layers per recompute chunk (uniform) or "
                                           "recomputed layers (block).", type=int,
                                           group="training")
    recompute_modules: list[str] | None = opt(None, "Submodules selective recompute covers.",
                                              nargs="*", group="training")
    cpu_offloading: bool = opt(False, "Keep the tensors the first --cpu-offloading-num-layers "
                               "layers save for backward in (pinned) CPU memory.",
                               group="training")
    cpu_offloading_num_layers: int = opt(0, "Layers (from the first) whose saved activations "
                                         "are offloaded.", type=int, group="training")
    cross_entropy_loss_fusion: bool = opt(False, "Cross entropy over chunks of tokens: fp32 "
                                          "logits exist for one chunk at a time.",
                                          group="performance")
    cross_entropy_chunk_size: int = opt(4096, "Tokens per chunk of "
                                        "--cross-entropy-loss-fusion.", type=int,
                                        group="performance", positive=True)
    torch_compile: bool = opt(False, "Compile each transformer layer with torch.compile.",
                              group="performance")
    torch_compile_backend: str = opt("inductor", "torch.compile backend of --torch-compile.",
                                     choices=["inductor", "aot_eager", "eager"],
                                     group="performance")
    # Mixture of experts
    num_experts: int | None = opt(None, "Number of routed experts.", type=int, group="moe")
    moe_ffn_hidden_size: int | None = opt(None, "Hidden size of each routed expert.",
                                          type=int, group="moe", positive=True)
    moe_router_topk: int = opt(2, "Experts each token is routed to.", type=int, group="moe",
                               positive=True)
    moe_layer_freq: str = opt("1", "MoE every N layers, or a pattern list like "
                              "([0]+[1]*26).", group="moe")
    moe_shared_expert_intermediate_size: int | None = opt(
        None, "Hidden size of the shared experts.", type=int, group="moe")
    moe_router_load_balancing_type: str = opt("aux_loss", "Load-balancing loss.",
                                              choices=["aux_loss", "seq_aux_loss", "sinkhorn",
                                                       "none"], group="moe")
    moe_aux_loss_coeff: float = opt(0.0, "Aux loss coefficient.", type=float, group="moe")
    moe_z_loss_coeff: float | None = opt(None, "Router z-loss coefficient.", type=float,
                                         group="moe")
    moe_router_pre_softmax: bool = opt(False, "Softmax before top-k.", group="moe")
    moe_router_score_function: str = opt("softmax", "Router score function.",
                                         choices=["softmax", "sigmoid"], group="moe")
    moe_router_topk_scaling_factor: float | None = opt(None, "Scale of routed weights.",
                                                       type=float, group="moe", positive=True)
    moe_router_num_groups: int | None = opt(None, "Expert groups for group-limited routing.",
                                            type=int, group="moe")
    moe_router_group_topk: int | None = opt(None, "Groups selected per token.", type=int,
                                            group="moe")
    moe_router_enable_expert_bias: bool = opt(False, "Aux-loss-free balancing bias.",
                                              group="moe")
    moe_expert_capacity_factor: float | None = opt(None, "Expert capacity factor "
                                                   "(dropless when unset).", type=float,
                                                   group="moe", positive=True)
    moe_pad_expert_input_to_capacity: bool = opt(False, "Pad expert inputs to capacity.",
                                                 group="moe")
    moe_token_drop_policy: str = opt("probs", "Which tokens are dropped over capacity.",
                                     choices=["probs", "position"], group="moe")
    moe_grouped_gemm: bool = opt(False, "Run all local experts as one grouped GEMM.",
                                 group="moe")
    moe_shared_expert_gate: bool = opt(False, "Sigmoid gate on the shared experts (Qwen2-MoE).",
                                       group="moe")
    moe_router_bias_update_rate: float = opt(1e-3, "Step of the aux-loss-free expert bias.",
                                             type=float, group="moe")
    moe_token_dispatcher_type: str = opt("allgather", "Token dispatcher.",
                                         choices=["allgather", "alltoall"], group="moe")
    # Multi-latent attention
    multi_latent_attention: bool = opt(False, "Multi-latent attention (DeepSeek-V2).",
                                       group="mla")
    q_lora_rank: int | None = opt(None, "Query low-rank dimension.", type=int, group="mla")
    kv_lora_rank: int = opt(32, "Key/value low-rank dimension.", type=int, group="mla")
    qk_head_dim: int = opt(128, "Query/key head dimension without rope.", type=int,
                           group="mla")
    qk_pos_emb_head_dim: int = opt(64, "Query/key rope head dimension.", type=int, group="mla")
    v_head_dim: int = opt(128, "Value head dimension.", type=int, group="mla")

    # Set from the parallel layout by `finalize` (as Megatron's TransformerConfig
    # inherits ModelParallelConfig): the model builds sequence-parallel layers.
    sequence_parallel: bool = False
    cp_comm_type: str = "p2p"

    def uses_yarn(self) -> bool:
        """YaRN rotary embeddings: asked for by name, or, as Megatron's multi-latent
        attention does, by --rotary-scaling-factor above 1."""
        return self.position_embedding_type == "yarn" or (
            self.multi_latent_attention and self.rotary_scaling_factor > 1)

    def rope_original_max_positions(self) -> int:
        """The context length before YaRN / Llama-3 scaling: the flag, else Megatron's
        defaults (4096 for YaRN, 8192 for Llama 3)."""
        if self.original_max_position_embeddings:
            return self.original_max_position_embeddings
        return 4096 if self.uses_yarn() else 8192

    def mlp_activation(self) -> str:
        if self.swiglu:
            return "swiglu"
        if self.squared_relu:
            return "squared_relu"
        return "gelu_tanh" if self.openai_gelu else "gelu"


@dataclass
class ParallelConfig:
    """How the run is laid out over processes."""

    GROUP: ClassVar[str] = "distributed"

    tensor_model_parallel_size: int = opt(1, "Tensor-parallel size.", type=int, positive=True)
    pipeline_model_parallel_size: int = opt(1, "Pipeline-parallel size.", type=int, positive=True)
    context_parallel_size: int = opt(1, "Context-parallel size.", type=int, positive=True)
    cp_comm_type: str = opt("p2p", "Context-parallel communication.",
                            choices=["p2p", "all_gather", "a2a"])
    expert_model_parallel_size: int = opt(1, "Expert-parallel size.", type=int, positive=True)
    expert_tensor_parallel_size: int | None = opt(None, "Tensor-parallel size of experts.",
                                                  type=int, positive=True)
    sequence_parallel: bool = opt(False, "Sequence parallelism inside TP regions.")
    num_layers_per_virtual_pipeline_stage: int | None = opt(
        None, "Layers per virtual pipeline stage (interleaved 1F1B).", type=int, positive=True)
    num_virtual_stages_per_pipeline_rank: int | None = opt(
        None, "Virtual stages per pipeline rank (interleaved 1F1B).", type=int, positive=True)
    decoder_first_pipeline_num_layers: int | None = opt(None, "Layers on the first stage.",
                                                        type=int)
    decoder_last_pipeline_num_layers: int | None = opt(None, "Layers on the last stage.",
                                                       type=int)
    account_for_embedding_in_pipeline_split: bool = opt(
        False, "Count the embedding as a layer when splitting stages.")
    account_for_loss_in_pipeline_split: bool = opt(
        False, "Count the loss as a layer when splitting stages.")
    use_distributed_optimizer: bool = opt(False, "Shard optimizer state over data parallel.")
    overlap_grad_reduce: bool = opt(False, "Overlap gradient reduction with backward.")
    overlap_param_gather: bool = opt(False, "Overlap parameter all-gather with forward.")
    ddp_bucket_size: int | None = opt(None, "Gradient bucket size in elements.", type=int,
                                      positive=True)
    distributed_backend: str = opt("nccl", "Collective backend (gloo is used on CPU).",
                                   choices=["nccl", "gloo"])
    distributed_timeout_minutes: float = opt(10, "Minutes a collective may wait before the "
                                             "job stops.", type=float, positive=True)
    world_size: int | None = opt(None, "World size when not launched by torchrun.", type=int,
                                 positive=True)
    rank: int | None = opt(None, "Rank when not launched by torchrun.", type=int)
    local_rank: int | None = opt(None, "Local rank (set by older launchers).", type=int,
                                 flag="--local-rank")
    init_method: str | None = opt(None, "torch.distributed init method, e.g. "
                                  "tcp://host:port.")

    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)


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
    fp8: str | None = opt(None, "FP8 format.", flag=("--fp8-format", "--fp8"),
                          choices=["e4m3", "hybrid"],
                          group="mixed precision")
    fp8_recipe: str = opt("delayed", "FP8 scaling recipe.",
                          choices=["tensorwise", "delayed", "mxfp8", "blockwise"],
                          group="mixed precision")
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
class DataConfig:
    """Data files, tokenizer and data loading."""

    GROUP: ClassVar[str] = "data and dataloader"

    data_path: list[str] | None = opt(None, "Dataset prefix, or weight-prefix pairs to "
                                      "blend.", nargs="*")
    data_path_config: str | None = opt(None, "YAML file describing the data blend.")
    train_data_path: list[str] | None = opt(None, "Separate training data.", nargs="*")
    valid_data_path: list[str] | None = opt(None, "Separate validation data.", nargs="*")
    test_data_path: list[str] | None = opt(None, "Separate test data.", nargs="*")
    split: str = opt("969, 30, 1", "Train, validation, test proportions.")
    seq_length: int | None = opt(None, "Sequence length of a sample.", type=int, positive=True)
    mock_data: bool = opt(False, "Deterministic synthetic tokens (no files needed).")
    num_workers: int = opt(2, "Data-loader worker processes.", type=int)
    data_cache_path: str | None = opt(None, "Where sample indices are cached.")
    eod_mask_loss: bool = opt(False, "No loss on end-of-document tokens.")
    reset_position_ids: bool = opt(False, "Restart position ids after each end of document.")
    reset_attention_mask: bool = opt(False, "No attention across documents.")
    dataloader_type: str = opt("single", "How samples are drawn.", choices=["single", "cyclic"])
    dataset: str = opt("MMAP", "Dataset kind (Pai-Megatron-Patch).",
                       choices=["MMAP", "JSON-SFT", "MMAP-SFT", "RAW"])
    sft: bool = opt(False, "Supervised fine-tuning data: loss only on responses.")
    max_padding_length: int | None = opt(None, "Pad SFT samples to this length.", type=int,
                                         positive=True)
    sequence_packing: bool = opt(False, "Pack SFT samples into seq-length.")
    tokenizer_type: str | None = opt(None, "Tokenizer kind.", group="tokenizer",
                                     choices=["GPT2BPETokenizer", "HuggingFaceTokenizer", "GPTSentencePieceTokenizer",
                                              "SentencePieceTokenizer", "Llama2Tokenizer",
                                              "NullTokenizer"])
    patch_tokenizer_type: str | None = opt(None, "Pai-Megatron-Patch tokenizer name; read as "
                                           "HuggingFaceTokenizer.", group="tokenizer")
    vocab_file: str | None = opt(None, "GPT-2 vocab.json.", group="tokenizer")
    merge_file: str | None = opt(None, "GPT-2 merges.txt.", group="tokenizer")
    tokenizer_model: str | None = opt(None, "SentencePiece model or Hugging Face tokenizer "
                                      "folder.", group="tokenizer")


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
    log_num_zeros_in_grad: bool = opt(False, "Log the count of zero gradients (Paratron "
                                      "always does).")
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

    # Filled in by the trainer once the process layout is known (world size 1 here).
    data_parallel_size: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("model", "parallel", "training", "optimizer", "data", "checkpoint", "logging")

# Flags that only steer Megatron's own kernels or launch machinery. Accepted so that
# existing scripts run unchanged; they change nothing in Paratron: (flag, takes a value).
NO_EFFECT_FLAGS = [
    ("--use-mcore-models", False), ("--use-legacy-models", False),
    ("--transformer-impl", True), ("--attention-backend", True),
    ("--no-masked-softmax-fusion", False), ("--no-bias-swiglu-fusion", False),
    ("--no-bias-gelu-fusion", False), ("--no-bias-dropout-fusion", False),
    ("--no-rope-fusion", False), ("--no-gradient-accumulation-fusion", False),
    ("--no-persist-layer-norm", False), ("--no-async-tensor-model-parallel-allreduce", False),
    ("--attention-softmax-in-fp32", False), ("--apply-query-key-layer-scaling", False),
    ("--use-flash-attn", False), ("--tensorboard-queue-size", True),
    ("--tensorboard-log-interval", True), ("--accumulate-allreduce-grads-in-fp32", False),
    ("--moe-permute-fusion", False),
    ("--create-attention-mask-in-dataloader", False), ("--no-create-attention-mask-in-dataloader", False),
    ("--empty-unused-memory-level", True), ("--num-dataset-builder-threads", True),
    ("--distributed-timeout-seconds-after-init", True), ("--manual-gc", False),
    ("--log-world-size-to-tensorboard", False), ("--use-cpu-initialization", False),
    ("--check-for-nan-in-loss-and-grad", False),  # the default; --no-... turns it off
]


def _fields_with_flags(section_cls):
    for f in fields(section_cls):
        if "help" in f.metadata:
            yield f


def _flags_of(f) -> tuple[str, ...]:
    """A field's spellings on the command line (the first is the documented one)."""
    flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
    return (flag,) if isinstance(flag, str) else tuple(flag)


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line and names the closest known flag."""

    def error(self, message):
        raise ConfigError(message)


def build_parser(prog: str = "paratron train") -> argparse.ArgumentParser:
    """The Megatron-compatible parser, generated from the config tree."""
    parser = _Parser(prog=prog, allow_abbrev=False,
                     description="Train a GPT-style model. Flags follow Megatron-LM.")
    top = parser.add_argument_group("configuration")
    top.add_argument("--config", metavar="FILE.yaml",
                     help="YAML file keyed by flag names; the command line overrides it.")
    top.add_argument("--model-size", metavar="NAME",
                     help="Preset of published hyper-parameters (e.g. gpt2-124m, llama3-8b, "
                          "qwen2.5-7b, qwen3-8b); any flag overrides it.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section in SECTIONS:
        cls = Config.__dataclass_fields__[section].default_factory
        for f in _fields_with_flags(cls):
            m = f.metadata
            name = m["group"] or cls.GROUP
            group = groups.get(name) or groups.setdefault(name, parser.add_argument_group(name))
            kwargs = dict(dest=f.name, help=m["help"], default=argparse.SUPPRESS)
            if f.type in ("bool", bool) or isinstance(f.default, bool):
                kwargs["action"] = "store_false" if f.default is True else "store_true"
            else:
                for key in ("type", "choices", "nargs", "metavar"):
                    if m[key] is not None:
                        kwargs[key] = m[key]
                if m["type"] in (int, float):
                    kwargs["type"] = NumberType(m["type"])
            group.add_argument(*_flags_of(f), **kwargs)
    compat = parser.add_argument_group(
        "accepted for compatibility with Megatron-LM scripts (no effect in Paratron)")
    for flag, takes_value in NO_EFFECT_FLAGS:
        compat.add_argument(flag, dest="_ignored_" + flag[2:].replace("-", "_"),
                            default=argparse.SUPPRESS,
                            **({"nargs": "?"} if takes_value else {"action": "store_true"}),
                            help="no effect")
    return parser


def _dest_to_section() -> dict[str, str]:
    out = {}
    for section in SECTIONS:
        cls = Config.__dataclass_fields__[section].default_factory
        for f in _fields_with_flags(cls):
            out[f.name] = section
    return out


def _known_flags(parser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def _reject_unknown(unknown: list[str], parser, where: str = "") -> None:
    for token in unknown:
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            close = difflib.get_close_matches(name, _known_flags(parser), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else "; see 'paratron train --help'"
            raise ConfigError(f"unknown flag {name}{where}{hint}")
    if unknown:
        raise ConfigError(f"unexpected argument {unknown[0]!r}{where}; values follow their flag")


# A --config file lists flags: a few hundred values at most (long --data-path blends
# included). Larger files, or aliases that expand past this, are refused unread.
YAML_MAX_BYTES = 1 << 20
YAML_MAX_NODES = 100_000


def _expanded_nodes(node, memo: dict, open_nodes: set) -> int:
    """Nodes of a composed YAML document with every alias expanded, as `safe_load`'s
    result would hold them (counted once per node, so an alias bomb costs nothing)."""
    import yaml

    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_nodes:
        raise ConfigError("an alias refers to a node that contains it")
    open_nodes.add(key)
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
    memo[key] = 1 + sum(_expanded_nodes(child, memo, open_nodes) for child in children)
    open_nodes.discard(key)
    return memo[key]


def _read_yaml(path: str) -> Any:
    """A --config file's document, refused in one line when it is not a regular file,
    too large, not YAML, or expands (through aliases) past YAML_MAX_NODES values."""
    import yaml

    try:
        with open(path, "rb") as fh:
            if not os.path.isfile(path):
                raise ConfigError(f"--config {path}: not a regular file")
            text = fh.read(YAML_MAX_BYTES + 1)
    except OSError as exc:
        reason = "file not found" if isinstance(exc, FileNotFoundError) else exc.strerror
        raise ConfigError(f"--config {path}: {reason}") from None
    if len(text) > YAML_MAX_BYTES:
        raise ConfigError(f"--config {path}: larger than {YAML_MAX_BYTES >> 20} MiB; a "
                          f"flag file is a short list of flags")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}, set()) > YAML_MAX_NODES:
            raise ConfigError(f"more than {YAML_MAX_NODES} values once its aliases are "
                              f"expanded")
        return loader.construct_document(node)
    except ConfigError as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"--config {path}{line}: not valid YAML") from None
    except RecursionError:
        raise ConfigError(f"--config {path}: nested too deeply") from None
    finally:
        loader.dispose()


def _yaml_defaults(path: str, parser) -> dict[str, Any]:
    """Read a YAML file keyed by flag names (dashes or underscores, with or without --)."""
    doc = _read_yaml(path) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    out = {}
    for key, value in doc.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        action = by_flag.get(flag)
        if action is None:
            close = difflib.get_close_matches(flag, list(by_flag), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0].lstrip('-')}?" if close else ""
            raise ConfigError(f"--config {path}: unknown key {key!r}{hint}")
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path}: {key} is a switch; give true or false")
            # A switch set to true in YAML behaves like passing the flag.
            if value:
                out[action.dest] = action.const
            continue
        if action.nargs in ("*", "+") and not isinstance(value, list):
            value = str(value).split()
        elif action.type is not None and value is not None:
            try:
                value = ([action.type(v) for v in value] if isinstance(value, list)
                         else action.type(value))
            except (TypeError, ValueError):
                raise ConfigError(f"--config {path}: {key} expects "
                                  f"{action.type.__name__}, got {value!r}") from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"--config {path}: {key} must be one of "
                              f"{', '.join(map(str, action.choices))}")
        out[action.dest] = value
    return out


def parse_args(argv: list[str] | None = None, prog: str = "paratron train",
               check: bool = True) -> Config:
    """Parse Megatron-style flags (plus preset and YAML) into a finalized Config,
    validated unless `check` is False (parsing alone, as the flag-compatibility test does)."""
    from paratron.model.presets import PRESETS

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    ns, unknown = parser.parse_known_args(argv)
    _reject_unknown(unknown, parser)
    values: dict[str, Any] = {}
    if getattr(ns, "model_size", None):
        if ns.model_size not in PRESETS:
            close = difflib.get_close_matches(ns.model_size, list(PRESETS), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"--model-size {ns.model_size}: unknown preset{hint} "
                              f"(known: {', '.join(PRESETS)})")
        values.update(PRESETS[ns.model_size])
    if getattr(ns, "config", None):
        values.update(_yaml_defaults(ns.config, parser))
    values.update({k: v for k, v in vars(ns).items()
                   if k not in ("config", "model_size") and not k.startswith("_ignored_")})
    cfg = Config(model_size=getattr(ns, "model_size", None))
    where = _dest_to_section()
    for dest, value in values.items():
        setattr(getattr(cfg, where[dest]), dest, value)
    finalize(cfg)
    if check:
        if cfg.checkpoint.use_checkpoint_args:  # the architecture comes from --load
            _apply_checkpoint_args(cfg, log=_rank0_print)
            finalize(cfg)
        validate(cfg)
    return cfg


def _apply_checkpoint_args(cfg: Config, log) -> None:
    """--use-checkpoint-args: the model's architecture comes from the newest complete
    checkpoint in --load (what the command line says about it is overridden, with a
    note), before the tree is validated, as Megatron reads a checkpoint's args."""
    from paratron.checkpoint.files import find_latest_valid, read_metadata

    load = cfg.checkpoint.load
    if load is None:
        raise ConfigError("--use-checkpoint-args needs --load <checkpoint directory>")
    found = find_latest_valid(load, log=log)
    if found is None:
        raise ConfigError(f"--use-checkpoint-args: --load {load} holds no complete "
                          f"checkpoint to take the model from")
    model = (read_metadata(found[1]).get("config") or {}).get("model")
    if not model:
        raise ConfigError(f"{found[1]}: the checkpoint records no model configuration; "
                          f"give the model flags instead of --use-checkpoint-args")
    changed = []
    for key, value in model.items():
        if hasattr(cfg.model, key) and getattr(cfg.model, key) != value:
            changed.append(key)
            setattr(cfg.model, key, value)
    if changed:
        log(f"--use-checkpoint-args: from {found[1]}: {', '.join(sorted(changed))}")


# Settings of one launch, not of the run: left out of a saved --config file.
_LAUNCH_FIELDS = ("world_size", "rank", "local_rank", "init_method")


def config_to_yaml(cfg: Config) -> str:
    """The run as a `--config` file: every setting that differs from its default, keyed
    by its flag, so `paratron train --config FILE` rebuilds the same tree (the model
    size preset, if any, is spelled out)."""
    import yaml

    doc = {}
    for section in SECTIONS:
        values = getattr(cfg, section)
        defaults = type(values)()
        for f in _fields_with_flags(type(values)):
            value = getattr(values, f.name)
            if f.name in _LAUNCH_FIELDS or value == getattr(defaults, f.name):
                continue
            if isinstance(f.default, bool) and f.default:  # a --no-... switch, now off
                value = True
            doc[_flags_of(f)[0].lstrip("-")] = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(doc, sort_keys=True, allow_unicode=True)


def _rank0_print(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(line)


def config_from_dict(values: dict[str, Any], training: bool = True) -> Config:
    """A Config from Megatron dest names (for tests and library use); finalized and
    validated (without the training-only checks when `training` is False)."""
    cfg = Config()
    where = _dest_to_section()
    for dest, value in values.items():
        if dest not in where:
            raise ConfigError(f"unknown setting {dest!r}")
        setattr(getattr(cfg, where[dest]), dest, value)
    finalize(cfg)
    validate(cfg, training)
    return cfg


def check_numbers(cfg: Config) -> None:
    """Refuse a numeric setting that is not a finite, non-negative number of its field's
    type (or zero where the field must be positive), naming its flag. Values reach the
    tree from flags, --config files, presets, checkpoints' recorded configs and library
    calls; this is the one check they all pass."""
    for section in SECTIONS:
        values = getattr(cfg, section)
        for f in _fields_with_flags(type(values)):
            m, value = f.metadata, getattr(values, f.name)
            if m["type"] not in (int, float) or value is None:
                continue
            problem = number_problem(value, m["type"], m["positive"], m["maximum"])
            if problem:
                raise ConfigError(f"{_flags_of(f)[0]} {problem}, got {value!r}")


def finalize(cfg: Config) -> None:
    """Fill in the values Megatron derives from others (after `check_numbers`, since
    the derivations compute with them)."""
    check_numbers(cfg)
    m, t, o, p = cfg.model, cfg.training, cfg.optimizer, cfg.parallel
    if m.use_rotary_position_embeddings:
        m.position_embedding_type = "rope"
    if m.recompute_activations:
        m.recompute_granularity = "selective"
    if m.recompute_granularity == "selective" and not m.recompute_modules:
        m.recompute_modules = ["core_attn"]
    if m.num_attention_heads and m.hidden_size and m.kv_channels is None:
        if m.hidden_size % m.num_attention_heads == 0:
            m.kv_channels = m.hidden_size // m.num_attention_heads
    if not m.group_query_attention and m.num_attention_heads:
        m.num_query_groups = m.num_attention_heads
    if m.ffn_hidden_size is None and m.hidden_size:
        if m.swiglu:
            # Megatron: two thirds of 4h (same parameter count), down to a multiple of 64.
            m.ffn_hidden_size = int((4 * m.hidden_size * 2 / 3) / 64) * 64
        else:
            m.ffn_hidden_size = 4 * m.hidden_size
    if m.max_position_embeddings is None and cfg.data.seq_length is not None:
        m.max_position_embeddings = cfg.data.seq_length
    if p.tensor_model_parallel_size == 1:
        p.sequence_parallel = False
    m.sequence_parallel = p.sequence_parallel
    m.cp_comm_type = p.cp_comm_type
    world = int(os.environ.get("WORLD_SIZE", p.world_size or 1))
    model_parallel = p.model_parallel_size
    cfg.data_parallel_size = max(world // model_parallel, 1) if world % model_parallel == 0 else 0
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * max(cfg.data_parallel_size, 1)
    if t.train_iters is None and t.train_samples is not None and t.global_batch_size:
        t.train_iters = t.train_samples // t.global_batch_size
    if o.lr_decay_iters is None:
        o.lr_decay_iters = t.train_iters
    if o.lr_warmup_fraction is not None and o.lr_decay_iters:
        o.lr_warmup_iters = int(o.lr_warmup_fraction * o.lr_decay_iters)
    _default_tokenizer(cfg.data)


def _default_tokenizer(d: DataConfig) -> None:
    """GPT-2's vocab.json and merges.txt without --tokenizer-type name the GPT-2 BPE
    tokenizer: Megatron-LM's pretrain_gpt.py defaults --tokenizer-type to it
    (args_defaults), so scripts written for it give the two files alone."""
    if (d.tokenizer_type is None and d.patch_tokenizer_type is None
            and d.vocab_file is not None and d.merge_file is not None):
        d.tokenizer_type = "GPT2BPETokenizer"


def validate(cfg: Config, training: bool = True) -> None:
    """Refuse inconsistent or not-yet-available settings, one line each. `training`
    False leaves out what only a training run needs (iterations, learning-rate
    schedule, optimizer), for a model rebuilt to generate or convert."""
    m, p, t, d = cfg.model, cfg.parallel, cfg.training, cfg.data
    required = [("--num-layers", m.num_layers), ("--hidden-size", m.hidden_size),
                ("--num-attention-heads", m.num_attention_heads),
                ("--seq-length", d.seq_length)]
    for flag, value in required:
        if value is None:
            raise ConfigError(f"{flag} is required (or pick a preset with --model-size)")
    positive = [("--num-layers", m.num_layers), ("--hidden-size", m.hidden_size),
                ("--num-attention-heads", m.num_attention_heads),
                ("--seq-length", d.seq_length), ("--micro-batch-size", t.micro_batch_size),
                ("--global-batch-size", t.global_batch_size),
                ("--tensor-model-parallel-size", p.tensor_model_parallel_size),
                ("--pipeline-model-parallel-size", p.pipeline_model_parallel_size),
                ("--context-parallel-size", p.context_parallel_size),
                ("--expert-model-parallel-size", p.expert_model_parallel_size),
                ("--eval-interval", t.eval_interval), ("--log-interval", cfg.logging.log_interval)]
    for flag, value in positive:
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    if t.fp16 and t.bf16:
        raise ConfigError("--fp16 and --bf16 are both set; choose one")
    if m.kv_channels is None:
        raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by "
                          f"--num-attention-heads {m.num_attention_heads}; change one or "
                          f"give --kv-channels")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                          f"--num-query-groups {m.num_query_groups}; pick a divisor")
    if m.position_embedding_type == "learned_absolute" and m.max_position_embeddings \
            and d.seq_length > m.max_position_embeddings:
        raise ConfigError(f"--seq-length {d.seq_length} exceeds --max-position-embeddings "
                          f"{m.max_position_embeddings} with learned positions; raise "
                          f"--max-position-embeddings or use --position-embedding-type rope")
    if not 0 < m.rotary_percent <= 1:
        raise ConfigError(f"--rotary-percent must be in (0, 1], got {m.rotary_percent}")
    if m.recompute_granularity == "full" and m.recompute_method is None:
        raise ConfigError("--recompute-granularity full needs --recompute-method "
                          "uniform or block")
    if m.recompute_method is not None and m.recompute_granularity != "full":
        raise ConfigError("--recompute-method applies only with --recompute-granularity full")
    if m.recompute_granularity == "full" and m.recompute_method == "block" \
            and m.recompute_num_layers is None:
        raise ConfigError("--recompute-method block needs --recompute-num-layers")
    if m.recompute_granularity == "selective":
        bad = set(m.recompute_modules) - {"core_attn", "mlp", "layernorm"}
        if bad:
            raise ConfigError(f"--recompute-modules: unsupported {', '.join(sorted(bad))}; "
                              f"choose from core_attn, mlp, layernorm")
    if not 0 <= m.attention_dropout < 1 or not 0 <= m.hidden_dropout < 1:
        raise ConfigError("--attention-dropout and --hidden-dropout must be in [0, 1)")
    if training:
        _validate_schedule(cfg)
    if cfg.data_parallel_size == 0:
        world = int(os.environ.get("WORLD_SIZE", p.world_size or 1))
        raise ConfigError(f"world size is not divisible by tensor x pipeline x context "
                          f"parallel size ({p.model_parallel_size}): this launch has {world} "
                          f"process{'es' if world > 1 else ''}; change the sizes or the "
                          f"number of processes")
    from paratron.parallel.process_groups import check_layout
    try:
        check_layout(int(os.environ.get("WORLD_SIZE", p.world_size or 1)),
                     p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                     p.context_parallel_size, p.expert_model_parallel_size,
                     p.expert_tensor_parallel_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    micro_dp = t.micro_batch_size * cfg.data_parallel_size
    if t.global_batch_size % micro_dp:
        raise ConfigError(f"--global-batch-size {t.global_batch_size} is not divisible by "
                          f"--micro-batch-size {t.micro_batch_size} x data-parallel size "
                          f"{cfg.data_parallel_size}; make it a multiple of {micro_dp}")
    tp = p.tensor_model_parallel_size
    if tp > 1:
        checks = [(m.num_attention_heads, "--num-attention-heads"),
                  (m.ffn_hidden_size, "--ffn-hidden-size")]
        if m.padded_vocab_size is not None:
            checks.append((m.padded_vocab_size, "--padded-vocab-size"))
        for value, flag in checks:
            if value % tp:
                raise ConfigError(f"{flag} {value} is not divisible by "
                                  f"--tensor-model-parallel-size {tp}; pick sizes TP divides")
        if m.num_query_groups % tp and tp % m.num_query_groups:
            raise ConfigError(f"--num-query-groups {m.num_query_groups} and "
                              f"--tensor-model-parallel-size {tp}: one must divide the "
                              f"other (fewer groups than TP ranks are replicated)")
        if p.sequence_parallel and d.seq_length % tp:
            raise ConfigError(f"--seq-length {d.seq_length} is not divisible by "
                              f"--tensor-model-parallel-size {tp}, as --sequence-parallel "
                              f"needs")
    if m.padded_vocab_size is not None and m.padded_vocab_size <= 0:
        raise ConfigError("--padded-vocab-size must be positive")
    if m.make_vocab_size_divisible_by <= 0:
        raise ConfigError("--make-vocab-size-divisible-by must be positive")
    _validate_pipeline(cfg)
    _validate_moe_mla_cp(cfg)
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


# Features whose flags parse today but whose implementation arrives later. Each entry
# is (is the feature requested?, the one-line refusal). Entries leave this table as
# the features land.
def _unavailable(cfg: Config):
    t, c = cfg.training, cfg.checkpoint
    return [
        (t.fp8 is not None, "--fp8-format"),
        (t.rampup_batch_size is not None, "--rampup-batch-size"),
        (c.ckpt_format == "zarr", "--ckpt-format zarr (use torch_dist)"),
    ]


def virtual_stages(cfg: Config) -> int:
    """Model chunks per pipeline rank (interleaved 1F1B when more than one)."""
    p = cfg.parallel
    if p.num_virtual_stages_per_pipeline_rank:
        return p.num_virtual_stages_per_pipeline_rank
    if p.num_layers_per_virtual_pipeline_stage:
        return cfg.model.num_layers // (p.pipeline_model_parallel_size
                                        * p.num_layers_per_virtual_pipeline_stage)
    return 1


def pipeline_split(cfg: Config) -> dict:
    """The uneven-stage flags as keyword arguments of `model_chunks`."""
    p = cfg.parallel
    return dict(first=p.decoder_first_pipeline_num_layers,
                last=p.decoder_last_pipeline_num_layers,
                account_for_embedding=p.account_for_embedding_in_pipeline_split,
                account_for_loss=p.account_for_loss_in_pipeline_split)


def _validate_pipeline(cfg: Config) -> None:
    """Stages and virtual stages must split the layers, and interleaving needs whole
    rounds of micro-batches."""
    from paratron.parallel.pipeline import model_chunks

    p, t = cfg.parallel, cfg.training
    pp = p.pipeline_model_parallel_size
    if p.num_layers_per_virtual_pipeline_stage and p.num_virtual_stages_per_pipeline_rank:
        raise ConfigError("give --num-layers-per-virtual-pipeline-stage or "
                          "--num-virtual-stages-per-pipeline-rank, not both")
    k = p.num_layers_per_virtual_pipeline_stage
    if k and cfg.model.num_layers % (pp * k):
        raise ConfigError(f"--num-layers {cfg.model.num_layers} is not divisible by "
                          f"--pipeline-model-parallel-size {pp} x "
                          f"--num-layers-per-virtual-pipeline-stage {k}")
    vpp = virtual_stages(cfg)
    if vpp > 1 and pp == 1:
        raise ConfigError("virtual pipeline stages need --pipeline-model-parallel-size > 1")
    try:
        model_chunks(cfg.model.num_layers, pp, 0, vpp, **pipeline_split(cfg))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    micro = t.global_batch_size // (t.micro_batch_size * max(cfg.data_parallel_size, 1))
    if vpp > 1 and micro % pp:
        raise ConfigError(f"the interleaved schedule needs the micro-batches per step "
                          f"({micro} = global batch / (micro batch x data-parallel size)) "
                          f"to be a multiple of --pipeline-model-parallel-size {pp}")


def moe_layer_pattern(model: TransformerConfig) -> list[bool]:
    """Which layers are MoE: --moe-layer-freq N (every N-th layer, from layer 0) or a
    pattern list such as ([0]+[1]*26), read without evaluating code."""
    import ast

    n = model.num_layers
    if not model.num_experts:
        return [False] * n
    text = str(model.moe_layer_freq).strip()
    if text.isdigit():
        freq = int(text)
        if freq <= 0:
            raise ConfigError(f"--moe-layer-freq {text} must be positive")
        return [i % freq == 0 for i in range(n)]

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError

    try:
        pattern = value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, TypeError):
        raise ConfigError(f"--moe-layer-freq {text!r}: give an integer or a list pattern "
                          f"like ([0]+[1]*{n - 1})") from None
    if not isinstance(pattern, list) or len(pattern) != n or set(pattern) - {0, 1}:
        raise ConfigError(f"--moe-layer-freq {text!r} must list {n} zeros and ones, one per "
                          f"layer (--num-layers {n})")
    return [bool(x) for x in pattern]


def _validate_moe_mla_cp(cfg: Config) -> None:
    """Experts, multi-latent attention and context parallelism: sizes that fit."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    if m.num_experts:
        if m.num_experts % p.expert_model_parallel_size:
            raise ConfigError(f"--num-experts {m.num_experts} is not divisible by "
                              f"--expert-model-parallel-size {p.expert_model_parallel_size}")
        if not 0 < m.moe_router_topk <= m.num_experts:
            raise ConfigError(f"--moe-router-topk {m.moe_router_topk} must be between 1 and "
                              f"--num-experts {m.num_experts}")
        if m.moe_router_num_groups and (m.num_experts % m.moe_router_num_groups or
                                        not m.moe_router_group_topk or
                                        m.moe_router_group_topk > m.moe_router_num_groups):
            raise ConfigError("--moe-router-num-groups must divide --num-experts and "
                              "--moe-router-group-topk must be between 1 and the groups")
        moe_layer_pattern(m)
        from paratron.model.moe import check_moe_config
        try:
            check_moe_config(m, p.tensor_model_parallel_size, p.expert_model_parallel_size,
                             p.expert_tensor_parallel_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    elif p.expert_model_parallel_size > 1:
        raise ConfigError("--expert-model-parallel-size > 1 needs --num-experts")
    if m.multi_latent_attention:
        dims = {"--qk-head-dim": m.qk_head_dim, "--qk-pos-emb-head-dim": m.qk_pos_emb_head_dim,
                "--v-head-dim": m.v_head_dim, "--kv-lora-rank": m.kv_lora_rank}
        if m.q_lora_rank is not None:
            dims["--q-lora-rank"] = m.q_lora_rank
        for flag, value in dims.items():
            if value <= 0:
                raise ConfigError(f"{flag} {value} must be positive with "
                                  f"--multi-latent-attention")
        if m.rotary_percent != 1.0:
            raise ConfigError("--rotary-percent must be 1 with --multi-latent-attention (the "
                              "rope part has its own --qk-pos-emb-head-dim)")
        if m.qk_pos_emb_head_dim % 2:
            raise ConfigError(f"--qk-pos-emb-head-dim {m.qk_pos_emb_head_dim} must be even "
                              f"(rotary pairs)")
        if m.position_embedding_type not in ("rope", "yarn"):
            raise ConfigError("--multi-latent-attention needs --position-embedding-type rope")
        if m.num_attention_heads % p.tensor_model_parallel_size:
            raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not "
                              f"divisible by --tensor-model-parallel-size "
                              f"{p.tensor_model_parallel_size}")
    cp = p.context_parallel_size
    if cp > 1:
        if d.seq_length % (2 * cp):
            raise ConfigError(f"--seq-length {d.seq_length} is not divisible by 2 x "
                              f"--context-parallel-size ({2 * cp}), as the load-balanced "
                              f"causal layout needs")
        if p.cp_comm_type not in ("p2p", "all_gather"):
            raise ConfigError(f"--cp-comm-type {p.cp_comm_type}: use p2p or all_gather")
        if d.reset_attention_mask or d.sequence_packing:
            raise ConfigError("--context-parallel-size > 1 attends causally over the whole "
                              "sample; --reset-attention-mask and --sequence-packing are "
                              "not supported with it")
        if p.sequence_parallel and (d.seq_length // cp) % p.tensor_model_parallel_size:
            raise ConfigError(f"--seq-length {d.seq_length} / --context-parallel-size {cp} "
                              f"is not divisible by --tensor-model-parallel-size "
                              f"{p.tensor_model_parallel_size}, as --sequence-parallel needs")


def _validate_memory_and_speed(cfg: Config) -> None:
    """Activation and optimizer offload, chunked cross entropy: values that make sense."""
    m, o = cfg.model, cfg.optimizer
    if m.cpu_offloading and not 0 < m.cpu_offloading_num_layers <= m.num_layers:
        raise ConfigError(f"--cpu-offloading needs --cpu-offloading-num-layers between 1 and "
                          f"--num-layers {m.num_layers}, got {m.cpu_offloading_num_layers}")
    if o.optimizer_cpu_offload and not 0 <= o.optimizer_offload_fraction <= 1:
        raise ConfigError(f"--optimizer-offload-fraction must be in [0, 1], got "
                          f"{o.optimizer_offload_fraction}")
    if m.cross_entropy_chunk_size <= 0:
        raise ConfigError(f"--cross-entropy-chunk-size must be positive, got "
                          f"{m.cross_entropy_chunk_size}")
    if m.torch_compile and m.recompute_granularity == "selective":
        raise ConfigError("--torch-compile compiles whole layers and cannot hold selective "
                          "recompute inside them; use --recompute-granularity full or drop "
                          "one of the two")


def _validate_logging(cfg: Config) -> None:
    """Metrics and fault-check settings that make sense, and W&B only when installed."""
    lg, t = cfg.logging, cfg.training
    if lg.peak_tflops is not None and lg.peak_tflops <= 0:
        raise ConfigError(f"--peak-tflops must be positive, got {lg.peak_tflops}")
    if lg.straggler_threshold < 0:
        raise ConfigError(f"--straggler-threshold must be 0 or more, got {lg.straggler_threshold}")
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


def _refuse_unavailable(cfg: Config) -> None:
    for requested, what in _unavailable(cfg):
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


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's padding: up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)
