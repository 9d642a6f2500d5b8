#!/usr/bin/env bash
# GPT-2 pretraining from raw JSONL, as in the users' Megatron-LM notes:
#   1. tokenize a JSONL corpus with the GPT-2 BPE into Megatron .bin/.idx files
#   2. train a GPT-2 style model with tensor and pipeline parallelism under torchrun
#
# SIZE=tiny (default) runs on the CPU in a minute or two: 4 gloo processes, TP2 x PP2,
# a 4-layer model with hidden size 64.
# SIZE=full is the 124M model of the notes (12 layers, hidden 768, 12 heads,
# sequence 512, fp16, global batch 16, 1000 iterations) on the GPUs of this machine.
#
# Your data: INPUT=corpus.jsonl (one {"text": ...} a line). Without it the example makes
# a sample on the spot (examples/sample_data.py), so a fresh clone needs nothing else.
# Settings (environment variables, all optional):
#   INPUT      the corpus (default: OUT/sample/corpus.jsonl, made on the spot)
#   VOCAB_FILE, MERGE_FILE  GPT-2's tokenizer files (gpt2-vocab.json, gpt2-merges.txt);
#              default: a small byte-level BPE in that format trained on INPUT
#   OUT        where data files, sample-index cache and logs go (./gpt2-pretrain-output)
#   NPROC TP PP  processes, tensor- and pipeline-parallel sizes (tiny: 4 2 2;
#                full: the GPU count, 2, 2)
#   TRAIN_ITERS, LOG_INTERVAL, EVAL_INTERVAL  override the run length
#   MASTER_PORT  torchrun's rendezvous port (29500)
set -euo pipefail

EXAMPLE=gpt2_pretrain/run.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
OUT="${OUT:-$PWD/gpt2-pretrain-output}"
check_given INPUT VOCAB_FILE MERGE_FILE
if [ -n "${VOCAB_FILE:-}${MERGE_FILE:-}" ] && [ -z "${VOCAB_FILE:-}" -o -z "${MERGE_FILE:-}" ]; then
    fail "give both VOCAB_FILE and MERGE_FILE (GPT-2's tokenizer files), or neither for a BPE trained on INPUT"
fi
if [ -z "${INPUT:-}" ]; then
    sample_data "$OUT/sample"
    INPUT="$OUT/sample/corpus.jsonl"
fi
if [ -z "${VOCAB_FILE:-}" ]; then
    sample_data "$OUT/tokenizer" --gpt2-bpe "$INPUT"
    VOCAB_FILE="$OUT/tokenizer/gpt2-vocab.json"; MERGE_FILE="$OUT/tokenizer/gpt2-merges.txt"
fi

case "$SIZE" in
tiny)
    NPROC="${NPROC:-4}"; TP="${TP:-2}"; PP="${PP:-2}"
    MODEL=(--num-layers 4 --hidden-size 64 --num-attention-heads 4
           --seq-length 128 --max-position-embeddings 128)
    TRAINING=(--micro-batch-size 2 --global-batch-size 8 --train-iters "${TRAIN_ITERS:-60}"
              --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 2)
    SYSTEM=(--device cpu --distributed-backend gloo --num-workers 0)
    SPLIT=98,2,0  # a small corpus leaves no document for a 0.1% test split
    ;;
full)
    NPROC="${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"
    TP="${TP:-2}"; PP="${PP:-2}"
    [ "$NPROC" -gt 0 ] || fail "SIZE=full needs GPUs (none found); use SIZE=tiny on a CPU"
    MODEL=(--num-layers 12 --hidden-size 768 --num-attention-heads 12
           --seq-length 512 --max-position-embeddings 512 --attention-backend auto)
    TRAINING=(--micro-batch-size 1 --global-batch-size 16 --train-iters "${TRAIN_ITERS:-1000}"
              --fp16 --lr 0.0001 --min-lr 0.00001 --lr-warmup-fraction .01)
    SYSTEM=(--num-workers 2)
    SPLIT=949,50,1
    ;;
*) fail "SIZE=$SIZE: use tiny (CPU) or full (GPUs)" ;;
esac

mkdir -p "$OUT"
PREFIX="$OUT/$(basename "${INPUT%.*}")"
if [ ! -f "${PREFIX}_text_document.idx" ]; then
    echo "== preprocess $INPUT -> ${PREFIX}_text_document.bin/.idx"
    "$PYTHON" -m paratron preprocess --input "$INPUT" --output-prefix "$PREFIX" \
        --json-keys text --tokenizer-type GPT2BPETokenizer \
        --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE" \
        --workers "${WORKERS:-2}" --append-eod
fi

echo "== train: $NPROC processes, TP=$TP PP=$PP"
"$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes 1 \
    --master_addr localhost --master_port "${MASTER_PORT:-29500}" \
    -m paratron train \
    "${MODEL[@]}" "${TRAINING[@]}" "${SYSTEM[@]}" \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.006 \
    --clip-grad 1.0 --lr-decay-style cosine \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --data-path "${PREFIX}_text_document" --split "$SPLIT" \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE" \
    --data-cache-path "$OUT/cache" \
    --log-interval "${LOG_INTERVAL:-10}" --eval-interval "${EVAL_INTERVAL:-50}" --eval-iters 5 \
    2>&1 | tee "$OUT/train.log"
