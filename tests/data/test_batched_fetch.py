"""A micro-batch read whole (`__getitems__`, the loader's path) is exactly the samples read
one by one and stacked, and exactly Megatron's samples: the token stream sliced by the
sample index, with masks and positions from Megatron's own loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from paratron.data.gpt_dataset import build_train_valid_test_datasets
from paratron.data.mock import MockCorpus
from paratron.data.sampler import InProcessLoader, build_pretraining_data_loader
from paratron.data.sft import SFTDataset
from paratron.data.tokenizer import NullTokenizer
from tests.data.test_gpt_dataset import random_docs, write_corpus

SEQ = 32
FLAGS = {"plain": {}, "eod": {"eod_mask_loss": True},
         "resets": {"eod_mask_loss": True, "reset_position_ids": True,
                    "reset_attention_mask": True, "create_attention_mask": True},
         "positions": {"reset_position_ids": True}}


def megatron_masks(tokens: torch.Tensor, eod: int, eod_mask_loss=False,
                   reset_position_ids=False, reset_attention_mask=False,
                   create_attention_mask=False) -> dict:
    """Megatron-LM's `_get_ltor_masks_and_position_ids`, loop and all, for one sample."""
    s = tokens.numel()
    attention_mask = torch.tril(torch.ones(s, s)).unsqueeze(0)
    loss_mask = torch.ones(s)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    position_ids = torch.arange(s)
    prev = 0
    for i in position_ids[tokens == eod].tolist():
        if reset_attention_mask:
            attention_mask[0, i + 1:, : i + 1] = 0
        if reset_position_ids:
            position_ids[i + 1:] -= i + 1 - prev
            prev = i + 1
    out = {"loss_mask": loss_mask, "position_ids": position_ids}
    if create_attention_mask:
        out["attention_mask"] = attention_mask < 0.5
    return out


def corpus(tmp_path, tok, seed=0, name="c"):
    docs = random_docs(seed, 150, tok.eod, max_len=25)  # short documents: samples span several
    write_corpus(str(tmp_path / name), docs)
    return str(tmp_path / name), docs


def stacked(dataset, indices):
    return default_collate([dataset[i] for i in indices])


def assert_same(batch, expected):
    assert list(batch) == list(expected)
    for key in expected:
        assert batch[key].dtype == expected[key].dtype, key
        assert torch.equal(batch[key], expected[key]), key


@pytest.mark.parametrize("flags", list(FLAGS))
def test_gpt_batches_are_megatron_samples(tmp_path, flags):
    tok = NullTokenizer(1000)
    prefix, docs = corpus(tmp_path, tok)
    train, _, _ = build_train_valid_test_datasets(
        [prefix], "100,0,0", SEQ, 1234, (40, 0, 0), tok, cache_path=str(tmp_path / "cache"),
        **FLAGS[flags])
    stream = np.concatenate([docs[d] for d in train.document_index])
    indices = [5, 0, 17, 3, 3, 39]
    batch = train.__getitems__(indices)
    assert_same(batch, stacked(train, indices))
    for row, k in enumerate(indices):
        j = int(train.shuffle_index[k])
        text = torch.from_numpy(stream[j * SEQ : j * SEQ + SEQ + 1].astype(np.int64))
        assert torch.equal(batch["tokens"][row], text[:-1])
        assert torch.equal(batch["labels"][row], text[1:])
        for key, value in megatron_masks(text[:-1], tok.eod, **FLAGS[flags]).items():
            assert torch.equal(batch[key][row], value.to(batch[key].dtype)), key


def test_blended_batches_put_rows_back_in_order(tmp_path):
    tok = NullTokenizer(1000)
    a, _ = corpus(tmp_path, tok, 0, "a")
    b, _ = corpus(tmp_path, tok, 1, "b")
    train, _, _ = build_train_valid_test_datasets(
        ["0.3", a, "0.7", b], "100,0,0", SEQ, 7, (30, 0, 0), tok,
        cache_path=str(tmp_path / "cache"), reset_position_ids=True)
    indices = list(range(12))
    batch = train.__getitems__(indices)
    assert len(set(batch["dataset_id"].tolist())) == 2  # both corpora in one micro-batch
    assert_same(batch, stacked(train, indices))


@pytest.mark.parametrize("packing", [True, False])
def test_sft_batches_equal_samples(packing):
    rng = np.random.default_rng(0)
    conversations = []
    for _ in range(30):
        n = int(rng.integers(2, 30))
        conversations.append((rng.integers(0, 500, n), (rng.random(n) > 0.4).astype(np.int8)))
    ds = SFTDataset(conversations, seq_length=48, pad=499, num_samples=20, seed=2,
                    max_padding_length=None if packing else 40, sequence_packing=packing,
                    create_attention_mask=packing)
    indices = [3, 1, 4, 1, 5, 9]
    assert_same(ds.__getitems__(indices), stacked(ds, indices))


def test_mock_corpus_slices_are_its_documents():
    mock = MockCorpus(vocab_size=300, eod=299)
    for doc in (0, 7, 123):
        size = int(mock.sequence_lengths[doc])
        whole = np.concatenate([(np.arange(size - 1) + 1) % 300, [299]])
        assert np.array_equal(mock.get(doc), whole)
        assert np.array_equal(mock.get(doc, 2, size - 3), whole[2 : size - 1])


@pytest.mark.parametrize("workers", [None, 1])
def test_loader_yields_stacked_samples(tmp_path, workers):
    tok = NullTokenizer(1000)
    prefix, _ = corpus(tmp_path, tok)
    train, _, _ = build_train_valid_test_datasets(
        [prefix], "100,0,0", SEQ, 1234, (40, 0, 0), tok, cache_path=str(tmp_path / "cache"))
    loader = build_pretraining_data_loader(train, 8, 2, 1, 2, num_workers=workers)
    assert isinstance(loader, InProcessLoader) == (workers is None)
    for step, batch in zip(range(5), loader):
        first = 8 + step * 4 + 2  # data-parallel rank 1 of 2 takes the second pair
        assert_same(batch, stacked(train, [first, first + 1]))
