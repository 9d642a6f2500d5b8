"""The tokenizer files that travel with a converted model.

Two kinds of folders are met: a Hugging Face tokenizer folder (tokenizer.json,
tokenizer_config.json, ...), and the GPT-2 BPE pair Megatron's GPT2BPETokenizer reads
(vocab.json + merges.txt, under any names). A training run's `<save>/tokenizer/` says
which files it holds in `paratron_tokenizer.json` (written by the trainer beside the
copies); without it the kind is recognised from the file names.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from paratron.checkpoint.files import read_tokenizer_info
from paratron.checkpoint.untrusted import inside
from paratron.convert.errors import ConversionError
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
            "chat_template.jinja", "chat_template.json", "qwen.tiktoken")


@dataclass(frozen=True)
class TokenizerFiles:
    kind: str                 # "gpt2" (vocab + merges) or "hf" (a Hugging Face folder)
    files: dict[str, Path]    # name in the destination -> source file

    @property
    def tokenizer_type(self) -> str:
        """Megatron's --tokenizer-type for these files."""
        return "GPT2BPETokenizer" if self.kind == "gpt2" else "HuggingFaceTokenizer"


def describe(folder: Path) -> TokenizerFiles | None:
    """What tokenizer `folder` holds, or None when it holds none."""
    try:
        info = read_tokenizer_info(folder)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    if info is not None:
        if (info["tokenizer_type"] == "GPT2BPETokenizer" and info["vocab_file"]
                and info["merge_file"]):
            return TokenizerFiles("gpt2", {"vocab.json": info["vocab_file"],
                                           "merges.txt": info["merge_file"]})
        model = info["tokenizer_model"]
        if model not in (None, folder):
            raise ConversionError(f"{folder}: the run's tokenizer is {model.name} "
                                  f"({info['tokenizer_type']}), which transformers does "
                                  f"not load as it is; give --tokenizer-model with a Hugging "
                                  f"Face tokenizer folder")
    try:  # a link may lead only inside the folder (or a cache snapshot's blobs)
        present = {name: inside(folder, name, str(folder)) for name in HF_FILES
                   if (folder / name).is_file()}
    except ValueError as error:
        raise ConversionError(str(error)) from None
    if not present:
        return None
    if "tokenizer.json" not in present and "tokenizer_config.json" not in present:
        if {"vocab.json", "merges.txt"} <= set(present):
            return TokenizerFiles("gpt2", {k: present[k] for k in ("vocab.json", "merges.txt")})
    return TokenizerFiles("hf", present)


def copy_into(files: TokenizerFiles, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name, src in files.files.items():
        if not src.is_file():
            raise ConversionError(f"{src}: missing tokenizer file")
        shutil.copyfile(src, dst / name)


def vocab_size(files: TokenizerFiles) -> int | None:
    """How many ids the tokenizer produces (None when it cannot be read)."""
    from paratron.data.errors import DataError
    from paratron.data.tokenizer import build_tokenizer

    try:
        if files.kind == "gpt2":
            return build_tokenizer("GPT2BPETokenizer", vocab_file=str(files.files["vocab.json"]),
                                   merge_file=str(files.files["merges.txt"])).vocab_size
        folder = next(iter(files.files.values())).parent
        return build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(folder)).vocab_size
    except (DataError, OSError, ValueError):
        return None
