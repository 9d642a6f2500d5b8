"""Shared fixtures for the data tests: the real corpora in ../shared/data (skipped when absent)."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers.shared_data import shared_file


@pytest.fixture
def gpt2_files():
    """(vocab.json, merges.txt) of the original GPT-2 tokenizer."""
    return shared_file("gpt2/gpt2-vocab.json"), shared_file("gpt2/gpt2-merges.txt")


@pytest.fixture
def gpt2_folder(tmp_path, gpt2_files):
    """A folder holding the GPT-2 files under the names transformers expects."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    shutil.copy(gpt2_files[0], folder / "vocab.json")
    shutil.copy(gpt2_files[1], folder / "merges.txt")
    return folder


@pytest.fixture
def gpt2_args(gpt2_files):
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(gpt2_files[0]),
            "--merge-file", str(gpt2_files[1])]


@pytest.fixture(scope="session")
def bpe_folder(tmp_path_factory):
    """A byte-level BPE (500 ids, chat markers included) trained on the spot on Shakespeare."""
    from paratron.data.tokenizer import train_bpe_tokenizer

    text = shared_file("tinyshakespeare/input.txt").read_text()[:300_000]
    folder = tmp_path_factory.mktemp("bpe")
    (folder / "corpus.txt").write_text(text)
    return train_bpe_tokenizer([str(folder / "corpus.txt")], str(folder / "tokenizer"), vocab_size=500,
                               special_tokens=["<|im_start|>", "<|im_end|>"])
