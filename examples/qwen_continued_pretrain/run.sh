#!/usr/bin/env bash
# Qwen2.5 / Qwen3 continued pretraining from a Hugging Face checkpoint:
#   1. tokenize a JSONL corpus with the model's own tokenizer (.bin/.idx)
#   2. paratron convert: Hugging Face -> Paratron checkpoint at the target TP
#   3. continue pretraining with the flag set of the Qwen2.5-7B script in the users'
#      Megatron-Core tutorial (--load ... --finetune --no-load-optim --no-load-rng,
#      distributed optimizer, sequence parallel, selective recompute, bf16)
#   4. paratron convert: the trained checkpoint -> Hugging Face, and the loss of the
#      start and trained models on the corpus, computed by transformers
#
# SIZE=tiny (default): on the CPU in a few minutes; the "checkpoint" is a 2-layer random
#   model of the same architecture with a tokenizer trained on the corpus
#   (examples/tiny_hf_model.py), trained by 2 gloo processes at TP2.
# SIZE=full: HF_MODEL=/path/to/Qwen2.5-7B on this machine's GPUs with the tutorial's
#   sizes (TP2, sequence 4096, global batch 64, 10000 iterations).
#
# Your data: INPUT=corpus.jsonl (one {"text": ...} a line). Without it the example makes
# a sample on the spot (examples/sample_data.py), so a fresh clone needs nothing else.
# Settings: MODEL qwen2.5|qwen3, HF_MODEL (full: required), INPUT (default:
# OUT/sample/corpus.jsonl), OUT (./qwen-cpt-output), NPROC, TP, TRAIN_ITERS, MASTER_PORT.
set -euo pipefail

EXAMPLE=qwen_continued_pretrain/run.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
OUT="${OUT:-$PWD/qwen-cpt-output}"
MODEL="${MODEL:-qwen2.5}"
check_given INPUT
if [ -z "${INPUT:-}" ]; then
    sample_data "$OUT/sample"
    INPUT="$OUT/sample/corpus.jsonl"
fi
case "$MODEL" in
qwen2.5) ARCH=qwen2; BIAS=(--add-qkv-bias) ;;
qwen3)   ARCH=qwen3; BIAS=(--qk-layernorm) ;;
*) fail "MODEL=$MODEL: use qwen2.5 or qwen3" ;;
esac
mkdir -p "$OUT"

case "$SIZE" in
tiny)
    HF_MODEL="${HF_MODEL:-$OUT/hf-start}"
    if [ ! -f "$HF_MODEL/config.json" ]; then
        echo "== build a tiny random $MODEL checkpoint in $HF_MODEL"
        "$PYTHON" "$ROOT/examples/tiny_hf_model.py" --arch "$ARCH" --text "$INPUT" --out "$HF_MODEL"
    fi
    NPROC="${NPROC:-2}"; TP="${TP:-2}"
    VOCAB="$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["vocab_size"])' "$HF_MODEL/config.json")"
    # The tiny model's shape (examples/tiny_hf_model.py), spelled as the tutorial spells
    # Qwen2.5-7B's.
    MODEL_ARGS=(--num-layers 2 --hidden-size 64 --ffn-hidden-size 160 --num-attention-heads 4
                --kv-channels 16 --seq-length 128 --max-position-embeddings 4096
                --group-query-attention --num-query-groups 2
                --padded-vocab-size "$VOCAB" --make-vocab-size-divisible-by 1)
    TRAINING_ARGS=(--micro-batch-size 1 --global-batch-size 8 --train-iters "${TRAIN_ITERS:-40}"
                   --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 2 --log-interval "${LOG_INTERVAL:-5}"
                   --eval-interval "${TRAIN_ITERS:-40}" --eval-iters 2)
    SYSTEM_ARGS=(--device cpu --distributed-backend gloo --num-workers 0)
    ;;
full)
    [ -n "${HF_MODEL:-}" ] || fail "SIZE=full needs HF_MODEL=/path/to/the Hugging Face folder"
    NPROC="${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"
    [ "$NPROC" -gt 0 ] || fail "SIZE=full needs GPUs (none found); use SIZE=tiny on a CPU"
    TP="${TP:-2}"
    case "$MODEL" in
    qwen2.5) MODEL_ARGS=(--num-layers 28 --hidden-size 3584 --ffn-hidden-size 18944
                         --num-attention-heads 28 --kv-channels 128 --seq-length 4096
                         --max-position-embeddings 32768 --group-query-attention
                         --num-query-groups 4 --padded-vocab-size 152064
                         --make-vocab-size-divisible-by 1) ;;
    qwen3)   MODEL_ARGS=(--num-layers 36 --hidden-size 4096 --ffn-hidden-size 12288
                         --num-attention-heads 32 --kv-channels 128 --seq-length 4096
                         --max-position-embeddings 40960 --group-query-attention
                         --num-query-groups 8 --norm-epsilon 1e-6 --padded-vocab-size 151936
                         --make-vocab-size-divisible-by 1) ;;
    esac
    TRAINING_ARGS=(--micro-batch-size 1 --global-batch-size 64 --train-iters "${TRAIN_ITERS:-10000}"
                   --lr 1e-5 --min-lr 1e-6 --lr-warmup-iters 100 --log-interval 10
                   --save-interval 500)
    SYSTEM_ARGS=(--num-workers 2)
    ;;
*) fail "SIZE=$SIZE: use tiny (CPU) or full (GPUs)" ;;
esac

NAME="$(basename "${INPUT%.*}")"
DATA="$OUT/data/${NAME}_text_document"
if [ ! -f "$DATA.idx" ]; then
    echo "== preprocess $INPUT with the $MODEL tokenizer"
    mkdir -p "$OUT/data"
    "$PYTHON" -m paratron preprocess --input "$INPUT" --output-prefix "$OUT/data/$NAME" \
        --json-keys text --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$HF_MODEL" \
        --workers "${WORKERS:-2}" --append-eod
fi

START="$OUT/${MODEL}-paratron-tp$TP"
if [ ! -d "$START" ]; then
    echo "== convert $HF_MODEL -> $START (TP=$TP)"
    "$PYTHON" -m paratron convert --model-type GPT --loader hf --saver paratron \
        --load-dir "$HF_MODEL" --save-dir "$START" --target-tensor-parallel-size "$TP" \
        --target-pipeline-parallel-size 1
fi

echo "== continued pretraining: $NPROC processes, TP=$TP"
"$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes 1 \
    --master_addr localhost --master_port "${MASTER_PORT:-29500}" -m paratron train \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size 1 \
    --use-mcore-models --transformer-impl transformer_engine \
    "${MODEL_ARGS[@]}" --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear "${BIAS[@]}" \
    --position-embedding-type rope --rotary-percent 1.0 --rotary-base 1000000 \
    --untie-embeddings-and-output-weights \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$HF_MODEL" \
    "${TRAINING_ARGS[@]}" --lr-decay-style cosine --weight-decay 0.01 --clip-grad 1.0 \
    --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --bf16 \
    --use-distributed-optimizer --sequence-parallel \
    --recompute-granularity selective --recompute-modules core_attn \
    --attention-backend flash --no-masked-softmax-fusion --attention-softmax-in-fp32 \
    --data-path "$DATA" --split 99,1,0 --data-cache-path "$OUT/cache" \
    --load "$START" --save "$OUT/checkpoint" --ckpt-format torch_dist \
    --finetune --no-load-optim --no-load-rng \
    --tensorboard-dir "$OUT/tensorboard" --log-throughput "${SYSTEM_ARGS[@]}" \
    2>&1 | tee "$OUT/train.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit "${PIPESTATUS[0]}"

echo "== export $OUT/checkpoint -> $OUT/hf"
rm -rf "$OUT/hf"
"$PYTHON" -m paratron convert --model-type GPT --loader paratron --saver hf \
    --load-dir "$OUT/checkpoint" --save-dir "$OUT/hf"
"$PYTHON" "$ROOT/examples/hf_loss.py" --text "$INPUT" --model "$HF_MODEL" "$OUT/hf"
