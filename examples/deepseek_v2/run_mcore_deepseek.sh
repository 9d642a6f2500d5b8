#!/usr/bin/env bash
# Pai-Megatron-Patch's DeepSeek-V2 launcher, on Paratron: the same 26 positional
# arguments and MP_* environment variables, mapped onto the same Megatron flags.
#
#   run_mcore_deepseek.sh ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN \
#       PAD_LEN PR TP PP CP EP SP DO FL SFT AC OPTIMIZER_OFFLOAD SAVE_INTERVAL \
#       DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH \
#       TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS OUTPUT_BASEPATH
#
#   ENV                dsw: this machine; dlc: one node of a multi-node job (WORLD_SIZE =
#                      nodes, RANK = node rank, KUBERNETES_CONTAINER_RESOURCE_GPU = GPUs per
#                      node, MASTER_ADDR/MASTER_PORT as PAI-DLC sets them)
#   MODEL_SIZE         A2.4B (DeepSeek-V2-Lite), A21B (DeepSeek-V2), or tiny (the CPU
#                      example's 3-layer model built by examples/tiny_hf_model.py)
#   BATCH_SIZE         micro-batch size;   GLOBAL_BATCH_SIZE  samples per step
#   LR MIN_LR          peak and final learning rate (cosine decay)
#   SEQ_LEN PAD_LEN    sequence length; padding length of SFT samples
#   PR                 fp16 | bf16 | fp8
#   TP PP CP EP        tensor, pipeline, context, expert parallel sizes
#   SP DO FL SFT       true|false: sequence parallel, distributed optimizer, flash
#                      attention (always on in Paratron: SDPA picks it), fine-tuning
#   AC                 sel | full | offload | none (false is read as none)
#   OPTIMIZER_OFFLOAD  false | static | auto
#   SAVE_INTERVAL      iterations between checkpoints
#   DATASET_PATH VALID_DATASET_PATH  idxmap prefix (or, with MP_DATASET_TYPE=raw, the
#                      training and validation JSON files)
#   PRETRAIN_CHECKPOINT_PATH  Paratron checkpoint to start from (paratron convert writes
#                      one from Hugging Face weights), or none
#   TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS  tokens when pretraining (divided by
#                      GLOBAL_BATCH_SIZE x SEQ_LEN), iterations when SFT=true
#   OUTPUT_BASEPATH    checkpoint/, tensorboard/ and log/ go here
#
# Environment: MP_DATASET_TYPE idxmap|raw (idxmap), MP_AC_LAYERS (1: layers recomputed
# or offloaded with AC=full|offload), MP_PP0_LAYERS (layers on the first pipeline stage),
# MP_NUM_WORKERS (data-loader workers per process, 8; 0 suits CPU runs),
# GPUS_PER_NODE (processes per node; default the GPU count, or TP x PP x CP x EP
# processes on a machine without GPUs), MASTER_PORT, DRY_RUN=1 (print the command
# instead of running it), PYTHON.
set -euo pipefail

PROG=run_mcore_deepseek.sh
fail() { echo "$PROG: error: $*" >&2; exit 2; }
[ $# -eq 26 ] || fail "expected 26 arguments, got $#; see the usage at the top of this script"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$(dirname "$HERE")")"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

ENV=$1; MODEL_SIZE=$2; BATCH_SIZE=$3; GLOBAL_BATCH_SIZE=$4; LR=$5; MIN_LR=$6
SEQ_LEN=$7; PAD_LEN=$8; PR=$9; TP=${10}; PP=${11}; CP=${12}; EP=${13}
SP=${14}; DO=${15}; FL=${16}; SFT=${17}; AC=${18}; OPTIMIZER_OFFLOAD=${19}
SAVE_INTERVAL=${20}; DATASET_PATH=${21}; VALID_DATASET_PATH=${22}
PRETRAIN_CHECKPOINT_PATH=${23}; TRAIN_TOKENS_OR_ITERS=${24}; WARMUP_TOKENS_OR_ITERS=${25}
OUTPUT_BASEPATH=${26}
MP_DATASET_TYPE="${MP_DATASET_TYPE:-idxmap}"
MP_AC_LAYERS="${MP_AC_LAYERS:-1}"
MP_NUM_WORKERS="${MP_NUM_WORKERS:-8}"

one_of() {  # one_of NAME VALUE CHOICE...
    local name=$1 value=$2; shift 2
    for choice in "$@"; do [ "$value" = "$choice" ] && return 0; done
    fail "$name=$value: use one of $*"
}
is_count() { [[ "$2" =~ ^[0-9]+$ ]] || fail "$1=$2 must be a whole number"; }
one_of ENV "$ENV" dsw dlc
one_of MODEL_SIZE "$MODEL_SIZE" A2.4B A21B tiny
one_of PR "$PR" fp16 bf16 fp8
for name in SP DO FL SFT; do one_of "$name" "${!name}" true false; done
one_of AC "$AC" sel full offload none false
one_of OPTIMIZER_OFFLOAD "$OPTIMIZER_OFFLOAD" false static auto
one_of MP_DATASET_TYPE "$MP_DATASET_TYPE" idxmap raw
for name in BATCH_SIZE GLOBAL_BATCH_SIZE SEQ_LEN PAD_LEN TP PP CP EP SAVE_INTERVAL \
            TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS MP_AC_LAYERS MP_NUM_WORKERS; do
    is_count "$name" "${!name}"
done

# ------------------------------------------------------------------ processes
if [ "$ENV" = dsw ]; then
    NNODES=1; NODE_RANK=0; MASTER_ADDR=localhost
    MASTER_PORT="${MASTER_PORT:-$(shuf -n 1 -i 10000-65535)}"
    if [ -z "${GPUS_PER_NODE:-}" ] || [ "$PR" = fp8 ]; then
        GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
        if [ "$GPUS" -eq 0 ]; then
            [ "$PR" = fp8 ] && fail "PR=fp8 needs GPUs with FP8 support (Hopper or newer); use PR=bf16 on this machine"
            GPUS="$((TP * PP * CP * EP))"  # CPU processes: data parallel as wide as EP
        fi
        GPUS_PER_NODE="${GPUS_PER_NODE:-$GPUS}"
    fi
else
    NNODES="${WORLD_SIZE:?ENV=dlc needs WORLD_SIZE (the number of nodes)}"
    NODE_RANK="${RANK:?ENV=dlc needs RANK (the rank of this node)}"
    GPUS_PER_NODE="${GPUS_PER_NODE:-${KUBERNETES_CONTAINER_RESOURCE_GPU:?ENV=dlc needs KUBERNETES_CONTAINER_RESOURCE_GPU}}"
    MASTER_ADDR="${MASTER_ADDR:?ENV=dlc needs MASTER_ADDR}"; MASTER_PORT="${MASTER_PORT:?ENV=dlc needs MASTER_PORT}"
fi

# ------------------------------------------------------------------ model
case "$MODEL_SIZE" in
A2.4B)
    # DeepSeek-V2-Lite; the preset adds YaRN's mscale and original context and the
    # routing (softmax over all experts, then top-k) that the flags below leave out.
    # Its first layer is dense, as in the released weights.
    NUM_LAYERS=27; HIDDEN_SIZE=2048; NUM_ATTN_HEADS=16; INTERMEDIATE_SIZE=10944
    MOE_INTERMEDIATE_SIZE=1408; SHARED_EXPERT_INTERMEDIATE_SIZE=2816; NUM_EXPERTS=64
    ROUTER_TOPK=6; MOE_LAYER_FREQ="([0]+[1]*26)"; KV_LORA_RANK=512; QK_HEAD_DIM=128
    QK_POS_EMB_HEAD_DIM=64; V_HEAD_DIM=128; EXTRA_VOCAB_SIZE=2400
    MAX_POSITION_EMBEDDINGS=163840
    model_options=(--model-size deepseek-v2-lite)
    ;;
A21B)
    NUM_LAYERS=60; HIDDEN_SIZE=5120; NUM_ATTN_HEADS=128; INTERMEDIATE_SIZE=12288
    MOE_INTERMEDIATE_SIZE=1536; SHARED_EXPERT_INTERMEDIATE_SIZE=3072; NUM_EXPERTS=160
    ROUTER_TOPK=6; MOE_LAYER_FREQ="([0]+[1]*59)"; KV_LORA_RANK=512; QK_HEAD_DIM=128
    QK_POS_EMB_HEAD_DIM=64; V_HEAD_DIM=128; EXTRA_VOCAB_SIZE=2400
    MAX_POSITION_EMBEDDINGS=163840
    model_options=(--model-size deepseek-v2 --q-lora-rank 1536)
    ;;
tiny)
    # Matches examples/tiny_hf_model.py --arch deepseek_v2: every layer MoE, DeepSeek's
    # routing and YaRN.
    NUM_LAYERS=3; HIDDEN_SIZE=64; NUM_ATTN_HEADS=4; INTERMEDIATE_SIZE=128
    MOE_INTERMEDIATE_SIZE=32; SHARED_EXPERT_INTERMEDIATE_SIZE=64; NUM_EXPERTS=4
    ROUTER_TOPK=2; MOE_LAYER_FREQ=1; KV_LORA_RANK=16; QK_HEAD_DIM=16
    QK_POS_EMB_HEAD_DIM=8; V_HEAD_DIM=16; EXTRA_VOCAB_SIZE=2400
    MAX_POSITION_EMBEDDINGS=163840
    model_options=(--moe-router-pre-softmax --original-max-position-embeddings 4096
                   --mscale 0.707 --mscale-all-dim 0.707)
    ;;
esac

# ------------------------------------------------------------------ schedule
if [ "$SFT" = true ]; then
    TRAIN_ITERS=$TRAIN_TOKENS_OR_ITERS
    LR_WARMUP_ITERS=$WARMUP_TOKENS_OR_ITERS
    LR_DECAY_ITERS=$((TRAIN_ITERS - LR_WARMUP_ITERS))
    PREFIX="finetune-mcore-deepseek-v2-${MODEL_SIZE}"
    sft_options=(--eod-mask-loss --calculate-per-token-loss --train-mode finetune)
else
    TRAIN_ITERS=$((TRAIN_TOKENS_OR_ITERS / GLOBAL_BATCH_SIZE / SEQ_LEN))
    LR_WARMUP_ITERS=$((WARMUP_TOKENS_OR_ITERS / GLOBAL_BATCH_SIZE / SEQ_LEN))
    LR_DECAY_ITERS=$TRAIN_ITERS
    PREFIX="pretrain-mcore-deepseek-v2-${MODEL_SIZE}"
    sft_options=(--train-mode pretrain)
fi
[ "$TRAIN_ITERS" -gt 0 ] || fail "TRAIN_TOKENS_OR_ITERS=$TRAIN_TOKENS_OR_ITERS gives no iteration (tokens are divided by GLOBAL_BATCH_SIZE x SEQ_LEN = $((GLOBAL_BATCH_SIZE * SEQ_LEN)))"

# ------------------------------------------------------------------ options
case "$PR" in
fp16) pr_options=(--fp16 --apply-query-key-layer-scaling) ;;
bf16) pr_options=(--bf16) ;;
fp8)  pr_options=(--bf16 --fp8-format hybrid) ;;
esac

case "$AC" in
sel) ac_options=(--recompute-activations) ;;
full)
    (( (NUM_LAYERS / PP) % MP_AC_LAYERS == 0 )) || fail "AC=full: the layers per pipeline stage ($NUM_LAYERS / PP=$PP) must be a multiple of MP_AC_LAYERS=$MP_AC_LAYERS"
    ac_options=(--recompute-method uniform --recompute-num-layers "$MP_AC_LAYERS" --recompute-granularity full) ;;
offload) ac_options=(--cpu-offloading --cpu-offloading-num-layers "$MP_AC_LAYERS") ;;
none|false) ac_options=() ;;
esac

if [ "$OPTIMIZER_OFFLOAD" != false ] && [ "$DO" = false ]; then
    echo "$PROG: OPTIMIZER_OFFLOAD=$OPTIMIZER_OFFLOAD needs the distributed optimizer; using DO=true" >&2
    DO=true
fi
case "$OPTIMIZER_OFFLOAD" in
static) offload_options=(--optimizer-cpu-offload --optimizer-offload-fraction 1.0) ;;
auto) fail "OPTIMIZER_OFFLOAD=auto (a fraction chosen at run time) is not available in Paratron; use static" ;;
false) offload_options=() ;;
esac
do_options=(); [ "$DO" = true ] && do_options=(--use-distributed-optimizer)
sp_options=(); [ "$SP" = true ] && [ "$TP" -gt 1 ] && sp_options=(--sequence-parallel)
load_options=(); [ "$PRETRAIN_CHECKPOINT_PATH" != none ] && load_options=(--load "$PRETRAIN_CHECKPOINT_PATH")
pp0_options=(); [ -n "${MP_PP0_LAYERS:-}" ] && pp0_options=(--decoder-first-pipeline-num-layers "$MP_PP0_LAYERS")

if [ "$MP_DATASET_TYPE" = raw ]; then
    dataset_options=(--train-data-path "$DATASET_PATH" --valid-data-path "$VALID_DATASET_PATH"
                     --dataloader-type cyclic --dataset JSON-SFT)
else
    dataset_options=(--data-path "$DATASET_PATH" --split 99,1,0 --dataset MMAP)
fi

# ------------------------------------------------------------------ output folders
NAME="${PREFIX}-lr-${LR}-minlr-${MIN_LR}-bs-${BATCH_SIZE}-gbs-${GLOBAL_BATCH_SIZE}-seqlen-${SEQ_LEN}-pr-${PR}-tp-${TP}-pp-${PP}-cp-${CP}-ac-${AC}-do-${DO}-sp-${SP}-ti-${TRAIN_ITERS}-wi-${LR_WARMUP_ITERS}"
SAVE_PATH="${OUTPUT_BASEPATH}/checkpoint/${NAME}"
TENSORBOARD_DIR="${OUTPUT_BASEPATH}/tensorboard/${NAME}_$(date "+%Y.%m.%d-%H.%M.%S")"

# --max-position-embeddings is the model's context (YaRN's 4096 x 40), not SEQ_LEN as
# Pai-Megatron-Patch passes: rotary positions need no table of that size, and so the
# checkpoint, and its Hugging Face export, keep the base model's value.
train_options=(
    --save "$SAVE_PATH" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
    --init-method-std 0.008 --attention-dropout 0.0 --hidden-dropout 0.0
    --lr-decay-iters "$LR_DECAY_ITERS" --lr-warmup-iters "$LR_WARMUP_ITERS"
    --train-iters "$TRAIN_ITERS" --micro-batch-size "$BATCH_SIZE"
    --global-batch-size "$GLOBAL_BATCH_SIZE" --num-layers "$NUM_LAYERS"
    --hidden-size "$HIDDEN_SIZE" --num-attention-heads "$NUM_ATTN_HEADS"
    --ffn-hidden-size "$INTERMEDIATE_SIZE" --seq-length "$SEQ_LEN"
    --max-position-embeddings "$MAX_POSITION_EMBEDDINGS" --max-padding-length "$PAD_LEN"
    --log-interval 1 --log-throughput --eval-interval 10000 --eval-iters 10
    --save-interval "$SAVE_INTERVAL" --tensorboard-queue-size 1
    --tensorboard-dir "$TENSORBOARD_DIR" --log-timers-to-tensorboard
    --log-validation-ppl-to-tensorboard
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --context-parallel-size "$CP" --no-load-optim --no-load-rng --num-workers "$MP_NUM_WORKERS"
    --extra-vocab-size "$EXTRA_VOCAB_SIZE" --patch-tokenizer-type DeepSeekV2Tokenizer
    --swiglu --normalization RMSNorm --norm-epsilon 1e-6 --use-rotary-position-embeddings
    --no-bias-swiglu-fusion --no-rope-fusion --position-embedding-type rope
    --untie-embeddings-and-output-weights --disable-bias-linear --rotary-base 10000
    --rotary-scaling-factor 40 --no-save-optim --kv-channels "$V_HEAD_DIM" --qk-layernorm
    --multi-latent-attention --ckpt-format torch
    "${dataset_options[@]}" "${pr_options[@]}" "${load_options[@]}"
    --transformer-impl transformer_engine
    "${ac_options[@]}" "${do_options[@]}" "${sp_options[@]}"
    --moe-ffn-hidden-size "$MOE_INTERMEDIATE_SIZE" --moe-router-topk "$ROUTER_TOPK"
    --num-experts "$NUM_EXPERTS" --moe-layer-freq "$MOE_LAYER_FREQ" --moe-aux-loss-coeff 1e-2
    --moe-shared-expert-intermediate-size "$SHARED_EXPERT_INTERMEDIATE_SIZE"
    --expert-model-parallel-size "$EP" --kv-lora-rank "$KV_LORA_RANK"
    --qk-head-dim "$QK_HEAD_DIM" --qk-pos-emb-head-dim "$QK_POS_EMB_HEAD_DIM"
    --v-head-dim "$V_HEAD_DIM" --moe-router-load-balancing-type aux_loss
    "${offload_options[@]}" "${sft_options[@]}" "${pp0_options[@]}" "${model_options[@]}"
)
launcher=(--nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
          --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")

if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "$PYTHON" -m torch.distributed.run "${launcher[@]}" -m paratron train "${train_options[@]}"
    echo
    exit 0
fi

# Refuse what Paratron cannot run (sizes, unavailable features) in one line, before
# any process starts.
WORLD_SIZE=$((NNODES * GPUS_PER_NODE)) "$PYTHON" - "${train_options[@]}" <<'PY' || exit 2
import sys
from paratron.cli.args import parse_args
from paratron.options import ConfigError
try:
    parse_args(sys.argv[1:])
except ConfigError as exc:
    sys.exit(f"run_mcore_deepseek.sh: error: {exc}")
PY

mkdir -p "$OUTPUT_BASEPATH/tensorboard" "$OUTPUT_BASEPATH/checkpoint" "$OUTPUT_BASEPATH/log" "$SAVE_PATH"
export CUDA_DEVICE_MAX_CONNECTIONS=1
"$PYTHON" -m torch.distributed.run "${launcher[@]}" -m paratron train "${train_options[@]}" \
    2>&1 | tee "$OUTPUT_BASEPATH/log/${NAME}.log"
exit "${PIPESTATUS[0]}"
