"""Make a small random Hugging Face checkpoint, with a tokenizer, for the CPU examples.

The examples start from a Hugging Face folder (config.json, safetensors weights,
tokenizer files), as a real run starts from one downloaded from the Hub. No weights
can be downloaded on a machine without network access, so this writes a folder of
the same architecture with a handful of layers and random weights, and a byte-level
BPE tokenizer trained on the given text files. At full size, point the examples at
the real folder instead (e.g. Qwen/Qwen2.5-7B or deepseek-ai/DeepSeek-V2-Lite).

    python examples/tiny_hf_model.py --arch qwen2 --text corpus.jsonl --out tiny-qwen

The vocabulary of the model is the tokenizer's padded up to a multiple of 128
(Megatron's --make-vocab-size-divisible-by default), or, with --extra-vocab-size, the
tokenizer's plus those rows exactly, unpadded, as Pai-Megatron-Patch's DeepSeek-V2
tokenizer counts it; so the training flags of the examples describe exactly this model
and an export after training keeps its vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Per architecture: the transformers model type and a few-layer configuration. The
# DeepSeek row is DeepSeek-V2-Lite's design (MLA without q compression, YaRN x40,
# shared experts, softmax routing without renormalisation) at toy size; every layer
# is MoE so that run_mcore_deepseek.sh's MODEL_SIZE=tiny (--moe-layer-freq 1) fits.
ARCHS = {
    "qwen2": ("qwen2", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2,
                            rope_theta=1000000.0, tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            rope_theta=1000000.0, tie_word_embeddings=False)),
    "deepseek_v2": ("deepseek_v2", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=0,
        routed_scaling_factor=1.0, norm_topk_prob=False, topk_method="greedy",
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": 40.0,
                      "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})),
}


def text_files(paths: list[str], workdir: str) -> list[str]:
    """Plain-text files for the tokenizer trainer: JSON(L) records become their string
    values (Alpaca's instruction/input/output, a corpus's "text"), other files are
    used as they are."""
    out = []
    for path in paths:
        if not path.endswith((".json", ".jsonl")):
            out.append(path)
            continue
        with open(path, encoding="utf-8") as fh:
            raw = fh.read()
        try:
            records = json.loads(raw)
            records = records if isinstance(records, list) else [records]
        except json.JSONDecodeError:
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        flat = os.path.join(workdir, os.path.basename(path) + ".txt")
        with open(flat, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(" ".join(v for v in record.values() if isinstance(v, str)) + "\n")
        out.append(flat)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), required=True)
    p.add_argument("--text", nargs="+", required=True,
                   help="text, JSONL or JSON files to train the tokenizer on")
    p.add_argument("--out", required=True, help="folder to write (must not exist)")
    p.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary")
    p.add_argument("--extra-vocab-size", type=int, default=0,
                   help="rows added to the embedding beyond the tokenizer (Pai-Megatron-"
                        "Patch's --extra-vocab-size)")
    p.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default 4096 (Qwen) or 163840 (DeepSeek: 4096 x YaRN's 40)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for path in args.text:
        if not os.path.isfile(path):
            p.error(f"--text {path}: no such file")
    if os.path.exists(args.out):
        p.error(f"--out {args.out} exists; remove it or choose another folder")

    import torch
    import transformers

    from paratron.data.tokenizer import HuggingFaceTokenizer, train_bpe_tokenizer

    with tempfile.TemporaryDirectory() as work:
        train_bpe_tokenizer(text_files(args.text, work), args.out, vocab_size=args.vocab_size)
    tokens = HuggingFaceTokenizer(args.out).vocab_size
    vocab = tokens + args.extra_vocab_size if args.extra_vocab_size else -(-tokens // 128) * 128
    model_type, sizes = ARCHS[args.arch]
    eod = HuggingFaceTokenizer(args.out).eod
    positions = args.max_position_embeddings or (163840 if model_type == "deepseek_v2" else 4096)
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=vocab, max_position_embeddings=positions,
        bos_token_id=eod, eos_token_id=eod, **sizes)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(args.out)
    params = sum(t.numel() for t in model.parameters())
    how = f"+ {args.extra_vocab_size} extra" if args.extra_vocab_size else "padded to 128"
    print(f"wrote {args.out}: {model_type}, {params:,} parameters, vocabulary {vocab} "
          f"({tokens} tokens {how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
