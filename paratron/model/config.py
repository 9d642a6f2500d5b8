"""The model's settings (`TransformerConfig`, a run's `cfg.model`), the sizes derived from
them, and the checks that concern the model alone, so the model code depends on neither
the run's config tree nor the parser. `paratron.config.validate` calls the checks in its
order; the MoE layer and the converters call `check_moe_config` on a model alone."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import ClassVar

from paratron.options import ConfigError, opt


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
    bias_gelu_fusion: bool = opt(True, "Exact (erf) GeLU. Without it a GeLU model with "
                                 "biases computes the tanh approximation, as Megatron's "
                                 "fused bias-GeLU kernel does (without biases Megatron "
                                 "turns the fusion off, and the GeLU is exact).",
                                 flag="--no-bias-gelu-fusion")
    squared_relu: bool = opt(False, "Squared ReLU activation.")
    add_bias_linear: bool = opt(True, "Drop the biases of all linear layers.",
                                flag="--disable-bias-linear")
    add_qkv_bias: bool = opt(False, "Keep a bias on the QKV projection (Qwen2.5) even with "
                             "--disable-bias-linear.")
    qk_layernorm: bool = opt(False, "Normalise queries and keys per head (Qwen3); "
                             "multi-latent attention normalises its latents unless "
                             "--no-mla-latent-layernorm.")
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
    cross_entropy_loss_fusion: bool = opt(True, "Use the plain cross entropy, which keeps an "
                                          "fp32 softmax of all the logits, instead of the "
                                          "fused one over chunks of tokens.",
                                          flag="--no-cross-entropy-loss-fusion",
                                          group="performance")
    cross_entropy_chunk_size: int | None = opt(None, "Tokens per chunk of the fused cross "
                                               "entropy (default: 1 MiB of fp32 logits on a "
                                               "CPU, cache-sized; 512 MiB on a GPU).",
                                               type=int, group="performance", positive=True)
    torch_compile: bool = opt(False, "Compile each transformer layer with torch.compile, "
                              "as one graph except for MoE layers, TP or CP above 1, and "
                              "attention dropout (or hidden dropout under sequence "
                              "parallelism), which compile in pieces; also the fused "
                              "cross entropy's chunks.", group="performance")
    torch_compile_backend: str = opt("inductor", "torch.compile backend of --torch-compile.",
                                     choices=["inductor", "aot_eager", "eager"],
                                     group="performance")
    # FP8 compute (model/fp8.py): not part of the model's identity, a run setting
    fp8: str | None = opt(None, "Compute the transformer layers' linear layers in FP8 "
                          "(torchao): e4m3 everywhere, or hybrid (e5m2 gradients).",
                          flag=("--fp8-format", "--fp8"), choices=["e4m3", "hybrid"],
                          group="mixed precision")
    fp8_recipe: str = opt("tensorwise", "FP8 scaling: tensorwise (dynamic, one scale per "
                          "tensor), or rowwise (Paratron's extra: torchao's rowwise recipe, "
                          "one scale per row of each operand, powers of 2); Megatron's "
                          "delayed, mxfp8 and blockwise are refused.",
                          choices=["tensorwise", "rowwise", "delayed", "mxfp8", "blockwise"],
                          group="mixed precision")
    fp8_margin: int = opt(0, "Scale FP8 values down by 2**margin below the format's "
                          "largest value.", type=int, group="mixed precision")
    fp8_wgrad: bool = opt(True, "Compute the weight gradients of the FP8 layers in the "
                          "model dtype, not FP8 (Megatron's --no-fp8-wgrad).",
                          flag="--no-fp8-wgrad", group="mixed precision")
    first_last_layers_bf16: bool = opt(False, "Keep the first and last transformer layers "
                                       "out of FP8.", group="mixed precision")
    num_layers_at_start_in_bf16: int = opt(1, "Layers kept out of FP8 at the start, with "
                                           "--first-last-layers-bf16.", type=int,
                                           group="mixed precision")
    num_layers_at_end_in_bf16: int = opt(1, "Layers kept out of FP8 at the end, with "
                                         "--first-last-layers-bf16.", type=int,
                                         group="mixed precision")
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
    moe_grouped_gemm: bool = opt(True, "Loop over the local experts (reading their token "
                                 "counts on the host) instead of running them together "
                                 "without a host sync, as one grouped GEMM where torch has "
                                 "one.", flag="--no-moe-grouped-gemm", group="moe")
    moe_shared_expert_gate: bool = opt(False, "Sigmoid gate on the shared experts (Qwen2-MoE).",
                                       group="moe")
    moe_router_bias_update_rate: float = opt(1e-3, "Step of the aux-loss-free expert bias.",
                                             type=float, group="moe")
    moe_token_dispatcher_type: str = opt("allgather", "Token dispatcher.",
                                         choices=["allgather", "alltoall"], group="moe")
    # Multi-token prediction (DeepSeek-V3)
    mtp_num_layers: int | None = opt(None, "Multi-token prediction modules after the last "
                                     "layer, module k predicting token t+k+1.", type=int,
                                     positive=True, group="mtp")
    mtp_loss_scaling_factor: float = opt(0.1, "Weight of the multi-token prediction loss "
                                         "(mean over its modules) in the training loss.",
                                         type=float, group="mtp")
    # Multi-latent attention
    multi_latent_attention: bool = opt(False, "Multi-latent attention (DeepSeek-V2).",
                                       group="mla")
    q_lora_rank: int | None = opt(None, "Query low-rank dimension.", type=int, group="mla")
    kv_lora_rank: int = opt(32, "Key/value low-rank dimension.", type=int, group="mla")
    qk_head_dim: int = opt(128, "Query/key head dimension without rope.", type=int,
                           group="mla")
    qk_pos_emb_head_dim: int = opt(64, "Query/key rope head dimension.", type=int, group="mla")
    v_head_dim: int = opt(128, "Value head dimension.", type=int, group="mla")
    mla_latent_layernorm: bool = opt(True, "Leave the query and key/value latents "
                                     "unnormalised, as Megatron-LM's multi-latent attention "
                                     "does without --qk-layernorm (its latent norms are "
                                     "identities then).", flag="--no-mla-latent-layernorm",
                                     group="mla")
    mla_latent_norm_epsilon: float | None = opt(
        None, "Epsilon of the latent norms (default: --norm-epsilon); DeepSeek's models "
        "keep 1e-6 there whatever their rms_norm_eps.", type=float, group="mla")

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
        """The MLP's activation; a GeLU is tanh-approximated under --openai-gelu or, as
        Megatron-Core's fused bias-GeLU kernel computes it, in a model with biases."""
        if self.swiglu:
            return "swiglu"
        if self.squared_relu:
            return "squared_relu"
        tanh = self.openai_gelu or (self.bias_gelu_fusion and self.add_bias_linear)
        return "gelu_tanh" if tanh else "gelu"


# Model settings added after checkpoints were first written, with the value the model of
# a checkpoint that does not record them computed with (not today's default).
UNRECORDED_VALUES = {"bias_gelu_fusion": False}


def derive_model(m: TransformerConfig, seq_length: int | None = None,
                 sequence_parallel: bool = False, cp_comm_type: str = "p2p") -> None:
    """Fill in the sizes Megatron derives from others (once `check_numbers` has passed
    them, since the derivations compute with them); the parallel settings the layers
    build with come from the run's layout."""
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
    if m.max_position_embeddings is None and seq_length is not None:
        m.max_position_embeddings = seq_length
    m.sequence_parallel, m.cp_comm_type = sequence_parallel, cp_comm_type


def moe_layer_pattern(model: TransformerConfig) -> list[bool]:
    """Which layers are MoE: --moe-layer-freq N (every N-th layer, from layer 0) or a
    pattern list such as ([0]+[1]*26), read without evaluating code."""
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


def check_model(m: TransformerConfig, seq_length: int) -> None:
    """Heads, positions, recompute and dropout settings that fit together."""
    if m.kv_channels is None:
        raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by "
                          f"--num-attention-heads {m.num_attention_heads}; change one or "
                          f"give --kv-channels")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                          f"--num-query-groups {m.num_query_groups}; pick a divisor")
    if m.position_embedding_type == "learned_absolute" and m.max_position_embeddings \
            and seq_length > m.max_position_embeddings:
        raise ConfigError(f"--seq-length {seq_length} exceeds --max-position-embeddings "
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


def check_tensor_parallel(m: TransformerConfig, tp: int, seq_length: int) -> None:
    """Sizes that `tp` tensor-parallel ranks split evenly."""
    if tp == 1:
        return
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
    if m.sequence_parallel and seq_length % tp:
        raise ConfigError(f"--seq-length {seq_length} is not divisible by "
                          f"--tensor-model-parallel-size {tp}, as --sequence-parallel "
                          f"needs")


def check_experts_and_mla(m: TransformerConfig, tp: int, ep: int, etp: int | None) -> None:
    """Experts and multi-latent attention: sizes that fit the layout."""
    if m.num_experts:
        check_moe_routing(m, ep)
        moe_layer_pattern(m)
        check_moe_experts(m, tp, tp if etp is None else etp)
    elif ep > 1:
        raise ConfigError("--expert-model-parallel-size > 1 needs --num-experts")
    if not m.multi_latent_attention:
        return
    dims = {"--qk-head-dim": m.qk_head_dim, "--qk-pos-emb-head-dim": m.qk_pos_emb_head_dim,
            "--v-head-dim": m.v_head_dim, "--kv-lora-rank": m.kv_lora_rank}
    if m.q_lora_rank is not None:
        dims["--q-lora-rank"] = m.q_lora_rank
    for flag, value in dims.items():
        if value <= 0:
            raise ConfigError(f"{flag} {value} must be positive with --multi-latent-attention")
    if m.rotary_percent != 1.0:
        raise ConfigError("--rotary-percent must be 1 with --multi-latent-attention (the "
                          "rope part has its own --qk-pos-emb-head-dim)")
    if m.qk_pos_emb_head_dim % 2:
        raise ConfigError(f"--qk-pos-emb-head-dim {m.qk_pos_emb_head_dim} must be even "
                          f"(rotary pairs)")
    if m.position_embedding_type not in ("rope", "yarn"):
        raise ConfigError("--multi-latent-attention needs --position-embedding-type rope")


def check_mtp(m: TransformerConfig, pp: int, cp: int) -> None:
    """Multi-token prediction: the layouts and settings its modules implement."""
    if not m.mtp_num_layers:
        return
    if cp > 1:
        raise ConfigError("--mtp-num-layers does not run with --context-parallel-size > 1")
    if pp > 1 and m.position_embedding_type == "learned_absolute":
        raise ConfigError("--mtp-num-layers with --pipeline-model-parallel-size > 1 needs "
                          "rotary positions (--position-embedding-type rope)")


BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "none")


def check_moe_config(config, tp_size: int = 1, ep_size: int = 1,
                     etp_size: int | None = None) -> None:
    """Refuse MoE settings the MoE layer cannot run, one line each."""
    check_moe_routing(config, ep_size)
    check_moe_experts(config, tp_size, tp_size if etp_size is None else etp_size)


def check_moe_routing(c, ep_size: int) -> None:
    """Experts that split over `ep_size` ranks, and top-k (and group) choices among them."""
    experts, k = c.num_experts, c.moe_router_topk
    if not experts or experts < 1:
        raise ConfigError(f"--num-experts must be a positive integer, got {experts!r}")
    if experts % ep_size:
        raise ConfigError(f"--num-experts {experts} is not divisible by "
                          f"--expert-model-parallel-size {ep_size}")
    if not 1 <= k <= experts:
        raise ConfigError(f"--moe-router-topk {k} must be between 1 and --num-experts "
                          f"{experts}")
    groups, group_topk = c.moe_router_num_groups, c.moe_router_group_topk
    if group_topk or groups:
        if not groups or not group_topk or experts % groups or not 1 <= group_topk <= groups:
            raise ConfigError("--moe-router-num-groups must divide --num-experts and "
                              "--moe-router-group-topk must be between 1 and the groups")
        if k > group_topk * (experts // groups):
            raise ConfigError(f"--moe-router-topk {k} is above the experts of "
                              f"--moe-router-group-topk {group_topk} groups "
                              f"({group_topk * (experts // groups)})")
        if c.moe_router_score_function == "sigmoid" and k < group_topk:
            raise ConfigError(f"--moe-router-topk {k} must be at least --moe-router-group-topk "
                              f"{group_topk} with sigmoid scores")


def check_moe_experts(c, tp_size: int, etp_size: int) -> None:
    """Expert and shared-expert sizes for the tensor-parallel sizes, and the router,
    capacity and dispatcher settings the layer implements."""
    k = c.moe_router_topk
    ffn = c.moe_ffn_hidden_size or c.ffn_hidden_size
    if not ffn:
        raise ConfigError("--moe-ffn-hidden-size is needed with --num-experts")
    if ffn % etp_size:
        raise ConfigError(f"--moe-ffn-hidden-size {ffn} is not divisible by expert "
                          f"tensor-parallel size {etp_size}")
    shared = c.moe_shared_expert_intermediate_size
    if shared is not None and (shared <= 0 or shared % tp_size):
        raise ConfigError(f"--moe-shared-expert-intermediate-size {shared} must be a positive "
                          f"multiple of --tensor-model-parallel-size {tp_size}")
    if c.moe_shared_expert_gate and not shared:
        raise ConfigError("--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size")
    if c.add_bias_linear:
        raise ConfigError("MoE layers have no linear biases: add --disable-bias-linear")
    if c.moe_router_load_balancing_type not in BALANCING_TYPES:
        raise ConfigError(f"--moe-router-load-balancing-type {c.moe_router_load_balancing_type} "
                          f"is not supported; use aux_loss, seq_aux_loss or none")
    if c.moe_router_score_function not in ("softmax", "sigmoid"):
        raise ConfigError(f"--moe-router-score-function {c.moe_router_score_function}: use "
                          f"softmax or sigmoid")
    if (k == 1 and c.moe_router_score_function == "softmax"
            and not c.moe_router_pre_softmax):
        raise ConfigError("--moe-router-topk 1 needs --moe-router-pre-softmax (softmax over "
                          "one logit has no gradient)")
    if c.moe_router_enable_expert_bias and c.moe_router_score_function != "sigmoid":
        raise ConfigError("--moe-router-enable-expert-bias needs "
                          "--moe-router-score-function sigmoid")
    factor = c.moe_expert_capacity_factor
    if c.moe_pad_expert_input_to_capacity and (factor is None or factor < 0):
        raise ConfigError("--moe-pad-expert-input-to-capacity needs "
                          "--moe-expert-capacity-factor")
    if c.moe_token_drop_policy not in ("probs", "position"):
        raise ConfigError(f"--moe-token-drop-policy {c.moe_token_drop_policy}: use probs or "
                          f"position")
    if c.moe_token_dispatcher_type not in ("alltoall", "allgather"):
        raise ConfigError(f"--moe-token-dispatcher-type {c.moe_token_dispatcher_type}: use "
                          f"alltoall or allgather")
