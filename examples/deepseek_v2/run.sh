#!/usr/bin/env bash
# DeepSeek-V2 with Paratron, following Pai-Megatron-Patch's DeepSeek-V2 best practice:
#   1. idxmap data: tokenize a JSONL corpus with the model's tokenizer (.bin/.idx)
#   2. paratron convert: Hugging Face -> Paratron at TP/PP/EP, with MP_PP0_LAYERS
#      layers on the first pipeline stage
#   3. continued pretraining with run_mcore_deepseek.sh (the launch.json flag set)
#   4. SFT on Alpaca-format JSON (MP_DATASET_TYPE=raw) from the converted checkpoint
#   5. paratron convert: the fine-tuned checkpoint -> Hugging Face, and the loss of the
#      start and fine-tuned models on the Alpaca data, computed by transformers
#
# SIZE=tiny (default): on the CPU in a few minutes. The start checkpoint is a 3-layer
#   random DeepSeek-V2 (MLA, 4 routed + 2 shared experts, YaRN) with a tokenizer trained
#   on the data (examples/tiny_hf_model.py); pretraining runs at PP2 x EP2 (4 gloo
#   processes, 1 layer on the first stage), SFT on one process.
# SIZE=full: HF_MODEL=/path/to/DeepSeek-V2-Lite on 8 GPUs, the seeds' layouts: TP1 PP4
#   EP2 with 6 layers on the first stage for pretraining, TP=PP=EP=1 for the raw-JSON SFT
#   (the A2.4B model needs more than one 80 GB GPU there; set SFT_TP/SFT_PP/SFT_EP).
#
# Your data: INPUT=corpus.jsonl (pretraining, one {"text": ...} a line) and
# SFT_INPUT=alpaca.json (a JSON list of {instruction, input, output}). Without them the
# example makes samples on the spot (examples/sample_data.py), so a fresh clone needs
# nothing else.
# Settings: HF_MODEL, INPUT, SFT_INPUT (default: OUT/sample/corpus.jsonl and
# OUT/sample/alpaca.json), OUT (./deepseek-v2-output), PRETRAIN_ITERS, SFT_ITERS.
set -euo pipefail

EXAMPLE=deepseek_v2/run.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
OUT="${OUT:-$PWD/deepseek-v2-output}"
check_given INPUT SFT_INPUT
if [ -z "${INPUT:-}" ] || [ -z "${SFT_INPUT:-}" ]; then
    sample_data "$OUT/sample"
    INPUT="${INPUT:-$OUT/sample/corpus.jsonl}"; SFT_INPUT="${SFT_INPUT:-$OUT/sample/alpaca.json}"
fi
mkdir -p "$OUT"

case "$SIZE" in
tiny)
    HF_MODEL="${HF_MODEL:-$OUT/hf-start}"
    if [ ! -f "$HF_MODEL/config.json" ]; then
        echo "== build a tiny random DeepSeek-V2 checkpoint in $HF_MODEL"
        "$PYTHON" "$ROOT/examples/tiny_hf_model.py" --arch deepseek_v2 --extra-vocab-size 2400 \
            --text "$INPUT" "$SFT_INPUT" --out "$HF_MODEL"
    fi
    MODEL_SIZE=tiny; PR=bf16; SEQ_LEN=128; GBS=8; LR=1e-3; MIN_LR=1e-4
    TP=1; PP=2; EP=2; PP0_LAYERS=1; SFT_TP=1; SFT_PP=1; SFT_EP=1
    PRETRAIN_ITERS="${PRETRAIN_ITERS:-20}"; SFT_ITERS="${SFT_ITERS:-20}"; WARMUP_ITERS=1
    export MP_NUM_WORKERS=0
    ;;
full)
    [ -n "${HF_MODEL:-}" ] || fail "SIZE=full needs HF_MODEL=/path/to/DeepSeek-V2-Lite"
    MODEL_SIZE=A2.4B; PR=bf16; SEQ_LEN=1024; GBS=8; LR=1e-5; MIN_LR=1e-6
    TP=1; PP=4; EP=2; PP0_LAYERS=6
    SFT_TP="${SFT_TP:-1}"; SFT_PP="${SFT_PP:-1}"; SFT_EP="${SFT_EP:-1}"
    PRETRAIN_ITERS="${PRETRAIN_ITERS:-122070}"; SFT_ITERS="${SFT_ITERS:-10000}"; WARMUP_ITERS=100
    ;;
*) fail "SIZE=$SIZE: use tiny (CPU) or full (GPUs)" ;;
esac

NAME="$(basename "${INPUT%.*}")"
IDXMAP="$OUT/data/${NAME}_text_document"
if [ ! -f "$IDXMAP.idx" ]; then
    echo "== idxmap: $INPUT -> $IDXMAP.bin/.idx"
    mkdir -p "$OUT/data"
    "$PYTHON" -m paratron preprocess --input "$INPUT" --output-prefix "$OUT/data/$NAME" \
        --json-keys text --patch-tokenizer-type DeepSeekV2Tokenizer --load "$HF_MODEL" \
        --workers "${WORKERS:-2}" --append-eod
fi

# A Paratron checkpoint holds whole (unsharded) tensors and loads into any layout; the
# conversion checks the target layout, uneven first stage (MP_PP0_LAYERS) included, and
# records it.
START="$OUT/DeepSeek-V2-to-paratron-tp$TP-ep$EP"
if [ ! -d "$START" ]; then
    echo "== convert $HF_MODEL -> $START"
    "$PYTHON" -m paratron convert --model-type GPT --loader hf --saver paratron \
        --load-dir "$HF_MODEL" --save-dir "$START" --target-tensor-parallel-size "$TP" \
        --target-pipeline-parallel-size "$PP" --target-expert-parallel-size "$EP" \
        --target-decoder-first-pipeline-num-layers "$PP0_LAYERS"
fi

# run_mcore_deepseek.sh takes tokens when pretraining: iterations x GBS x SEQ_LEN.
echo "== continued pretraining (TP=$TP PP=$PP EP=$EP, $PP0_LAYERS layers on stage 0)"
MP_PP0_LAYERS="$PP0_LAYERS" bash "$HERE/run_mcore_deepseek.sh" dsw "$MODEL_SIZE" 1 "$GBS" \
    "$LR" "$MIN_LR" "$SEQ_LEN" "$SEQ_LEN" "$PR" "$TP" "$PP" 1 "$EP" true true true false \
    sel false 100000 "$IDXMAP" "$IDXMAP" "$START" \
    "$((PRETRAIN_ITERS * GBS * SEQ_LEN))" "$((WARMUP_ITERS * GBS * SEQ_LEN))" "$OUT/pretrain"

echo "== SFT on $SFT_INPUT (TP=$SFT_TP PP=$SFT_PP EP=$SFT_EP)"
MP_DATASET_TYPE=raw bash "$HERE/run_mcore_deepseek.sh" dsw "$MODEL_SIZE" 1 "$GBS" \
    "$LR" "$MIN_LR" "$SEQ_LEN" "$SEQ_LEN" "$PR" "$SFT_TP" "$SFT_PP" 1 "$SFT_EP" true true \
    true true false false 100000 "$SFT_INPUT" "$SFT_INPUT" "$START" "$SFT_ITERS" \
    "$WARMUP_ITERS" "$OUT/finetune"

FINETUNED="$(ls -d "$OUT"/finetune/checkpoint/*/ | tail -n 1)"
echo "== export $FINETUNED -> $OUT/hf"
rm -rf "$OUT/hf"
"$PYTHON" -m paratron convert --model-type GPT --loader paratron --saver hf \
    --load-dir "$FINETUNED" --save-dir "$OUT/hf"
"$PYTHON" "$ROOT/examples/hf_loss.py" --text "$SFT_INPUT" --model "$HF_MODEL" "$OUT/hf"
