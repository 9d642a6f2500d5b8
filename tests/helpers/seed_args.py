"""Argument lists of the training commands in the users' documents.

The documents Paratron is built from show Megatron-LM GPT-2 pretraining
scripts, Qwen2.5/Qwen3 configurations and training scripts, and the
DeepSeek-V2 (Pai-Megatron-Patch) pretraining arguments.  Each entry of
``SEED_ARGS`` is the list of tokens the training script (``pretrain_gpt.py``,
``pretrain_deepseek.py``, ...) receives after its own name, kept here as a
test of flag compatibility: Paratron must accept these flags as spelled.

Conventions
-----------
* Launcher options (torchrun's ``--nproc_per_node``, ``--nnodes``,
  ``--node_rank``, ``--master_addr``, ``--master_port``) and the options of
  other programs (data preprocessing, checkpoint conversion, evaluation,
  installers, job schedulers) are not included.
* Shell variables and bash arrays (``GPT_MODEL_ARGS``, ``TRAINING_ARGS``,
  ``DATA_ARGS``, ``MODEL_ARGS``, ...) are expanded in the order the command
  uses them; paths are replaced by short placeholders and numeric variables
  by the values the documents assign to them.  Shell comments and
  commented-out array entries are left out.
* Flag spellings (dashes, ``--flag=value`` forms) are kept exactly.
* Names in ``PARTIAL`` are option groups that the documents show on their
  own, to be added to a full training command; they are not complete
  command lines.
* ``SEED_SCRIPTS`` names the script each list is given to.  The ``002_``
  lists belong to a stand-alone Megatron-Core example script whose own
  flags (``--batch-size``, ``--epochs``, ...) are not Megatron-LM flags.

Run ``python tests/seed_args.py`` to print the number of lists and flags.
"""

# ---------------------------------------------------------------------------
# 004: Megatron-LM GPT-2 pretraining (bash arrays expanded into torchrun).
# The scripts also carry commented-out "--mock-data" and
# "--transformer_impl transformer_engine" entries; they are not passed.
# ---------------------------------------------------------------------------

_GPT2_SMALL_MODEL = [
    "--num-layers", "12",
    "--hidden-size", "768",
    "--num-attention-heads", "12",
    "--seq-length", "512",
    "--max-position-embeddings", "512",
    "--attention-backend", "auto",
]


def _gpt2_small_training(micro_batch_size):
    return [
        "--micro-batch-size", micro_batch_size,
        "--global-batch-size", "16",
        "--train-iters", "1000",
        "--weight-decay", "0.1",
        "--adam-beta1", "0.9",
        "--adam-beta2", "0.95",
        "--init-method-std", "0.006",
        "--clip-grad", "1.0",
        "--fp16",
        "--lr", "0.0001",
        "--lr-decay-style", "cosine",
        "--min-lr", "0.00001",
        "--lr-warmup-fraction", ".01",
    ]


def _gpt2_small_parallel(tp):
    return [
        "--tensor-model-parallel-size", tp,
        "--pipeline-model-parallel-size", "1",
    ]


def _gpt2_data(data_path, vocab_file, merge_file):
    return [
        "--data-path", data_path,
        "--vocab-file", vocab_file,
        "--merge-file", merge_file,
        "--split", "949,50,1",
    ]


def _gpt2_small_eval_and_logging(checkpoint_path):
    return [
        "--log-interval", "10",
        "--save-interval", "100",
        "--eval-interval", "50",
        "--save", checkpoint_path,
        "--load", checkpoint_path,
        "--eval-iters", "5",
    ]


def _gpt2_small(micro_batch_size, tp, data_path, checkpoint_path):
    return (
        list(_GPT2_SMALL_MODEL)
        + _gpt2_small_training(micro_batch_size)
        + _gpt2_small_parallel(tp)
        + _gpt2_data(
            data_path,
            "/tokenizers/gpt2/vocab.json",
            "/tokenizers/gpt2/merges.txt",
        )
        + _gpt2_small_eval_and_logging(checkpoint_path)
    )


_GPT3_175B_EXAMPLE = [
    # GPT_MODEL_ARGS
    "--num-layers", "96",
    "--hidden-size", "12288",
    "--num-attention-heads", "96",
    "--seq-length", "2048",
    "--max-position-embeddings", "2048",
    "--attention-backend", "auto",
    # TRAINING_ARGS
    "--micro-batch-size", "1",
    "--global-batch-size", "1536",
    "--rampup-batch-size", "16", "16", "5859375",
    "--train-iters", "500000",
    "--weight-decay", "0.1",
    "--adam-beta1", "0.9",
    "--adam-beta2", "0.95",
    "--init-method-std", "0.006",
    "--clip-grad", "1.0",
    "--fp16",
    "--lr", "6.0e-5",
    "--lr-decay-style", "cosine",
    "--min-lr", "6.0e-6",
    "--lr-warmup-fraction", ".001",
    "--lr-decay-iters", "430000",
    # MODEL_PARALLEL_ARGS
    "--tensor-model-parallel-size", "8",
    "--pipeline-model-parallel-size", "16",
    # DATA_ARGS
    "--data-path", "/data/my-gpt2_text_document",
    "--vocab-file", "/data/gpt2-vocab.json",
    "--merge-file", "/data/gpt2-merges.txt",
    "--split", "949,50,1",
    # EVAL_AND_LOGGING_ARGS
    "--log-interval", "100",
    "--save-interval", "10000",
    "--eval-interval", "1000",
    "--save", "/ckpt/run1",
    "--load", "/ckpt/run1",
    "--eval-iters", "10",
    "--tensorboard-dir", "/logs/tensorboard",
]


# ---------------------------------------------------------------------------
# 001: Qwen2.5 / Qwen3 with Megatron-Core.
# ---------------------------------------------------------------------------

_QWEN25_7B_MODEL_ARGS = [
    "--bf16",
    "--use-mcore-models",
    "--transformer-impl", "transformer_engine",
    "--num-layers", "28",
    "--hidden-size", "3584",
    "--ffn-hidden-size", "18944",
    "--num-attention-heads", "28",
    "--kv-channels", "128",
    "--max-position-embeddings", "32768",
    "--group-query-attention",
    "--num-query-groups", "4",
    "--normalization", "RMSNorm",
    "--swiglu",
    "--disable-bias-linear",
    "--add-qkv-bias",
    "--position-embedding-type", "rope",
    "--rotary-percent", "1.0",
    "--rotary-base", "1000000",
    "--no-rope-fusion",
    "--tokenizer-type", "HuggingFaceTokenizer",
    "--padded-vocab-size", "152064",
    "--make-vocab-size-divisible-by", "1",
    "--untie-embeddings-and-output-weights",
    "--no-masked-softmax-fusion",
    "--no-bias-swiglu-fusion",
]

_QWEN3_8B_MODEL_OPTIONS = [
    "--num-layers", "36",
    "--hidden-size", "4096",
    "--ffn-hidden-size", "12288",
    "--num-attention-heads", "32",
    "--kv-channels", "128",
    "--max-position-embeddings", "40960",
    "--group-query-attention",
    "--num-query-groups", "8",
    "--normalization", "RMSNorm",
    "--norm-epsilon", "1e-6",
    "--qk-layernorm",
    "--swiglu",
    "--disable-bias-linear",
    "--position-embedding-type", "rope",
    "--rotary-percent", "1.0",
    "--rotary-base", "1000000",
    "--use-rotary-position-embeddings",
    "--tokenizer-type", "HuggingFaceTokenizer",
    "--tokenizer-model", "Qwen/Qwen3-8B",
    "--vocab-size", "151936",
    "--make-vocab-size-divisible-by", "128",
    "--untie-embeddings-and-output-weights",
    "--no-masked-softmax-fusion",
    "--attention-softmax-in-fp32",
]

# train_qwen.sh: COMMON_ARGS, TRAINING_ARGS, OPTIMIZATION_ARGS, DATA_ARGS,
# CHECKPOINT_ARGS with TP=2, PP=1.
_QWEN25_7B_TRAIN_SCRIPT = [
    # COMMON_ARGS
    "--tensor-model-parallel-size", "2",
    "--pipeline-model-parallel-size", "1",
    "--use-mcore-models",
    "--transformer-impl", "transformer_engine",
    "--bf16",
    "--num-layers", "28",
    "--hidden-size", "3584",
    "--ffn-hidden-size", "18944",
    "--num-attention-heads", "28",
    "--kv-channels", "128",
    "--seq-length", "4096",
    "--max-position-embeddings", "32768",
    "--group-query-attention",
    "--num-query-groups", "4",
    "--normalization", "RMSNorm",
    "--swiglu",
    "--disable-bias-linear",
    "--add-qkv-bias",
    "--position-embedding-type", "rope",
    "--rotary-percent", "1.0",
    "--rotary-base", "1000000",
    "--tokenizer-type", "HuggingFaceTokenizer",
    "--tokenizer-model", "/models/qwen2.5-7b-hf",
    "--padded-vocab-size", "152064",
    "--make-vocab-size-divisible-by", "1",
    "--untie-embeddings-and-output-weights",
    "--no-masked-softmax-fusion",
    "--attention-softmax-in-fp32",
    # TRAINING_ARGS
    "--micro-batch-size", "1",
    "--global-batch-size", "64",
    "--train-iters", "10000",
    "--lr", "1e-5",
    "--min-lr", "1e-6",
    "--lr-warmup-iters", "100",
    "--lr-decay-style", "cosine",
    "--weight-decay", "0.01",
    "--clip-grad", "1.0",
    "--adam-beta1", "0.9",
    "--adam-beta2", "0.95",
    "--adam-eps", "1e-8",
    # OPTIMIZATION_ARGS
    "--use-distributed-optimizer",
    "--sequence-parallel",
    "--recompute-granularity", "selective",
    "--recompute-modules", "core_attn",
    # DATA_ARGS
    "--data-path", "/data/qwen_text_document",
    "--split", "99,1,0",
    # CHECKPOINT_ARGS
    "--load", "/ckpt/qwen2.5-7b-megatron",
    "--save", "/ckpt/qwen2.5-7b-megatron",
    "--save-interval", "500",
    "--ckpt-format", "torch_dist",
    "--finetune",
]

# Full continued-pretraining script (TP=2, PP=1, SEQ_LENGTH=4096,
# MICRO_BATCH_SIZE=1, GLOBAL_BATCH_SIZE=64, TRAIN_ITERS=10000).
_QWEN25_7B_CONTINUED_PRETRAIN = [
    "--tensor-model-parallel-size", "2",
    "--pipeline-model-parallel-size", "1",
    "--use-mcore-models",
    "--transformer-impl", "transformer_engine",
    "--num-layers", "28",
    "--hidden-size", "3584",
    "--ffn-hidden-size", "18944",
    "--num-attention-heads", "28",
    "--kv-channels", "128",
    "--seq-length", "4096",
    "--max-position-embeddings", "32768",
    "--group-query-attention",
    "--num-query-groups", "4",
    "--normalization", "RMSNorm",
    "--swiglu",
    "--disable-bias-linear",
    "--add-qkv-bias",
    "--position-embedding-type", "rope",
    "--rotary-percent", "1.0",
    "--rotary-base", "1000000",
    "--untie-embeddings-and-output-weights",
    "--tokenizer-type", "HuggingFaceTokenizer",
    "--tokenizer-model", "/models/qwen2.5-7b-hf",
    "--padded-vocab-size", "152064",
    "--make-vocab-size-divisible-by", "1",
    "--micro-batch-size", "1",
    "--global-batch-size", "64",
    "--train-iters", "10000",
    "--lr", "1e-5",
    "--min-lr", "1e-6",
    "--lr-warmup-iters", "100",
    "--lr-decay-style", "cosine",
    "--weight-decay", "0.01",
    "--clip-grad", "1.0",
    "--adam-beta1", "0.9",
    "--adam-beta2", "0.95",
    "--bf16",
    "--use-distributed-optimizer",
    "--sequence-parallel",
    "--recompute-granularity", "selective",
    "--recompute-modules", "core_attn",
    "--attention-backend", "flash",
    "--no-masked-softmax-fusion",
    "--attention-softmax-in-fp32",
    "--data-path", "/data/qwen_text_document",
    "--split", "99,1,0",
    "--load", "/ckpt/qwen2.5-7b-megatron",
    "--save", "/output/qwen2.5-7b",
    "--save-interval", "500",
    "--ckpt-format", "torch_dist",
    "--finetune",
    "--no-load-optim",
    "--no-load-rng",
    "--log-interval", "10",
    "--tensorboard-dir", "/output/qwen2.5-7b/tensorboard",
    "--log-throughput",
]


# ---------------------------------------------------------------------------
# 000 / 003: DeepSeek-V2-Lite (A2.4B) with Pai-Megatron-Patch.
# ---------------------------------------------------------------------------

# The VS Code launch.json "args" after "pretrain_deepseek.py"
# (TP=1, PP=4, CP=1, EP=2, sequence length 1024, selective recompute).
_DEEPSEEK_V2_LITE_LAUNCH_JSON = [
    "--save", "/output/ds2-pretrain/checkpoint/run1",
    "--lr", "1e-5",
    "--min-lr", "1e-6",
    "--lr-decay-style", "cosine",
    "--weight-decay", "0.1",
    "--adam-beta1", "0.9",
    "--adam-beta2", "0.95",
    "--clip-grad", "1.0",
    "--init-method-std", "0.008",
    "--attention-dropout", "0.0",
    "--hidden-dropout", "0.0",
    "--lr-decay-iters", "122070",
    "--lr-warmup-iters", "1",
    "--train-iters", "122070",
    "--micro-batch-size", "1",
    "--global-batch-size", "8",
    "--num-layers", "27",
    "--hidden-size", "2048",
    "--num-attention-heads", "16",
    "--ffn-hidden-size", "10944",
    "--seq-length", "1024",
    "--max-position-embeddings", "1024",
    "--max-padding-length", "1024",
    "--log-interval", "1",
    "--log-throughput",
    "--eval-interval", "10000",
    "--eval-iters", "10",
    "--save-interval", "100000",
    "--tensorboard-queue-size", "1",
    "--tensorboard-dir", "/output/ds2-pretrain/tensorboard/run1",
    "--log-timers-to-tensorboard",
    "--log-validation-ppl-to-tensorboard",
    "--tensor-model-parallel-size", "1",
    "--pipeline-model-parallel-size", "4",
    "--context-parallel-size", "1",
    "--no-load-optim",
    "--no-load-rng",
    "--num-workers", "8",
    "--extra-vocab-size", "2400",
    "--patch-tokenizer-type", "DeepSeekV2Tokenizer",
    "--swiglu",
    "--normalization", "RMSNorm",
    "--norm-epsilon", "1e-6",
    "--use-rotary-position-embeddings",
    "--no-bias-swiglu-fusion",
    "--no-rope-fusion",
    "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights",
    "--disable-bias-linear",
    "--rotary-base", "10000",
    "--rotary-scaling-factor", "40",
    "--no-save-optim",
    "--kv-channels", "128",
    "--qk-layernorm",
    "--multi-latent-attention",
    "--ckpt-format", "torch",
    "--data-path", "/data/mmap_deepseekv2_datasets_text_document",
    "--split", "99,1,0",
    "--dataset", "MMAP",
    "--bf16",
    "--load", "/ckpt/DeepSeek-V2-Lite-to-mcore-tp1-pp4-ep2",
    "--transformer-impl", "transformer_engine",
    "--recompute-activations",
    "--use-distributed-optimizer",
    "--moe-ffn-hidden-size", "1408",
    "--moe-router-topk", "6",
    "--num-experts", "64",
    "--moe-layer-freq", "1",
    "--moe-aux-loss-coeff", "1e-2",
    "--moe-shared-expert-intermediate-size", "2816",
    "--expert-model-parallel-size", "2",
    "--kv-lora-rank", "512",
    "--qk-head-dim", "128",
    "--qk-pos-emb-head-dim", "64",
    "--v-head-dim", "128",
    "--moe-router-load-balancing-type", "aux_loss",
    "--train-mode", "pretrain",
    "--decoder-first-pipeline-num-layers", "6",
]


def _deepseek_v2_lite(
    *,
    output,
    load,
    mbs,
    gbs,
    lr,
    min_lr,
    seq_len,
    pad_len,
    tp,
    pp,
    cp,
    ep,
    sp,
    do,
    sft,
    ac,
    save_interval,
    train_iters,
    warmup_iters,
    decay_iters,
    dataset_option,
    first_stage_layers=None,
):
    """Arguments the run_mcore_deepseek.sh launcher builds for the A2.4B model.

    The launcher's positional parameters are applied to the same option
    template the launch.json list above was taken from.
    """
    args = [
        "--save", output + "/checkpoint/run1",
        "--lr", lr,
        "--min-lr", min_lr,
        "--lr-decay-style", "cosine",
        "--weight-decay", "0.1",
        "--adam-beta1", "0.9",
        "--adam-beta2", "0.95",
        "--clip-grad", "1.0",
        "--init-method-std", "0.008",
        "--attention-dropout", "0.0",
        "--hidden-dropout", "0.0",
        "--lr-decay-iters", decay_iters,
        "--lr-warmup-iters", warmup_iters,
        "--train-iters", train_iters,
        "--micro-batch-size", mbs,
        "--global-batch-size", gbs,
        "--num-layers", "27",
        "--hidden-size", "2048",
        "--num-attention-heads", "16",
        "--ffn-hidden-size", "10944",
        "--seq-length", seq_len,
        "--max-position-embeddings", seq_len,
        "--max-padding-length", pad_len,
        "--log-interval", "1",
        "--log-throughput",
        "--eval-interval", "10000",
        "--eval-iters", "10",
        "--save-interval", save_interval,
        "--tensorboard-queue-size", "1",
        "--tensorboard-dir", output + "/tensorboard/run1",
        "--log-timers-to-tensorboard",
        "--log-validation-ppl-to-tensorboard",
        "--tensor-model-parallel-size", tp,
        "--pipeline-model-parallel-size", pp,
        "--context-parallel-size", cp,
        "--no-load-optim",
        "--no-load-rng",
        "--num-workers", "8",
        "--extra-vocab-size", "2400",
        "--patch-tokenizer-type", "DeepSeekV2Tokenizer",
        "--swiglu",
        "--normalization", "RMSNorm",
        "--norm-epsilon", "1e-6",
        "--use-rotary-position-embeddings",
        "--no-bias-swiglu-fusion",
        "--no-rope-fusion",
        "--position-embedding-type", "rope",
        "--untie-embeddings-and-output-weights",
        "--disable-bias-linear",
        "--rotary-base", "10000",
        "--rotary-scaling-factor", "40",
        "--no-save-optim",
        "--kv-channels", "128",
        "--qk-layernorm",
        "--multi-latent-attention",
        "--ckpt-format", "torch",
    ]
    args += dataset_option
    args += ["--bf16"]
    args += ["--load", load]
    args += ["--transformer-impl", "transformer_engine"]
    if ac == "sel":
        args += ["--recompute-activations"]
    if do:
        args += ["--use-distributed-optimizer"]
    if sp and int(tp) > 1:
        args += ["--sequence-parallel"]
    args += [
        "--moe-ffn-hidden-size", "1408",
        "--moe-router-topk", "6",
        "--num-experts", "64",
        "--moe-layer-freq", "1",
        "--moe-aux-loss-coeff", "1e-2",
        "--moe-shared-expert-intermediate-size", "2816",
        "--expert-model-parallel-size", ep,
        "--kv-lora-rank", "512",
        "--qk-head-dim", "128",
        "--qk-pos-emb-head-dim", "64",
        "--v-head-dim", "128",
        "--moe-router-load-balancing-type", "aux_loss",
    ]
    if sft:
        args += ["--eod-mask-loss", "--calculate-per-token-loss", "--train-mode", "finetune"]
    else:
        args += ["--train-mode", "pretrain"]
    if first_stage_layers is not None:
        args += ["--decoder-first-pipeline-num-layers", first_stage_layers]
    return args


def _idxmap(path):
    return ["--data-path", path, "--split", "99,1,0", "--dataset", "MMAP"]


def _raw_json(train_path, valid_path):
    return [
        "--train-data-path", train_path,
        "--valid-data-path", valid_path,
        "--dataloader-type", "cyclic",
        "--dataset", "JSON-SFT",
    ]


# ---------------------------------------------------------------------------
# The argument lists.
# ---------------------------------------------------------------------------

SEED_ARGS: dict[str, list[str]] = {
    # --- 000: DeepSeek-V2-Lite debugging (launch.json and shell launcher) ---
    "000_deepseek_v2_lite_launch_json": list(_DEEPSEEK_V2_LITE_LAUNCH_JSON),
    # run_mcore_deepseek.sh dsw A2.4B 1 8 1e-5 1e-6 1024 1024 bf16 1 4 1 2
    #   true true true false sel false 100000 <data> <data> <ckpt>
    #   1000000000 10000 <output>, with MP_PP0_LAYERS=6
    # (1e9 tokens / 8 / 1024 = 122070 iterations, 10000 / 8 / 1024 = 1 warmup).
    "000_deepseek_v2_lite_run_mcore_sh": _deepseek_v2_lite(
        output="/output/ds2-pretrain",
        load="/ckpt/DeepSeek-V2-Lite-to-mcore-tp1-pp4-ep2",
        mbs="1", gbs="8", lr="1e-5", min_lr="1e-6",
        seq_len="1024", pad_len="1024",
        tp="1", pp="4", cp="1", ep="2",
        sp=True, do=True, sft=False, ac="sel",
        save_interval="100000",
        train_iters="122070", warmup_iters="1", decay_iters="122070",
        dataset_option=_idxmap("/data/mmap_deepseekv2_datasets_text_document"),
        first_stage_layers="6",
    ),
    # --- 001: Qwen2.5 / Qwen3 ---
    "001_qwen25_7b": list(_QWEN25_7B_CONTINUED_PRETRAIN),
    "001_qwen25_7b_train_script": list(_QWEN25_7B_TRAIN_SCRIPT),
    "001_qwen25_7b_model_args": list(_QWEN25_7B_MODEL_ARGS),
    "001_qwen3_8b": list(_QWEN3_8B_MODEL_OPTIONS),
    "001_qwen_moe_args": [
        "--num-experts", "64",
        "--moe-router-topk", "8",
        "--moe-grouped-gemm",
        "--moe-token-dispatcher-type", "alltoall",
        "--moe-router-load-balancing-type", "aux_loss",
        "--moe-aux-loss-coeff", "0.01",
        "--expert-model-parallel-size", "8",
    ],
    "001_blended_data_path": [
        "--data-path",
        "0.7", "/data/dataset1_text_document",
        "0.2", "/data/dataset2_text_document",
        "0.1", "/data/dataset3_text_document",
    ],
    "001_data_path_config": ["--data-path-config", "data_blend.yaml"],
    "001_sft_data": ["--sft", "--data-path", "/data/sft_data.jsonl"],
    "001_selective_recompute": [
        "--recompute-granularity", "selective",
        "--recompute-modules", "core_attn",
    ],
    "001_distributed_optimizer": [
        "--use-distributed-optimizer",
        "--overlap-grad-reduce",
        "--overlap-param-gather",
    ],
    "001_sequence_parallel": ["--sequence-parallel"],
    "001_fp8": [
        "--fp8", "e4m3",
        "--fp8-recipe", "tensorwise",
        "--transformer-impl", "transformer_engine",
    ],
    "001_context_parallel": [
        "--context-parallel-size", "2",
        "--cp-comm-type", "p2p",
    ],
    "001_flash_attention": ["--attention-backend", "flash"],
    "001_oom_options": [
        "--micro-batch-size", "1",
        "--recompute-granularity", "selective",
        "--use-distributed-optimizer",
        "--seq-length", "2048",
    ],
    "001_checkpoint_load_options": [
        "--tensor-model-parallel-size", "2",
        "--pipeline-model-parallel-size", "1",
        "--use-checkpoint-args",
        "--no-load-optim",
        "--no-load-rng",
        "--ckpt-format", "torch_dist",
    ],
    # --- 002: megatron_core_training_example.py ---
    "002_example_basic": [
        "--tensor-model-parallel-size=2",
        "--pipeline-model-parallel-size=1",
    ],
    "002_example_tp2": [
        "--tensor-model-parallel-size=2",
        "--pipeline-model-parallel-size=1",
        "--batch-size=16",
        "--epochs=3",
        "--train-steps=1000",
        "--sequence-parallel",
        "--fp16",
    ],
    "002_example_pp2": [
        "--tensor-model-parallel-size=1",
        "--pipeline-model-parallel-size=2",
        "--batch-size=16",
        "--epochs=3",
        "--train-steps=1000",
        "--fp16",
    ],
    "002_example_tp2_pp2": [
        "--tensor-model-parallel-size=2",
        "--pipeline-model-parallel-size=2",
        "--batch-size=16",
        "--epochs=3",
        "--train-steps=1000",
        "--sequence-parallel",
        "--fp16",
    ],
    "002_example_debug_small": [
        "--tensor-model-parallel-size=2",
        "--pipeline-model-parallel-size=1",
        "--num-layers=2",
        "--hidden-size=128",
        "--num-attention-heads=4",
        "--batch-size=4",
        "--train-steps=10",
        "--dataset-size=100",
        "--monitor-memory-continuously",
    ],
    "002_memory_monitor_options": [
        "--monitor-memory-continuously",
        "--memory-monitor-interval=0.5",
    ],
    "002_short_sequence_options": ["--seq-length=128", "--batch-size=4"],
    "002_example_multinode": [
        "--tensor-model-parallel-size=2",
        "--pipeline-model-parallel-size=2",
        "--batch-size=16",
        "--epochs=3",
        "--train-steps=1000",
        "--init-method=tcp://10.0.0.1:29500",
        "--world-size=8",
        "--fp16",
    ],
    "002_example_slurm": [
        "--tensor-model-parallel-size=2",
        "--pipeline-model-parallel-size=2",
        "--batch-size=16",
        "--epochs=3",
        "--train-steps=1000",
        "--init-method=tcp://10.0.0.1:29500",
        "--world-size=8",
        "--fp16",
    ],
    "002_example_single_gpu": [
        "--tensor-model-parallel-size=1",
        "--pipeline-model-parallel-size=1",
    ],
    "002_example_multinode_smoke": [
        "--tensor-model-parallel-size=2",
        "--pipeline-model-parallel-size=1",
        "--num-layers=2",
        "--hidden-size=128",
        "--train-steps=10",
        "--batch-size=4",
    ],
    # --- 003: DeepSeek-V2-MoE best practice (run_mcore_deepseek.sh) ---
    # Continued pretraining: dsw A2.4B 1 8 1e-5 1e-6 128 128 bf16 2 1 1 4
    #   true true true false false false 100000 <data> <data> <ckpt>
    #   10000 100 <output>  (10000 tokens / 8 / 128 = 9 iterations, 0 warmup).
    "003_deepseek_pretrain": _deepseek_v2_lite(
        output="/output/ds2-pretrain",
        load="/ckpt/DeepSeek-V2-Lite-to-mcore-tp2-pp1-ep4",
        mbs="1", gbs="8", lr="1e-5", min_lr="1e-6",
        seq_len="128", pad_len="128",
        tp="2", pp="1", cp="1", ep="4",
        sp=True, do=True, sft=False, ac="false",
        save_interval="100000",
        train_iters="9", warmup_iters="0", decay_iters="9",
        dataset_option=_idxmap("/data/mmap_deepseekv2_datasets_text_document"),
    ),
    # Instruction tuning on an idxmap dataset: same call with SFT=true,
    # 10000 training iterations and 100 warmup iterations.
    "003_deepseek_sft_idxmap": _deepseek_v2_lite(
        output="/output/ds2-finetune",
        load="/ckpt/ds2-pretrained",
        mbs="1", gbs="8", lr="1e-5", min_lr="1e-6",
        seq_len="128", pad_len="128",
        tp="2", pp="1", cp="1", ep="4",
        sp=True, do=True, sft=True, ac="false",
        save_interval="100000",
        train_iters="10000", warmup_iters="100", decay_iters="9900",
        dataset_option=_idxmap("/data/sft_text_document"),
    ),
    # Instruction tuning on raw JSON (MP_DATASET_TYPE=raw), TP=PP=CP=EP=1.
    "003_deepseek_sft_raw_json": _deepseek_v2_lite(
        output="/output/ds2-finetune",
        load="/ckpt/DeepSeek-V2-Lite-to-mcore-tp2-pp1-ep4",
        mbs="1", gbs="8", lr="1e-5", min_lr="1e-6",
        seq_len="128", pad_len="128",
        tp="1", pp="1", cp="1", ep="1",
        sp=True, do=True, sft=True, ac="false",
        save_interval="100000",
        train_iters="10000", warmup_iters="100", decay_iters="9900",
        dataset_option=_raw_json(
            "/data/alpaca_zh-train.json", "/data/alpaca_zh-train.json"
        ),
    ),
    # --- 004: Megatron-LM GPT-2 pretraining ---
    "004_gpt2_single_gpu": _gpt2_small(
        "1", "1", "/data/oscar-en-10k-meg-gpt_text_document", "/ckpt/GPT2_pretrain_WS1"
    ),
    "004_gpt2_two_gpu": _gpt2_small(
        "2", "2", "/data/oscar-en-10k-meg-gpt_text_document", "/ckpt/GPT2_pretrain_WS2"
    ),
    "004_gpt2_docker_single_gpu": _gpt2_small(
        "1", "1", "/data/merged_json_text_document", "/ckpt/GPT2_pretrain_WS1"
    ),
    "004_gpt2_custom_data_two_gpu": _gpt2_small(
        "2", "2", "/data/merged_json_text_document", "/ckpt/GPT2_pretrain_WS2"
    ),
    "004_gpt3_175b_example": list(_GPT3_175B_EXAMPLE),
}

# Option groups shown on their own rather than as complete command lines.
PARTIAL: frozenset[str] = frozenset({
    "001_qwen25_7b_model_args",
    "001_qwen3_8b",
    "001_qwen_moe_args",
    "001_blended_data_path",
    "001_data_path_config",
    "001_sft_data",
    "001_selective_recompute",
    "001_distributed_optimizer",
    "001_sequence_parallel",
    "001_fp8",
    "001_context_parallel",
    "001_flash_attention",
    "001_oom_options",
    "001_checkpoint_load_options",
    "002_memory_monitor_options",
    "002_short_sequence_options",
})

# The training script each list is passed to.
SEED_SCRIPTS: dict[str, str] = {}
for _name in SEED_ARGS:
    if _name.startswith(("000_", "003_")):
        SEED_SCRIPTS[_name] = "pretrain_deepseek.py"
    elif _name.startswith("002_"):
        SEED_SCRIPTS[_name] = "megatron_core_training_example.py"
    else:
        SEED_SCRIPTS[_name] = "pretrain_gpt.py"
del _name

SEED_FLAGS: set[str] = {
    token.split("=", 1)[0]
    for tokens in SEED_ARGS.values()
    for token in tokens
    if token.startswith("--")
}


if __name__ == "__main__":
    print(f"{len(SEED_ARGS)} argument lists, {len(SEED_FLAGS)} distinct flags")
