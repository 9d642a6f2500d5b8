"""`paratron generate`: complete prompts with a trained checkpoint or a Hugging Face model.

    paratron generate --load checkpoints/gpt2 --prompt "The meaning of life" \\
        --max-new-tokens 64 --top-k 50 --top-p 0.9 --temperature 0.8 --seed 1
    torchrun --nproc_per_node 2 -m paratron generate --hf Qwen3-8B --prompt-file prompts.txt \\
        --max-new-tokens 128 --greedy --tensor-model-parallel-size 2 --bf16

Greedy unless --top-k, --top-p or --temperature asks for sampling. Each completion is the
prompt and the generated text (no end-of-document token), separated by a line of dashes
(`--json`: one object a line with prompt, completion and token ids). Under torchrun every
process is a tensor-parallel rank and rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from paratron.cli.args import NumberType
from paratron.cli.preprocess import tokenizer_kwargs
from paratron.convert.errors import ConversionError
from paratron.data.errors import DataError
from paratron.data.tokenizer import TOKENIZER_TYPES, HuggingFaceTokenizer, build_tokenizer
from paratron.inference import (Sampling, check_generation_layout, checkpoint_tokenizer,
                                completion_text, generate, load_paratron_model, shard_model)
from paratron.options import MAX_SEED, ConfigError
from paratron.parallel.launch import init_distributed
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.memory_plan import device_memory_bytes

PROG = "paratron generate"
DEFAULT_NEW_TOKENS = 64
SEPARATOR = "-" * 40  # between completions
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                       "tokenizer.model")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other refusal of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Generate text from a Paratron checkpoint or a "
                     "Hugging Face folder.")
    g = parser.add_argument_group("model")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="Paratron checkpoint directory (the training --save)")
    source.add_argument("--hf", help="Hugging Face model folder (config.json + safetensors)")
    g.add_argument("--tensor-model-parallel-size", type=NumberType(int), default=None,
                   help="TP ranks (default: every launched process)")
    g.add_argument("--bf16", action="store_true", help="run the model in bfloat16")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: the GPU of this rank when CUDA is present, else the CPU")
    g = parser.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompt-file", help="a text file with one prompt per line")
    g.add_argument("--max-new-tokens", type=NumberType(int), default=None,
                   help=f"tokens to generate per prompt (default {DEFAULT_NEW_TOKENS}, or "
                   f"what the model's learned positions leave after the longest prompt)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the end-of-document token")
    g = parser.add_argument_group("sampling")
    g.add_argument("--greedy", action="store_true", help="the most likely token (default)")
    g.add_argument("--top-k", type=NumberType(int), default=0,
                   help="sample among the k most likely")
    g.add_argument("--top-p", type=NumberType(float), default=1.0,
                   help="sample within the nucleus p")
    g.add_argument("--temperature", type=NumberType(float), default=1.0)
    g.add_argument("--seed", type=NumberType(int), default=1234)
    g = parser.add_argument_group("tokenizer (default: the one the model came with)")
    g.add_argument("--tokenizer-type", default=None, help=f"one of {', '.join(TOKENIZER_TYPES)}")
    g.add_argument("--patch-tokenizer-type", default=None, help=argparse.SUPPRESS)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-size", type=NumberType(int), default=None, help="for NullTokenizer")
    g = parser.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="one JSON object per completion")
    return parser


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"--prompt-file {args.prompt_file}: unreadable "
                            f"({type(error).__name__}: {error})") from None
        prompts += [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise DataError(f"--prompt-file {args.prompt_file}: no prompt in it")
    if not prompts:
        raise DataError("give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def sampling_of(args) -> Sampling:
    sampled = args.top_k or args.top_p != 1.0 or args.temperature != 1.0
    return Sampling(greedy=args.greedy or not sampled, top_k=args.top_k, top_p=args.top_p,
                    temperature=args.temperature, seed=args.seed)


def _flag_tokenizer(args):
    """The tokenizer the command line names, or None."""
    if args.tokenizer_type is None and args.patch_tokenizer_type is None:
        return None
    # --load is the checkpoint here, never a tokenizer folder.
    return build_tokenizer(**tokenizer_kwargs(argparse.Namespace(**{**vars(args), "load": None})))


def _hf_tokenizer(folder: str):
    if not any((Path(folder) / name).is_file() for name in _HF_TOKENIZER_FILES):
        raise DataError(f"--hf {folder}: no tokenizer files ({', '.join(_HF_TOKENIZER_FILES)}) "
                        f"in it; give --tokenizer-type with its files")
    return HuggingFaceTokenizer(folder)


def _hf_stop_ids(folder: str, tokenizer) -> list[int]:
    """The tokenizer's end of document and generation_config.json's eos ids."""
    ids = {tokenizer.eod}
    path = Path(folder) / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            eos = None
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return sorted(ids)


def _setup(args) -> tuple[ProcessGroups, torch.device]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    try:
        device = init_distributed("nccl" if torch.cuda.is_available() else "gloo")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if args.device == "cpu":
        device = torch.device("cpu")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    tp = args.tensor_model_parallel_size or world
    if tp != world:
        raise ValueError(f"--tensor-model-parallel-size {tp}: generation runs one model "
                         f"replica; launch exactly {tp} processes, one per rank (got "
                         f"{world})")
    pg = ProcessGroups.build(tp, 1)
    check_generation_layout(pg)
    return pg, device


def _load(args, pg: ProcessGroups, log):
    """(model, tokenizer, stop ids, vocabulary to choose from) for --load or --hf.

    A checkpoint's embedding has Megatron's padding rows past the tokenizer's ids,
    which are never chosen; a Hugging Face model's vocabulary is used whole, as
    `transformers` does."""
    if args.load is not None:
        cfg, model, iteration = load_paratron_model(args.load, pg, log=log)
        log(f"loaded {args.load} at iteration {iteration}")
        tokenizer = _flag_tokenizer(args) or checkpoint_tokenizer(args.load, cfg)
        return model, tokenizer, [tokenizer.eod], tokenizer.vocab_size
    if not Path(args.hf).is_dir():
        raise ValueError(f"--hf {args.hf}: no such directory")
    from paratron.convert.hf_loader import load_hf_model
    _, full = load_hf_model(args.hf)
    model = shard_model(full, pg)
    tokenizer = _flag_tokenizer(args) or _hf_tokenizer(args.hf)
    return model, tokenizer, _hf_stop_ids(args.hf, tokenizer), None


def new_tokens(args, config, ids: list[list[int]]) -> int:
    """--max-new-tokens, or by default DEFAULT_NEW_TOKENS capped to the positions a
    learned position embedding has left after the longest prompt (a small model trained
    at --seq-length 128 then completes a prompt instead of refusing the default)."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    if config.position_embedding_type != "learned_absolute":
        return DEFAULT_NEW_TOKENS
    room = config.max_position_embeddings - max(len(p) for p in ids)
    return max(min(DEFAULT_NEW_TOKENS, room), 1)  # none left: generate() says so


def run(args) -> int:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}")
    sampling = sampling_of(args)
    prompts = read_prompts(args)
    pg, device = _setup(args)
    log = (lambda line: print(line, file=sys.stderr)) if pg.rank == 0 else (lambda line: None)
    model, tokenizer, stop, vocab_size = _load(args, pg, log)
    model.to(device=device, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    ids = [tokenizer.encode(p) for p in prompts]
    empty = [i for i, p in enumerate(ids) if not p]
    if empty:
        raise DataError(f"prompt {empty[0] + 1} has no tokens; give some text")
    budget = new_tokens(args, model.config, ids)
    start = time.perf_counter()
    completions = generate(model, ids, budget, sampling=sampling,
                           eod=None if args.ignore_eos else stop,
                           vocab_size=vocab_size, memory_bytes=device_memory_bytes(device.type))
    elapsed = time.perf_counter() - start
    if pg.rank != 0:
        return 0
    for i, (prompt, prompt_ids, new) in enumerate(zip(prompts, ids, completions)):
        text = completion_text(tokenizer, prompt_ids, new, () if args.ignore_eos else stop)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "token_ids": new},
                             ensure_ascii=False))
        else:
            print(("" if i == 0 else SEPARATOR + "\n") + prompt + text)
    count = sum(len(c) for c in completions)
    log(f"generated {count} tokens for {len(prompts)} prompts in {elapsed:.2f} s "
        f"({count / max(elapsed, 1e-9):.1f} tokens/s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, ConfigError, DataError, ConversionError) as error:
        message = " ".join(str(error).split())
        sys.stderr.write(f"{PROG}: error: {message}\n")
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
