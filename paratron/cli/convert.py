"""`paratron convert`: checkpoints between Hugging Face, Megatron-LM and Paratron.

The flags are those of Megatron-LM's `tools/checkpoint/convert.py`:

    paratron convert --model-type GPT --loader hf --saver paratron \\
        --load-dir qwen2.5-7b-hf --save-dir qwen2.5-7b-paratron \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2 --bf16

Loaders: `hf` (also as `llama_mistral`/`mixtral_hf`), `paratron`, `megatron` (a
torch_dist folder or legacy `model_optim_rng.pt` files; also as `mcore`). Savers:
`paratron`, `hf`, `megatron` (Megatron-LM's legacy `torch` format: a `release`
checkpoint sharded at the target sizes, its args a Namespace of builtins that
--use-checkpoint-args reads; also as `mcore`, `core`, `legacy`). Megatron's files are
pickles, read with no code in them run (`paratron.checkpoint.safe_pickle`);
`--trust-pickle` unpickles in full only a legacy file holding a global that reader
refuses. The target sizes are checked against the model
and recorded; Paratron checkpoints hold unsharded tensors, so any layout loads them. The
output is written to a temporary folder and renamed at the end: after an error, SIGTERM or
Ctrl-C nothing is left at --save-dir, and a refused input is one line on stderr.
"""

from __future__ import annotations

import argparse
import difflib
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from paratron.convert.errors import ConversionError
from paratron.data.errors import DataError
from paratron.model.config import TransformerConfig
from paratron.options import ConfigError

LOADERS = {"hf": "hf", "llama_mistral": "hf", "mixtral_hf": "hf", "paratron": "paratron",
           "megatron": "megatron", "mcore": "megatron"}
SAVERS = {"paratron": "paratron", "hf": "hf", "megatron": "megatron", "mcore": "megatron",
          "core": "megatron", "legacy": "megatron"}
# Preset settings that describe training or the context length chosen, not the weights.
_PRESET_IGNORED = {"seq_length", "max_position_embeddings", "hidden_dropout",
                   "attention_dropout", "init_method_std", "moe_router_load_balancing_type",
                   "moe_aux_loss_coeff", "moe_token_dispatcher_type"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConversionError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paratron convert", allow_abbrev=False,
                     description="Convert checkpoints: Hugging Face / Megatron-LM <-> Paratron.")
    parser.add_argument("--model-type", required=True, choices=["GPT"],
                        help="model family (Paratron converts GPT-style decoders)")
    parser.add_argument("--loader", required=True, help="hf | paratron | megatron")
    parser.add_argument("--saver", required=True, help="paratron | hf | megatron")
    parser.add_argument("--load-dir", required=True, help="folder to read")
    parser.add_argument("--save-dir", required=True, help="folder to create")
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1)
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--target-expert-parallel-size", type=int, default=1)
    parser.add_argument("--target-decoder-first-pipeline-num-layers",
                        "--decoder-first-pipeline-num-layers", type=int, default=None,
                        dest="first_stage_layers",
                        help="layers on the first pipeline stage (an uneven split)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="save weights in bfloat16")
    precision.add_argument("--fp16", action="store_true", help="save weights in float16")
    parser.add_argument("--model-size", help="a Paratron preset (e.g. qwen2.5-7b) the "
                        "checkpoint must match")
    parser.add_argument("--tokenizer-model", help="Hugging Face tokenizer folder (or GPT-2 "
                        "vocab.json + merges.txt folder) to ship with the converted model")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="pad the vocabulary to a multiple of this x target TP")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="unpickle in full a Megatron-LM model_optim_rng.pt that "
                        "holds a global the safe reader refuses (can run code in it)")
    parser.add_argument("--no-load-optim", action="store_true",
                        help="convert a Megatron-LM run's weights only (its distributed-"
                        "optimizer state and progress travel to --saver paratron otherwise)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest Hugging Face safetensors shard (default 5GB)")
    parser.add_argument("--checkpoint-type", choices=["hf"], default=None,
                        help="accepted with --loader llama_mistral (always hf)")
    for flag in ("--loader-transformer-impl", "--saver-transformer-impl"):
        parser.add_argument(flag, default=None, help="accepted; no effect")
    return parser


def _choice(value: str, known, flag: str) -> None:
    if value not in known:
        close = difflib.get_close_matches(value, list(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConversionError(f"{flag} {value}: unknown{hint} (known: {', '.join(known)})")


def check_preset(config: TransformerConfig, vocab_rows: int, name: str) -> None:
    """Refuse a checkpoint whose model is not the preset `name`."""
    from paratron.model.presets import PRESETS

    _choice(name, PRESETS, "--model-size")
    for key, want in PRESETS[name].items():
        if key in _PRESET_IGNORED or not hasattr(config, key):
            continue
        got = vocab_rows if key == "padded_vocab_size" else getattr(config, key)
        if got != want:
            raise ConversionError(f"--model-size {name}: the checkpoint has {key} {got!r}, "
                                  f"the preset {want!r} (a checkpoint of another model?)")


def run(args: argparse.Namespace, warn) -> str:
    from paratron.convert import hf_export, paratron_io
    from paratron.convert.hf_source import read_hf_folder
    from paratron.convert.megatron_dist import read_megatron
    from paratron.convert.megatron_saver import save_megatron_checkpoint
    from paratron.convert.streaming import check_new_folder
    from paratron.convert.tokenizer_files import describe

    _choice(args.loader, LOADERS, "--loader")
    _choice(args.saver, SAVERS, "--saver")
    loader, saver = LOADERS[args.loader], SAVERS[args.saver]
    targets = (args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
               args.target_expert_parallel_size)
    if min(targets) < 1:
        raise ConversionError("--target-*-parallel-size must be positive")
    if saver == "hf" and (targets != (1, 1, 1) or args.first_stage_layers is not None):
        raise ConversionError("--target-*-parallel-size apply to --saver paratron and "
                              "megatron; a Hugging Face folder has no parallel layout")
    if args.make_vocab_size_divisible_by < 1:
        raise ConversionError("--make-vocab-size-divisible-by must be positive")
    max_shard = hf_export.parse_size(args.max_shard_size)
    check_new_folder(args.save_dir)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None

    if loader == "hf":
        model = read_hf_folder(args.load_dir)
    elif loader == "paratron":
        model = paratron_io.read_paratron_checkpoint(args.load_dir)
    else:
        model = read_megatron(args.load_dir, trust_pickle=args.trust_pickle, warn=warn,
                              optimizer=saver == "paratron" and not args.no_load_optim)
    if args.model_size:
        check_preset(model.config, model.vocab_size, args.model_size)
    if args.tokenizer_model:
        folder = Path(args.tokenizer_model)
        found = describe(folder) if folder.is_dir() else None
        if found is None:
            raise ConversionError(f"--tokenizer-model {folder}: not a tokenizer folder "
                                  f"(Hugging Face tokenizer files, or GPT-2's vocab.json + "
                                  f"merges.txt)")
        model.tokenizer = found
    for note in model.notes:
        warn(f"note: {note}")
    target = paratron_io.TargetLayout(*targets, args.make_vocab_size_divisible_by,
                                      args.first_stage_layers)
    if saver == "paratron":
        out = paratron_io.save_paratron_checkpoint(model, args.save_dir, target, dtype)
    elif saver == "megatron":
        out = save_megatron_checkpoint(model, args.save_dir, target, dtype)
    else:
        out = hf_export.save_hf_folder(model, args.save_dir, dtype=dtype,
                                       max_shard_size=max_shard)
    return f"converted {model.source} ({args.loader}) -> {out} ({args.saver})"


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived during the conversion (a BaseException, as
    KeyboardInterrupt, so no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_raise():
    """Turn SIGTERM and SIGINT into `Stopped` for the block, so the temporary output
    folder is removed on the way out instead of left behind by a killed process. Once
    one arrived, further ones are ignored until the block ends: the cleanup runs whole.
    Handlers can only be set from the main thread; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    def warn(line: str) -> None:
        sys.stderr.write(line + "\n")

    try:
        args = build_parser().parse_args(argv)
        with signals_raise():
            print(run(args, warn))
    except (ConversionError, ConfigError, DataError) as exc:
        sys.stderr.write(f"paratron convert: error: {exc}\n")
        return 2
    except Stopped as exc:
        sys.stderr.write(f"paratron convert: stopped by {exc}; nothing written at "
                         f"--save-dir\n")
        return 128 + exc.signum
    except KeyboardInterrupt:
        sys.stderr.write("paratron convert: interrupted; nothing written at --save-dir\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
