"""Tokenizers by Megatron's --tokenizer-type, checked against independent implementations."""

from __future__ import annotations

import json

import pytest

from tests.helpers.shared_data import shared_file
from paratron.data.errors import DataError
from paratron.data.tokenizer import build_tokenizer


def c4_texts(n):
    path = shared_file("pretrain/c4_demo.jsonl")
    with open(path) as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def test_gpt2_bpe_matches_transformers(gpt2_files, gpt2_folder):
    from transformers import GPT2TokenizerFast

    reference = GPT2TokenizerFast.from_pretrained(str(gpt2_folder))
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(gpt2_files[0]), merge_file=str(gpt2_files[1]))
    assert tok.vocab_size == 50257 and tok.eod == 50256
    texts = c4_texts(20) + ["  leading spaces", "emoji 🙂 and ünïcödé", "", "a<|endoftext|>b"]
    assert tok.encode_batch(texts) == [reference(t)["input_ids"] for t in texts]
    assert tok.encode(texts[0]) == reference(texts[0])["input_ids"]
    assert tok.decode(tok.encode(texts[1])) == texts[1]


def test_huggingface_folder_trained_on_the_spot(bpe_folder):
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=bpe_folder)
    assert tok.vocab_size == 500
    assert tok.eod == 0  # <|endoftext|> is the first special token
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "All:", ""]) == [ids, tok.encode("All:"), []]
    assert tok.encode("<|im_start|>user") [0] == 1  # special tokens stay whole
    # Pai-Megatron-Patch names load the same folder.
    assert build_tokenizer("Qwen2Tokenizer", tokenizer_model=bpe_folder).encode(text) == ids


def test_sentencepiece_flavours(tmp_path):
    import sentencepiece as spm

    corpus = shared_file("tinyshakespeare/input.txt")
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(corpus.read_text().splitlines()[:3000]))
    spm.SentencePieceTrainer.train(
        input=str(lines), model_prefix=str(tmp_path / "sp"), vocab_size=300, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    model = str(tmp_path / "sp.model")
    sp = spm.SentencePieceProcessor(model_file=model)
    text = "Before we proceed any further"

    plain = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=model)
    assert plain.encode(text) == sp.encode(text) and plain.eod == 2 and plain.vocab_size == 300

    llama = build_tokenizer("Llama2Tokenizer", tokenizer_model=model)
    assert llama.encode(text) == [1] + sp.encode(text) and llama.eod == 2
    assert llama.encode_batch([text, "x"]) == [llama.encode(text), llama.encode("x")]

    megatron = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    # <CLS> <SEP> <EOD> <MASK> <PAD> are appended; bos/eos already exist.
    assert megatron.vocab_size == 305 and megatron.eod == 302 and megatron.pad == 304
    assert megatron.encode(f"{text}<EOD>x") == sp.encode(text) + [302] + sp.encode("x")
    assert megatron.encode_batch([text, "a<SEP>b"]) == [sp.encode(text), sp.encode("a") + [301] + sp.encode("b")]


def test_null_tokenizer_follows_megatron():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert tok.vocab_size == 101 and tok.eod == 100
    assert tok.encode("5 17\t3\n") == [5, 17, 3]
    assert tok.decode([5, 17, 3]) == "5 17 3"
    with pytest.raises(DataError, match="integers"):
        tok.encode("5 x 3")


def test_bad_tokenizer_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown tokenizer type"):
        build_tokenizer("NoSuchTokenizer")
    with pytest.raises(DataError, match="--vocab-file"):
        build_tokenizer("GPT2BPETokenizer")
    with pytest.raises(DataError, match="not a folder"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
