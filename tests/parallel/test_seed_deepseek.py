"""Seed file 000's DeepSeek-V2 argument list (its VS Code launch.json), scaled down to a
tiny model, trains on CPU at TP1 x PP2 x EP2 (x DP2) and at TP2 x EP2 (x DP2; expert TP
follows TP, as in Megatron) and the loss falls.

Scaled: layers, hidden size, heads, FFN/MoE/shared-expert sizes, experts, the MLA head
dimensions and LoRA rank, sequence length (and max positions / padding length with
it), the first stage's layer count, the iteration count, the data workers, and the
paths (a tiny "converted" DeepSeek-V2 checkpoint with its tokenizer stands in for
/ckpt/DeepSeek-V2-Lite-to-mcore-tp1-pp4-ep2; the C4 sample preprocessed with that
tokenizer for /data/mmap_deepseekv2_datasets). Every other flag is kept as the seed
has it, including lr 1e-5, bf16, --no-load-optim --no-load-rng, --extra-vocab-size
2400, --patch-tokenizer-type DeepSeekV2Tokenizer (read from the --load folder),
--ckpt-format torch, --dataset MMAP, recompute and the distributed optimizer.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.seed_args import SEED_ARGS

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[2]
SCALED = {"--num-layers": "3", "--hidden-size": "64", "--num-attention-heads": "4",
          "--ffn-hidden-size": "128", "--seq-length": "64", "--max-position-embeddings": "64",
          "--max-padding-length": "64", "--moe-ffn-hidden-size": "32", "--num-experts": "8",
          "--moe-shared-expert-intermediate-size": "64", "--kv-lora-rank": "16",
          "--qk-head-dim": "16", "--qk-pos-emb-head-dim": "8", "--v-head-dim": "16",
          "--kv-channels": "16", "--train-iters": "16", "--num-workers": "1",
          "--decoder-first-pipeline-num-layers": "2", "--eval-iters": "2"}
LAYOUTS = {"tp1_pp2_ep2": (4, {"--tensor-model-parallel-size": "1",
                               "--pipeline-model-parallel-size": "2",
                               "--expert-model-parallel-size": "2"}),
           "tp2_ep2": (4, {"--tensor-model-parallel-size": "2",
                           "--pipeline-model-parallel-size": "1",
                           "--expert-model-parallel-size": "2"})}
PP1_ONLY_DROPPED = {"--decoder-first-pipeline-num-layers"}  # an uneven first stage needs PP > 1


def _seed_flags(replace: dict, drop=frozenset()) -> list[str]:
    """The seed's list with some values replaced (flag order and every other flag kept)."""
    args = list(SEED_ARGS["000_deepseek_v2_lite_launch_json"])
    out, i = [], 0
    while i < len(args):
        flag = args[i]
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        value = args[i + 1] if has_value else None
        i += 2 if has_value else 1
        if flag in drop:
            continue
        out.append(flag)
        if has_value:
            out.append(replace.get(flag, value))
    return out


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    """The tokenizer + tiny converted checkpoint folder, and the preprocessed data."""
    for need in ("pretrain/wiki_demo.txt", "pretrain/c4_demo.jsonl"):
        if not (SHARED / need).is_file():
            pytest.skip(f"real data not available: {SHARED / need}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("seed000")
    load = root / "DeepSeek-V2-tiny-to-paratron"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train([str(SHARED / "pretrain/wiki_demo.txt")], trainers.BpeTrainer(
        vocab_size=1100, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe,
                                                  eos_token="<|endoftext|>")
    hf_tok.save_pretrained(load / "tokenizer")
    # Pai's --extra-vocab-size: the tokenizer plus 2400 rows, padded as Megatron pads
    # (the same at TP1 and TP2 here, so one checkpoint serves both layouts).
    from paratron.config import pad_vocab_size
    vocab = len(hf_tok) + 2400
    padded = pad_vocab_size(vocab, 128, 1)
    assert padded == pad_vocab_size(vocab, 128, 2)

    from paratron.cli.main import main
    data = root / "mmap_deepseekv2_datasets"
    assert main(["preprocess", "--input", str(SHARED / "pretrain/c4_demo.jsonl"),
                 "--output-prefix", str(data), "--json-keys", "text", "--tokenizer-type",
                 "HuggingFaceTokenizer", "--tokenizer-model", str(load / "tokenizer"),
                 "--append-eod", "--workers", "1"]) == 0

    # A tiny DeepSeek-V2 (all layers MoE: the seed's --moe-layer-freq 1), converted.
    from paratron.checkpoint import save_checkpoint
    from paratron.convert.hf_loader import load_hf_model
    from paratron.parallel.process_groups import ProcessGroups
    config = transformers.AutoConfig.for_model(
        "deepseek_v2", vocab_size=padded, hidden_size=64, num_attention_heads=4,
        num_key_value_heads=4, num_hidden_layers=3, intermediate_size=128,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=6,
        n_shared_experts=2, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False)
    hf_dir = root / "hf"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(hf_dir)
    _, model = load_hf_model(hf_dir)
    save_checkpoint(load, 0, [model], ProcessGroups.single())
    return load, f"{data}_text_document"


def _losses(output: str) -> list[float]:
    return [float(m) for m in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", output)]


def _train(load, data, layout, tmp_path, **changes) -> list[float]:
    nproc, sizes = LAYOUTS[layout]
    replace = {**SCALED, **sizes, "--load": str(load), "--data-path": data,
               "--save": str(tmp_path / f"checkpoint-{layout}-{len(changes)}"),
               "--tensorboard-dir": str(tmp_path / "tensorboard"), **changes}
    flags = _seed_flags(replace, drop=PP1_ONLY_DROPPED if sizes[
        "--pipeline-model-parallel-size"] == "1" else frozenset())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                         os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(nproc), "-m", "paratron", "train", *flags],
                          capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "successfully loaded checkpoint" in out
    losses = _losses(proc.stdout)
    assert len(losses) == 16, out[-3000:]
    return losses


@pytest.mark.slow
def test_seed_000_deepseek_arguments_train_and_loss_falls(seed_files, tmp_path):
    """With the seed's lr of 1e-5 sixteen steps move the loss by thousandths, less than
    batch-to-batch variation; so the same run with lr 0 (same batches, same layout)
    is the control: the trained run's loss must end below it, and below its own start."""
    load, data = seed_files
    control = _train(load, data, "tp1_pp2_ep2", tmp_path, **{"--lr": "0", "--min-lr": "0"})
    window = lambda losses, part: sum(part(losses)) / 4  # noqa: E731
    for layout in LAYOUTS:
        losses = _train(load, data, layout, tmp_path)
        first, last = window(losses, lambda x: x[:4]), window(losses, lambda x: x[-4:])
        untrained = window(control, lambda x: x[-4:])
        print(f"{layout}: lm loss {first:.4f} (iterations 1-4) -> {last:.4f} (13-16); "
              f"lr 0 control {untrained:.4f} (13-16)")
        assert last < first and last < untrained, (losses, control)
