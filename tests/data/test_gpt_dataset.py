"""GPT dataset: Megatron's document / sample / shuffle indices, splits, cache, masks, blending, sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paratron.data.data_paths import parse_blend
from paratron.data.errors import DataError
from paratron.data.gpt_dataset import (
    build_train_valid_test_datasets,
    get_train_valid_test_num_samples,
    masks_and_position_ids,
)
from paratron.data.indexed_dataset import IndexedDatasetWriter
from paratron.data.indices import (
    _greedy_loop,
    build_blending_indices,
    build_gpt_indices,
    build_sample_index,
    parse_split,
    split_matrix,
    split_range,
)
from paratron.data.sampler import MegatronPretrainingSampler
from paratron.data.tokenizer import NullTokenizer


# --------------------------------------------------------------------------- plain references


def reference_sample_index(sizes, document_index, seq_length, num_epochs, tokens_per_epoch):
    """Megatron's helpers.cpp build_sample_idx, transcribed as a plain token-walking loop."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    rows = [(0, 0)]
    position, offset = 0, 0
    while len(rows) <= num_samples:
        remaining = seq_length + 1
        while remaining != 0:
            length = sizes[document_index[position]] - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                if position == len(document_index) - 1:
                    offset = sizes[document_index[position]] - 1
                    break
                position += 1
                offset = 0
        rows.append((position, offset))
    return np.array(rows)


def reference_indices(sizes, ids, seq_length, num_samples, seed):
    """The issue's rules, step by step with Python loops (no vectorisation)."""
    tokens_per_epoch = sum(int(sizes[i]) for i in ids)
    epochs = 1
    while epochs * tokens_per_epoch < num_samples * seq_length + 1:
        epochs += 1
    separate = False
    if epochs > 1:
        before_last = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = (num_samples - before_last) < int(0.8 * per_epoch)
    rng = np.random.RandomState(seed)
    if separate:
        first = np.array(list(ids) * (epochs - 1), dtype=np.int32)
        rng.shuffle(first)
        last = np.array(list(ids), dtype=np.int32)
        rng.shuffle(last)
        document_index = np.concatenate([first, last])
    else:
        document_index = np.array(list(ids) * epochs, dtype=np.int32)
        rng.shuffle(document_index)
    sample_index = reference_sample_index(sizes, document_index, seq_length, epochs, tokens_per_epoch)
    total = len(sample_index) - 1
    if separate:
        a = np.arange(before_last, dtype=np.uint32)
        rng.shuffle(a)
        b = np.arange(before_last, total, dtype=np.uint32)
        rng.shuffle(b)
        shuffle_index = np.concatenate([a, b])
    else:
        shuffle_index = np.arange(total, dtype=np.uint32)
        rng.shuffle(shuffle_index)
    return document_index, sample_index, shuffle_index, epochs, separate


# --------------------------------------------------------------------------- index tests


@pytest.mark.parametrize("trial", range(40))
def test_sample_index_equals_reference_loop(trial):
    rng = np.random.default_rng(trial)
    n_docs = int(rng.integers(1, 40))
    sizes = rng.integers(1 if trial % 2 else 0, 50, size=n_docs).astype(np.int32)
    if sizes.sum() < 2:
        sizes[0] = 2
    seq_length = int(rng.integers(1, 64))
    epochs = int(rng.integers(1, 4))
    document_index = np.tile(np.arange(n_docs, dtype=np.int32), epochs)
    rng.shuffle(document_index)
    tokens = int(sizes.sum())
    fast = build_sample_index(sizes, document_index, seq_length, epochs, tokens)
    assert fast.dtype == np.int32
    np.testing.assert_array_equal(fast, reference_sample_index(sizes, document_index, seq_length, epochs, tokens))


@pytest.mark.parametrize(
    "case,n_docs,seq_length",
    [
        ("part of one epoch", 30, 16),
        ("several epochs, last one well used", 30, 8),
        ("several epochs, last one barely used", 30, 8),
        ("many epochs over few documents", 5, 32),
    ],
)
def test_full_indices_equal_reference(case, n_docs, seq_length):
    rng = np.random.default_rng(n_docs * 100 + seq_length)
    sizes = rng.integers(1, 40, size=n_docs + 7).astype(np.int32)
    ids = np.arange(3, 3 + n_docs, dtype=np.int32)  # a split in the middle of the corpus
    per_epoch = (int(sizes[ids].sum()) - 1) // seq_length
    num_samples, epochs, separate = {
        "part of one epoch": (per_epoch // 2, 1, False),
        "several epochs, last one well used": (3 * per_epoch - 1, 3, False),
        "several epochs, last one barely used": (2 * per_epoch + 3, 3, True),
        "many epochs over few documents": (20 * per_epoch + 1, None, None),
    }[case]
    ref_doc, ref_sample, ref_shuffle, ref_epochs, ref_separate = reference_indices(
        sizes, ids, seq_length, num_samples, 1234)
    assert epochs is None or (ref_epochs, ref_separate) == (epochs, separate)
    doc, sample, shuffle = build_gpt_indices(sizes, ids, seq_length, num_samples, 1234)
    np.testing.assert_array_equal(doc, ref_doc)
    np.testing.assert_array_equal(sample, ref_sample)
    np.testing.assert_array_equal(shuffle, ref_shuffle)
    assert doc.dtype == np.int32 and shuffle.dtype == np.uint32
    assert len(sample) - 1 >= num_samples


def test_split_rounding_and_defaults():
    assert parse_split("949,50,1") == pytest.approx([0.949, 0.05, 0.001])
    assert parse_split("98,2") == pytest.approx([0.98, 0.02, 0.0])
    matrix = split_matrix(parse_split("98,2,0"))
    assert matrix[2] is None
    assert split_range(matrix[0], 300) == (0, 294) and split_range(matrix[1], 300) == (294, 300)
    # round(), not floor: 1/3 of 100 sequences -> 33 and 67.
    thirds = split_matrix(parse_split("1,1,1"))
    assert [split_range(b, 100) for b in thirds] == [(0, 33), (33, 67), (67, 100)]


def test_sample_counts_follow_megatron():
    assert get_train_valid_test_num_samples(8, train_iters=100, eval_interval=10, eval_iters=5) == (800, 440, 40)
    assert get_train_valid_test_num_samples(4, train_samples=1000, eval_interval=100, eval_iters=2) == (1000, 24, 8)


def test_parse_blend_forms():
    assert parse_blend(["a"]) == (["a"], None)
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_blend(["0.3 a 0.7 b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    with pytest.raises(DataError):
        parse_blend(["0.3", "a", "b", "c"])


# --------------------------------------------------------------------------- datasets on files


def write_corpus(prefix, docs, dtype=np.uint16):
    writer = IndexedDatasetWriter(prefix + ".bin", dtype)
    for doc in docs:
        writer.add_document(doc)
    writer.finalize(prefix + ".idx")


def random_docs(seed, n, eod, vocab=1000, max_len=60):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, max_len))).tolist() + [eod] for _ in range(n)]


def test_samples_are_the_token_stream(tmp_path):
    tok = NullTokenizer(1000)
    docs = random_docs(0, 120, tok.eod)
    write_corpus(str(tmp_path / "c"), docs)
    train, valid, test = build_train_valid_test_datasets(
        [str(tmp_path / "c")], "90,10,0", 32, 1234, (200, 20, 0), tok, cache_path=str(tmp_path / "cache"))
    assert test is None
    for ds, (lo, hi) in ((train, (0, 108)), (valid, (108, 120))):
        stream = np.concatenate([docs[d] for d in ds.document_index])
        assert set(np.asarray(ds.document_index).tolist()) <= set(range(lo, hi))
        for k in range(len(ds)):
            j = int(ds.shuffle_index[k])
            np.testing.assert_array_equal(ds.sample_tokens(k), stream[j * 32 : j * 32 + 33])
        sample = ds[3]
        assert sample["tokens"].dtype == torch.int64 and sample["tokens"].shape == (32,)
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
        assert sample["loss_mask"].dtype == torch.float32 and bool((sample["loss_mask"] == 1).all())
        assert torch.equal(sample["position_ids"], torch.arange(32))
    assert len(train) >= 200 and len(valid) >= 20


def test_cache_is_reused_and_memory_mapped(tmp_path):
    tok = NullTokenizer(1000)
    write_corpus(str(tmp_path / "c"), random_docs(1, 50, tok.eod))
    args = ([str(tmp_path / "c")], "1,0,0", 16, 7, (100, 0, 0), tok)
    first = build_train_valid_test_datasets(*args, cache_path=str(tmp_path / "cache"))[0]
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 4 and all("GPTDataset-train" in f for f in files)
    second = build_train_valid_test_datasets(*args, cache_path=str(tmp_path / "cache"))[0]
    assert isinstance(second.sample_index.base, np.memmap)  # read through the mapping
    np.testing.assert_array_equal(first.sample_index, second.sample_index)
    assert all(torch.equal(first[i]["tokens"], second[i]["tokens"]) for i in range(10))
    # A different seed is a different cache entry, and different samples.
    other = build_train_valid_test_datasets(args[0], "1,0,0", 16, 8, (100, 0, 0), tok,
                                            cache_path=str(tmp_path / "cache"))[0]
    assert len(list((tmp_path / "cache").iterdir())) == 8
    assert not all(torch.equal(first[i]["tokens"], other[i]["tokens"]) for i in range(10))


def test_default_cache_folder_and_unwritable_cache(tmp_path):
    tok = NullTokenizer(1000)
    write_corpus(str(tmp_path / "c"), random_docs(2, 20, tok.eod))
    build_train_valid_test_datasets([str(tmp_path / "c")], "1,0,0", 8, 1, (10, 0, 0), tok)
    assert (tmp_path / "c" / "cache" / "GPTDataset_indices").is_dir()  # Megatron's default place
    (tmp_path / "blocked").write_text("a file, not a folder")
    with pytest.raises(DataError, match="data-cache-path"):
        build_train_valid_test_datasets([str(tmp_path / "c")], "1,0,0", 8, 1, (10, 0, 0), tok,
                                        cache_path=str(tmp_path / "blocked" / "sub"))


def test_bad_prefix_and_empty_split(tmp_path):
    tok = NullTokenizer(1000)
    with pytest.raises(DataError, match="does not exist"):
        build_train_valid_test_datasets([str(tmp_path / "nope")], "1,0,0", 8, 1, (10, 0, 0), tok)
    write_corpus(str(tmp_path / "c"), random_docs(3, 5, tok.eod))
    with pytest.raises(DataError, match="valid split"):
        build_train_valid_test_datasets([str(tmp_path / "c")], "99,1,0", 8, 1, (10, 5, 0), tok,
                                        cache_path=str(tmp_path / "cache"))


def test_eod_masks_and_resets_match_megatron_loop():
    tokens = torch.tensor([5, 6, 9, 7, 9, 9, 1, 2])  # eod = 9
    out = masks_and_position_ids(tokens, 9, True, True, True, True)
    assert out["loss_mask"].tolist() == [1, 1, 0, 1, 0, 0, 1, 1]
    assert out["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 0, 1]
    assert out["document_ids"].tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    # Megatron's loop: after the eod at i, rows > i cannot see columns <= i.
    reference = torch.tril(torch.ones(8, 8))
    for i in (2, 4, 5):
        reference[i + 1 :, : i + 1] = 0
    assert torch.equal(out["attention_mask"][0], reference < 0.5)
    plain = masks_and_position_ids(tokens, 9, False, False, False, False)
    assert set(plain) == {"loss_mask", "position_ids"} and plain["position_ids"].tolist() == list(range(8))


def test_mock_data_is_deterministic_and_megatron_shaped():
    tok = NullTokenizer(500)
    a = build_train_valid_test_datasets(None, None, 64, 1234, (50, 10, 10), tok, mock=True)
    b = build_train_valid_test_datasets(None, None, 64, 1234, (50, 10, 10), tok, mock=True)
    for x, y in zip(a, b):
        assert all(torch.equal(x[i]["tokens"], y[i]["tokens"]) for i in range(5))
    sample = a[0][0]["tokens"]
    # Inside a mock document each token is the previous one + 1 (mod vocab), eod ends it.
    steps = (sample[1:] - sample[:-1]).tolist()
    assert all(s == 1 or t == tok.eod or u == tok.eod for s, t, u in zip(steps, sample[1:].tolist(), sample[:-1].tolist()))
    # No tokenizer: vocab_size ids, the last is eod.
    c = build_train_valid_test_datasets(None, None, 64, 1234, (50, 10, 10), None, mock=True, vocab_size=501)
    assert torch.equal(c[0][0]["tokens"], a[0][0]["tokens"])


# --------------------------------------------------------------------------- blending


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.5, 0.5], [1, 3], [0.123, 0.877], [2, 1, 1], [5, 1, 3, 1]])
def test_blending_follows_weights_and_megatron_rule(weights):
    w = (np.array(weights, dtype=np.float64) / np.sum(weights)).tolist()
    size = 20000
    dataset_index, sample_index = build_blending_indices(w, size)
    assert dataset_index.dtype == np.int16 and sample_index.dtype == np.int64
    # The exact greedy rule, one position at a time.
    np.testing.assert_array_equal(dataset_index, _greedy_loop(w, size))
    # Every prefix is within one sample (per dataset) of its share.
    counts = np.zeros(len(w))
    for s in range(0, size, 997):
        prefix = np.bincount(dataset_index[:s], minlength=len(w))
        assert np.all(np.abs(prefix - np.array(w) * s) <= 1.0 + 1e-9)
    # Each dataset's samples are taken in order.
    for i in range(len(w)):
        assert sample_index[dataset_index == i].tolist() == list(range(int((dataset_index == i).sum())))
    # Deterministic.
    np.testing.assert_array_equal(build_blending_indices(w, size)[0], dataset_index)
    del counts


def test_blended_dataset_from_data_path(tmp_path):
    tok = NullTokenizer(1000)
    write_corpus(str(tmp_path / "a"), [[1] * 20 + [tok.eod] for _ in range(40)])
    write_corpus(str(tmp_path / "b"), [[2] * 20 + [tok.eod] for _ in range(40)])
    data_path = ["0.25", str(tmp_path / "a"), "0.75", str(tmp_path / "b")]
    train, valid, _ = build_train_valid_test_datasets(
        data_path, "9,1,0", 16, 1234, (400, 40, 0), tok, cache_path=str(tmp_path / "cache"))
    # Megatron: the blend has sum_i ceil(N * w_i) samples.
    assert len(train) == 100 + 300 and len(valid) == 10 + 30
    origin = [int(train[i]["dataset_id"]) for i in range(len(train))]
    assert origin.count(0) == 100 and origin.count(1) == 300
    # Samples come from the dataset they claim (corpus a holds 1s, b holds 2s).
    for i in range(0, len(train), 37):
        values = set(train[i]["tokens"].tolist()) - {tok.eod}
        assert values == {origin[i] + 1}
    # Per-corpus datasets were built with the 0.5 % surplus: ceil(ceil(400 * 0.25) * 1.005) = 101.
    assert len(train.datasets[0]) >= 101
    again = build_train_valid_test_datasets(
        data_path, "9,1,0", 16, 1234, (400, 40, 0), tok, cache_path=str(tmp_path / "cache"))[0]
    assert [int(again[i]["dataset_id"]) for i in range(len(again))] == origin


def test_data_path_config_yaml(tmp_path):
    tok = NullTokenizer(1000)
    write_corpus(str(tmp_path / "a"), random_docs(4, 30, tok.eod))
    write_corpus(str(tmp_path / "b"), random_docs(5, 30, tok.eod))
    (tmp_path / "blend.yaml").write_text(
        f"data_path:\n  - 0.6\n  - {tmp_path / 'a'}\n  - 0.4\n  - {tmp_path / 'b'}\nsplit: 1,0,0\n")
    from_yaml = build_train_valid_test_datasets(None, None, 8, 1, (50, 0, 0), tok,
                                                data_path_config=str(tmp_path / "blend.yaml"),
                                                cache_path=str(tmp_path / "cache"))[0]
    direct = build_train_valid_test_datasets(["0.6", str(tmp_path / "a"), "0.4", str(tmp_path / "b")], "1,0,0",
                                             8, 1, (50, 0, 0), tok, cache_path=str(tmp_path / "cache"))[0]
    assert len(from_yaml) == len(direct) == 50
    assert all(torch.equal(from_yaml[i]["tokens"], direct[i]["tokens"]) for i in range(len(direct)))


def test_per_split_data_paths(tmp_path):
    tok = NullTokenizer(1000)
    write_corpus(str(tmp_path / "tr"), random_docs(6, 30, tok.eod))
    write_corpus(str(tmp_path / "va"), random_docs(7, 10, tok.eod))
    train, valid, test = build_train_valid_test_datasets(
        None, None, 8, 1, (20, 5, 0), tok, train_data_path=[str(tmp_path / "tr")],
        valid_data_path=[str(tmp_path / "va")], cache_path=str(tmp_path / "cache"))
    assert test is None and len(train) >= 20 and len(valid) >= 5
    assert set(np.asarray(valid.document_index).tolist()) == set(range(10))


# --------------------------------------------------------------------------- sampler


def test_sampler_global_batches_do_not_depend_on_data_parallel_size():
    total, mbs, gbs = 100, 2, 8

    def global_batches(dp, consumed=0):
        per_rank = [list(MegatronPretrainingSampler(total, consumed, mbs, r, dp)) for r in range(dp)]
        steps = gbs // (mbs * dp)
        batches = []
        for b in range(len(per_rank[0]) // steps):
            batches.append(sorted(i for r in range(dp) for m in per_rank[r][b * steps:(b + 1) * steps] for i in m))
        return batches

    one = global_batches(1)
    assert one == global_batches(2) == global_batches(4)
    assert one[0] == list(range(8)) and one[1] == list(range(8, 16))
    # Resuming at consumed_samples continues with the next global batch.
    assert global_batches(2, consumed=16)[0] == one[2]
    # Megatron's layout: rank r takes the r-th micro-batch slice of each group.
    assert list(MegatronPretrainingSampler(total, 0, mbs, 1, 2))[:2] == [[2, 3], [6, 7]]


def test_cyclic_sampler_resumes_and_covers_each_epoch():
    from itertools import islice

    from paratron.data.sampler import MegatronPretrainingRandomSampler

    for sharding in (True, False):
        ranks = [MegatronPretrainingRandomSampler(50, 0, 2, r, 2, data_sharding=sharding) for r in range(2)]
        streams = [list(islice(iter(s), 36)) for s in ranks]  # three epochs of 12 micro-batches per rank
        for epoch in range(3):
            seen = sorted(i for st in streams for b in st[12 * epoch : 12 * (epoch + 1)] for i in b)
            assert seen == sorted(set(seen)) and len(seen) == 48  # no repeats within an epoch
        # Resuming from consumed_samples gives the same continuation.
        resumed = list(islice(iter(MegatronPretrainingRandomSampler(50, 20, 2, 1, 2, data_sharding=sharding)), 10))
        assert resumed == streams[1][5:15]
