"""Flags of the tiny models the multi-process equivalence tests train."""

COMMON = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
          "--max-position-embeddings 16 --lr 2e-3 --vocab-size 120 --padded-vocab-size 128 "
          "--device cpu "
          "--micro-batch-size 2 --global-batch-size 8 --eval-interval 1000 --eval-iters 0 "
          "--log-interval 1000 --hidden-dropout 0 --attention-dropout 0 "
          "--ddp-bucket-size 2000 --adam-eps 1e-4 --num-workers 0").split()
# Adam's first steps turn any gradient entry far above eps into +-lr, so float noise in
# near-zero entries (summed in another order across ranks; GPT-2's key bias has an
# analytically zero gradient) would become lr-sized differences; eps 1e-4 keeps such
# noise at noise level while every real gradient still drives Adam normally.
LLAMA = ("--swiglu --normalization RMSNorm --position-embedding-type rope "
         "--disable-bias-linear --group-query-attention --num-query-groups 2 "
         "--untie-embeddings-and-output-weights --qk-layernorm").split()
GPT2 = ["--openai-gelu"]
