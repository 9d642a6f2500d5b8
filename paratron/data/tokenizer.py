"""Tokenizers chosen by Megatron-LM's flags.

`build_tokenizer` maps `--tokenizer-type` (and Pai-Megatron-Patch's
`--patch-tokenizer-type`) onto a class with the `Tokenizer` interface: `vocab_size`
(what the embedding covers before padding), `eod`, `pad` and `bos` (None when absent),
`encode`, `encode_batch` (one call for many texts, much faster in the Rust tokenizers)
and `decode`. Each type produces Megatron-LM's ids, so files written here and by its
`tools/preprocess_data.py` agree. Nothing here downloads: every path is local.
"""

from __future__ import annotations

import abc
import json
import os
from typing import Iterable, Sequence

from paratron.data.errors import DataError

#: The values of --tokenizer-type that build_tokenizer understands.
TOKENIZER_TYPES = ("GPT2BPETokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer",
                   "GPTSentencePieceTokenizer", "Llama2Tokenizer", "NullTokenizer")

#: Pai-Megatron-Patch's --patch-tokenizer-type values. Each is a Hugging Face
#: tokenizer folder (given with --tokenizer-model, or the --load checkpoint
#: folder), so they all become HuggingFaceTokenizer.
PATCH_TOKENIZER_TYPES = ("Qwen2Tokenizer", "Qwen3Tokenizer", "QwenTokenizer",
                         "DeepSeekV2Tokenizer", "DeepSeekV3Tokenizer", "LLamaTokenizer",
                         "LLama2Tokenizer", "LLama3Tokenizer", "Llama3Tokenizer",
                         "MistralTokenizer", "MixtralTokenizer", "GPT2BPETokenizer")


class Tokenizer(abc.ABC):
    """The interface every tokenizer here implements (see the module docstring)."""

    #: the --tokenizer-type this object was built for
    name: str = ""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce."""

    @property
    @abc.abstractmethod
    def eod(self) -> int:
        """The end-of-document id."""

    @property
    def pad(self) -> int | None:
        return None

    @property
    def bos(self) -> int | None:
        return None

    @property
    def eos(self) -> int | None:
        return self.eod

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the special tokens this tokenizer adds itself."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_plain(self, text: str) -> list[int]:
        """Encode without any special token the tokenizer adds on its own (a BOS, say).

        SFT builds prompts from pieces and must not get a BOS in front of each.
        """
        return self.encode(text)

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`."""

    # Chat templates (used by SFT): only Hugging Face tokenizers carry one.
    @property
    def chat_template(self) -> str | None:
        return None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        raise DataError(f"{self.name} has no chat template; SFT uses the default template")

    def describe(self) -> dict:
        """A JSON-able identity used in dataset cache descriptions."""
        return {"type": self.name, "vocab_size": self.vocab_size, "eod": self.eod}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod})"


# --------------------------------------------------------------------------- GPT-2


class GPT2BPETokenizer(Tokenizer):
    """GPT-2's byte-level BPE from `vocab.json` + `merges.txt` via `tokenizers`.

    The pipeline (byte-level pre-tokenizer with GPT-2's regex, no prefix
    space, BPE without dropout, byte-level decoder, `<|endoftext|>` as a
    special token) is the one in GPT-2's own `tokenizer.json`, so the ids
    equal `transformers.GPT2TokenizerFast` and Megatron's preprocessing.
    """

    name = "GPT2BPETokenizer"
    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import AddedToken, Tokenizer as _Tok, decoders, models, pre_tokenizers

        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path:
                raise DataError(f"GPT2BPETokenizer needs {flag}")
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file (given as {flag})")
        try:
            bpe = models.BPE.from_file(vocab_file, merge_file)
        except Exception as exc:  # the Rust error names neither file
            raise DataError(f"cannot read GPT-2 BPE files {vocab_file} / {merge_file}: "
                            f"{exc}") from exc
        tok = _Tok(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(self.EOD_TOKEN, special=True)])
        self._tok = tok
        self._eod = tok.token_to_id(self.EOD_TOKEN)
        if self._eod is None:
            raise DataError(f"{vocab_file}: has no {self.EOD_TOKEN} token")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips character offsets, which nothing here needs: about twice as fast.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


# --------------------------------------------------------------------------- Hugging Face


class HuggingFaceTokenizer(Tokenizer):
    """A local Hugging Face tokenizer folder (`tokenizer.json` and its config), read by
    `transformers.AutoTokenizer`; `encode` adds the tokenizer's own special tokens (e.g.
    a BOS) as Megatron does, and `eod` is the EOS token."""

    name = "HuggingFaceTokenizer"

    def __init__(self, path: str) -> None:
        if not path:
            raise DataError("HuggingFaceTokenizer needs --tokenizer-model "
                            "<folder with tokenizer.json>")
        if not os.path.isdir(path):
            raise DataError(f"{path}: not a folder (HuggingFaceTokenizer needs a local folder "
                            f"with tokenizer.json)")
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise DataError(f"{path}: cannot load a Hugging Face tokenizer "
                            f"({type(exc).__name__}: {exc})") from exc
        self.path = path
        self._vocab_size = len(self._tok)
        eod = self._tok.eos_token_id
        if eod is None:
            raise DataError(f"{path}: the tokenizer has no eos token to use as end-of-document")
        self._eod = int(eod)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int | None:
        return self._tok.pad_token_id

    @property
    def bos(self) -> int | None:
        return self._tok.bos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        # A fast tokenizer's Rust backend gives the same ids (special tokens come
        # from its post-processor) without offsets or Python-side objects.
        backend = getattr(self._tok, "_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=True)]
        return [list(ids) for ids in self._tok(list(texts))["input_ids"]]

    def encode_plain(self, text: str) -> list[int]:
        """Encode without the tokenizer's automatic special tokens (used by SFT)."""
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def chat_template(self) -> str | None:
        return getattr(self._tok, "chat_template", None)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._tok.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    def describe(self) -> dict:
        return {**super().describe(), "path": os.path.abspath(self.path)}


# --------------------------------------------------------------------------- SentencePiece


def _load_sentencepiece(model_file: str):
    if not model_file:
        raise DataError("SentencePiece tokenizers need --tokenizer-model <file.model>")
    if not os.path.isfile(model_file):
        raise DataError(f"{model_file}: no such file (given as --tokenizer-model)")
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=model_file)
    except Exception as exc:
        raise DataError(f"{model_file}: not a SentencePiece model ({exc})") from exc


class GPTSentencePieceTokenizer(Tokenizer):
    """A plain SentencePiece model: the model's own pieces and its EOS as `eod`."""

    name = "GPTSentencePieceTokenizer"

    def __init__(self, model_file: str) -> None:
        self.model_file = model_file
        self._sp = _load_sentencepiece(model_file)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def pad(self) -> int | None:
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else None

    @property
    def bos(self) -> int | None:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts)) if texts else []

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def describe(self) -> dict:
        return {**super().describe(), "path": os.path.abspath(self.model_file)}


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Llama-2's SentencePiece tokenizer: a BOS before every text, EOS as `eod`."""

    name = "Llama2Tokenizer"

    def encode(self, text: str) -> list[int]:
        return [self._sp.bos_id()] + self._sp.encode(text)

    def encode_plain(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        bos = self._sp.bos_id()
        return [[bos] + ids for ids in self._sp.encode(list(texts))] if texts else []


class SentencePieceTokenizer(GPTSentencePieceTokenizer):
    """Megatron's `SentencePieceTokenizer`: the model plus Megatron's special tokens.

    Megatron appends `<CLS> <SEP> <EOD> <MASK>` after the model's pieces
    (and the model's pad, bos and eos pieces, or `<PAD> <BOS> <EOS>` when it
    has none), and recognises those strings in text. `eod` is `<EOD>`.
    """

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str) -> None:
        super().__init__(model_file)
        sp = self._sp
        self._vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        self._special: dict[str, int] = {}

        def add(token: str) -> int:
            if token not in self._vocab:
                self._vocab[token] = len(self._vocab)
            self._special[token] = self._vocab[token]
            return self._vocab[token]

        def piece_or(default: str, idx: int) -> str:
            return sp.id_to_piece(idx) if 0 <= idx < sp.get_piece_size() else default

        add("<CLS>")
        add("<SEP>")
        self._eod = add("<EOD>")
        add("<MASK>")
        self._pad = add(piece_or("<PAD>", sp.pad_id()))
        self._bos = add(piece_or("<BOS>", sp.bos_id()))
        self._eos = add(piece_or("<EOS>", sp.eos_id()))
        self._inv_special = {v: k for k, v in self._special.items()}

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int | None:
        return self._pad

    @property
    def bos(self) -> int | None:
        return self._bos

    @property
    def eos(self) -> int | None:
        return self._eos

    def encode(self, text: str) -> list[int]:
        # Split the text at the earliest special-token string, encode the plain
        # pieces with the model, and emit the special ids in between.
        ids: list[int] = []
        start = 0
        while True:
            hits = [(text.find(tok, start), tok) for tok in self._special]
            hits = [(pos, tok) for pos, tok in hits if pos >= 0]
            if not hits:
                break
            pos, tok = min(hits)
            ids.extend(self._sp.encode(text[start:pos]))
            ids.append(self._special[tok])
            start = pos + len(tok)
        ids.extend(self._sp.encode(text[start:]))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        plain = [i for i, t in enumerate(texts) if not any(tok in t for tok in self._special)]
        out: list[list[int] | None] = [None] * len(texts)
        for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain]) if plain else []):
            out[i] = ids
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = self.encode(t)
        return out  # type: ignore[return-value]

    def decode(self, ids: Iterable[int]) -> str:
        text, run = "", []
        for i in (int(x) for x in ids):
            if i in self._inv_special:
                text += self._sp.decode(run) + " " + self._inv_special[i] + " "
                run = []
            else:
                run.append(i)
        return text + self._sp.decode(run)


# --------------------------------------------------------------------------- Null


class NullTokenizer(Tokenizer):
    """Text is already ids: `"5 17 3"` encodes to `[5, 17, 3]`.

    `vocab_size` is `N + 1` and `eod` is `N` for `--vocab-size N`, as in Megatron-LM's
    long-standing `_NullTokenizer` (the one the Megatron versions Paratron's users run).
    Megatron-LM main changed this in 2026 to vocab_size N, eod N - 1; pass
    `--vocab-size N-1` to get the same ids.
    """

    name = "NullTokenizer"

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) <= 0:
            raise DataError("NullTokenizer needs --vocab-size N (a positive number)")
        self._n = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._n + 1

    @property
    def eod(self) -> int:
        return self._n

    def encode(self, text: str) -> list[int]:
        try:
            return [int(x) for x in text.split()]
        except ValueError:
            bad = next(x for x in text.split() if not x.lstrip("-").isdigit())
            raise DataError(f"NullTokenizer input must be whitespace-separated integers, "
                            f"got {bad[:40]!r}") from None

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


# --------------------------------------------------------------------------- factory


def build_tokenizer(
    tokenizer_type: str,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
) -> Tokenizer:
    """Build the tokenizer that Megatron's `--tokenizer-type` (or `--patch-tokenizer-type`) names.

    `tokenizer_model` is a SentencePiece `.model` file or a Hugging Face
    folder; `vocab_size` is only for `NullTokenizer`. A Pai-Megatron-Patch
    name such as `Qwen2Tokenizer` or `DeepSeekV2Tokenizer` loads the Hugging
    Face folder in `tokenizer_model` (the caller passes `--load` there
    when no `--tokenizer-model` was given); `GPT2BPETokenizer` keeps its
    own meaning.
    """
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "HuggingFaceTokenizer" or tokenizer_type in PATCH_TOKENIZER_TYPES:
        return HuggingFaceTokenizer(tokenizer_model)
    sentencepiece = {c.name: c for c in (SentencePieceTokenizer, GPTSentencePieceTokenizer,
                                         Llama2Tokenizer)}
    if tokenizer_type in sentencepiece:
        return sentencepiece[tokenizer_type](tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    patch_only = tuple(t for t in PATCH_TOKENIZER_TYPES if t not in TOKENIZER_TYPES)
    known = ", ".join(TOKENIZER_TYPES + patch_only)
    raise DataError(f"unknown tokenizer type '{tokenizer_type}' (known: {known})")


# --------------------------------------------------------------------------- training


def train_bpe_tokenizer(
    files: Sequence[str],
    output_dir: str,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    eod_token: str = "<|endoftext|>",
    special_tokens: Sequence[str] = (),
) -> str:
    """Train a byte-level BPE on text files and save it as a Hugging Face tokenizer folder.

    This is how a demo gets a real tokenizer on a machine with nothing
    downloaded: any text will do. The folder holds `tokenizer.json` and a
    `tokenizer_config.json` naming `eod_token` as eos (and bos/unk), so
    `build_tokenizer("HuggingFaceTokenizer", tokenizer_model=output_dir)`
    loads it. `special_tokens` are extra whole tokens (e.g. chat markers).
    Training is deterministic for the same files and settings.
    Returns `output_dir`.
    """
    from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, trainers

    for f in files:
        if not os.path.isfile(f):
            raise DataError(f"{f}: no such file (tokenizer training input)")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[eod_token, *special_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train(list(files), trainer)
    os.makedirs(output_dir, exist_ok=True)
    tok.save(os.path.join(output_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod_token,
              "bos_token": eod_token, "unk_token": eod_token, "model_max_length": 1_000_000_000,
              "add_bos_token": False, "add_eos_token": False}
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return output_dir
