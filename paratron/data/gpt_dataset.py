"""GPT pretraining samples with Megatron-LM's semantics, and the builder the trainer calls.

`build_train_valid_test_datasets` turns the data flags into train, valid and test
datasets mapping a sample index to `tokens` and `labels` int64 [S] (shifted by one),
`loss_mask` float32 [S], `position_ids` int64 [S] and, with `--reset-attention-mask`,
the attention mask that keeps documents apart. Samples are a pure function of (files,
split, seed, seq_length, samples requested, index), never of the layout; their index
arrays are cached (`index_cache`), and every sample's ids are checked against the
vocabulary as it is read, so a corpus tokenized with another tokenizer stops with the
file and document named.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from paratron.data.blended import BlendedDataset, normalize
from paratron.data.data_paths import SPLIT_NAMES, load_data_path_config, parse_blend
from paratron.data.errors import DataError
from paratron.data.index_cache import description_hash, load_cached_arrays, save_cached_arrays
from paratron.data.indexed_dataset import IndexedDataset, bin_path, dataset_exists, idx_path
from paratron.data.indices import (blend_sizes, build_gpt_indices, parse_split, split_matrix,
                                   split_range)
from paratron.data.mock import MockCorpus
from paratron.data.tokenizer import NullTokenizer

#: Megatron's --split when none is given.
DEFAULT_SPLIT = "969,30,1"
#: Megatron's "pad" id when the tokenizer has no distinct pad token.
NO_PAD = -1


@dataclass(frozen=True)
class GPTDatasetConfig:
    """What a GPTDataset needs besides its files: plain numbers and switches."""

    seq_length: int
    seed: int = 1234
    eod: int = 0
    pad: int = NO_PAD
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    create_attention_mask: bool = False
    cache_path: str | None = None
    split: str = DEFAULT_SPLIT
    vocab_size: int | None = None  # token ids must lie in [0, vocab_size); None: unchecked


def pad_id_for(tokenizer) -> int:
    """The pad id Megatron masks out: the tokenizer's pad, unless missing or equal to
    eod/eos/bos (then -1)."""
    pad = getattr(tokenizer, "pad", None)
    if pad is None or pad < 0:
        return NO_PAD
    special = {getattr(tokenizer, name, None) for name in ("eod", "eos", "bos")}
    return NO_PAD if pad in special else int(pad)


# --------------------------------------------------------------------------- samples


def masks_and_position_ids(
    tokens: torch.Tensor,
    eod: int,
    eod_mask_loss: bool,
    reset_position_ids: bool,
    reset_attention_mask: bool,
    create_attention_mask: bool,
) -> dict[str, torch.Tensor]:
    """Megatron's loss mask, position ids and attention mask for left-to-right samples:
    `tokens` is one sample [S] or a batch [B, S] (CPU).

    Only what a flag asks for is computed: without one the loss mask is all ones and the
    positions count up. `document_ids[i]` counts the eod tokens strictly before i, so a
    new document starts right after each eod (the eod itself belongs to the document it
    ends), as in Megatron's loop.
    """
    ids = tokens.numpy()
    shape, s = ids.shape, ids.shape[-1]
    loss_mask = np.ones(shape, dtype=np.float32)
    positions = np.empty(shape, dtype=np.int64)
    positions[...] = np.arange(s, dtype=np.int64)
    is_eod = ids == eod if eod_mask_loss or reset_position_ids or reset_attention_mask else None
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    if reset_position_ids:
        # Each position minus its document's first position: one past the last eod before it.
        after_eod = np.zeros(shape, dtype=np.int64)
        after_eod[..., 1:] = np.where(is_eod[..., :-1], positions[..., 1:], 0)
        positions -= np.maximum.accumulate(after_eod, axis=-1)
    out = {"loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(positions)}
    if reset_attention_mask:
        out["document_ids"] = torch.from_numpy(np.cumsum(is_eod, axis=-1, dtype=np.int64) - is_eod)
    if create_attention_mask:  # one document unless they are kept apart
        documents = (out["document_ids"] if reset_attention_mask
                     else torch.zeros(shape, dtype=torch.int64))
        out["attention_mask"] = packed_attention_mask(documents).unsqueeze(-3)
    return out


def packed_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Causal attention within each document of a sample: [S, S], True where attention
    is *not* allowed (Megatron's convention, which the model takes)."""
    s = document_ids.shape[-1]
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool, device=document_ids.device))
    return ~(causal & (document_ids[..., :, None] == document_ids[..., None, :]))


class GPTDataset(torch.utils.data.Dataset):
    """One split of one corpus, sampled as Megatron-LM's GPTDataset samples it.

    `low_level` is an `IndexedDataset` (or the mock corpus);
    `sequence_ids` are the corpus sequences in this split; `num_samples`
    is how many samples are needed (None: one epoch).
    """

    def __init__(
        self,
        low_level,
        path_prefix: str | None,
        sequence_ids: np.ndarray,
        num_samples: int | None,
        split_name: str,
        config: GPTDatasetConfig,
    ) -> None:
        self.low_level = low_level
        self.path_prefix = path_prefix
        self.sequence_ids = sequence_ids
        self.num_samples = num_samples
        self.split_name = split_name
        self.config = config
        self.description = {
            "class": "GPTDataset",
            "dataset": low_level.describe(),
            "split_name": split_name,
            "split": config.split,
            "split_range": ([int(sequence_ids[0]), int(sequence_ids[-1]) + 1]
                            if len(sequence_ids) else [0, 0]),
            "num_samples": num_samples,
            "seed": config.seed,
            "seq_length": config.seq_length,
            "add_extra_token_to_sequence": True,
        }
        self.description_hash = description_hash(self.description)
        self.document_index, self.sample_index, self.shuffle_index = self._indices()

    # -- indices -------------------------------------------------------------------

    def _cache_dir(self) -> str | None:
        if self.config.cache_path:
            return self.config.cache_path
        if self.path_prefix is None:  # mock data without --data-cache-path: not cached
            return None
        # Megatron's default: a folder next to the data, named after the prefix.
        return os.path.join(self.path_prefix, "cache", "GPTDataset_indices")

    def _indices(self):
        cache = self._cache_dir()
        names = ("document_index", "sample_index", "shuffle_index")
        if cache:
            base = os.path.join(cache, f"{self.description_hash}-GPTDataset-{self.split_name}")
            paths = [f"{base}-{n}.npy" for n in names]
            cached = load_cached_arrays(paths)
            if cached is not None and self._indices_fit(*cached):
                return cached
        arrays = build_gpt_indices(self.low_level.sequence_lengths, self.sequence_ids,
                                   self.config.seq_length, self.num_samples, self.config.seed)
        if cache:
            try:
                save_cached_arrays(base, self.description, paths, arrays)
            except OSError as exc:
                raise DataError(f"cannot write dataset index cache in {cache} ({exc.strerror}); "
                                "pass --data-cache-path <writable folder>") from None
            cached = load_cached_arrays(paths)
            if cached is None:
                raise DataError(f"cannot read back the dataset index cache just written in "
                                f"{cache}; pass --data-cache-path <another folder>")
            return cached
        return arrays

    def _indices_fit(self, document_index, sample_index, shuffle_index) -> bool:
        """Shape and range checks on cached indices, so a damaged cache file is rebuilt,
        not used."""
        arrays = (document_index, sample_index, shuffle_index)
        if not all(np.issubdtype(a.dtype, np.integer) and a.size for a in arrays):
            return False
        if document_index.ndim != 1 or sample_index.ndim != 2 or sample_index.shape[1] != 2:
            return False
        if shuffle_index.shape != (sample_index.shape[0] - 1,):
            return False
        bounds = ((document_index, len(self.low_level)), (sample_index[:, 0], len(document_index)),
                  (shuffle_index, len(shuffle_index)))
        return all(int(a.min()) >= 0 and int(a.max()) < limit for a, limit in bounds)

    # -- samples -------------------------------------------------------------------

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def _pieces(self, idx: int) -> list[tuple[int, int, int]]:
        """(sequence, offset, length) of each corpus slice sample `idx` spans, in order."""
        i = int(self.shuffle_index[idx])
        (pos_beg, off_beg), (pos_end, off_end) = self.sample_index[i : i + 2].tolist()
        sequences = self.document_index[pos_beg : pos_end + 1].tolist()
        ends = self.low_level.sequence_lengths[sequences].tolist()
        ends[-1] = off_end + 1
        begins = [off_beg] + [0] * (len(sequences) - 1)
        return [(s, b, e - b) for s, b, e in zip(sequences, begins, ends)]

    def _check_indices(self, indices) -> None:
        if len(indices) and (min(indices) < 0 or max(indices) >= len(self)):
            bad = next(i for i in indices if not 0 <= i < len(self))
            raise IndexError(f"sample {bad} out of range ({len(self)} samples in the "
                             f"{self.split_name} split)")

    def _outside_vocabulary(self, tokens: np.ndarray) -> bool:
        vocab = self.config.vocab_size
        if vocab is None or tokens.size == 0:
            return False
        signed = np.issubdtype(tokens.dtype, np.signedinteger)
        return int(tokens.max()) >= vocab or (signed and int(tokens.min()) < 0)

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The `seq_length + 1` token ids of sample `idx` (after the shuffle), int64."""
        return self._text([int(idx)])[0].astype(np.int64)

    def _text(self, indices: list[int]) -> np.ndarray:
        """[len(indices), seq_length + 1] token ids in the corpus's dtype: every slice the
        samples span, joined in one copy."""
        self._check_indices(indices)
        get, documents, parts = self.low_level.get, self.document_index, []
        for idx in indices:  # _pieces, inlined: this loop is the data path's hot spot
            i = int(self.shuffle_index[idx])
            (pos_beg, off_beg), (pos_end, off_end) = self.sample_index[i : i + 2].tolist()
            if pos_beg == pos_end:
                parts.append(get(documents[pos_beg], off_beg, off_end + 1 - off_beg))
                continue
            parts.append(get(documents[pos_beg], off_beg))
            parts += [get(documents[pos]) for pos in range(pos_beg + 1, pos_end)]
            parts.append(get(documents[pos_end], 0, off_end + 1))
        text = np.concatenate(parts)
        text = text.reshape(len(indices), self.config.seq_length + 1)
        if self._outside_vocabulary(text):
            row = next(r for r in range(len(indices)) if self._outside_vocabulary(text[r]))
            self._refuse_token(indices[row])
        return text

    def _refuse_token(self, idx: int) -> None:
        """Raise a DataError naming the file, document and id of sample `idx`'s first token
        outside the vocabulary."""
        vocab = self.config.vocab_size
        for sequence, offset, length in self._pieces(idx):
            part = self.low_level.get(sequence, offset, length)
            outside = np.flatnonzero((part < 0) | (part >= vocab))
            if len(outside):
                break
        token = int(part[outside[0]])
        locate = getattr(self.low_level, "locate", None)
        where = locate(sequence) if locate else f"the {self.split_name} data, sequence {sequence}"
        raise DataError(f"{where} holds token id {token}, outside the tokenizer's vocabulary of "
                        f"{vocab} ids; tokenize the data with the tokenizer given for training")

    def _samples(self, text: np.ndarray) -> dict[str, torch.Tensor]:
        """Inputs, labels and masks from `seq_length + 1` ids per sample ([S+1] or [B, S+1])."""
        cfg = self.config
        tokens = torch.from_numpy(text[..., :-1].astype(np.int64, order="C"))
        labels = torch.from_numpy(text[..., 1:].astype(np.int64, order="C"))
        sample = {"tokens": tokens, "labels": labels}
        sample.update(masks_and_position_ids(tokens, cfg.eod, cfg.eod_mask_loss,
                                             cfg.reset_position_ids, cfg.reset_attention_mask,
                                             cfg.create_attention_mask))
        if cfg.pad != NO_PAD:
            # Megatron: a pad label carries no loss, and pad ids are fed as 0.
            sample["loss_mask"][labels == cfg.pad] = 0.0
            tokens[tokens == cfg.pad] = 0
            labels[labels == cfg.pad] = 0
        return {k: sample[k] for k in _KEY_ORDER if k in sample}

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self._samples(self._text([int(idx)])[0])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A whole micro-batch: what stacking `self[i]` for each index gives, built at once
        (the data loader calls this rather than `__getitem__` sample by sample)."""
        return self._samples(self._text(list(indices)))


_KEY_ORDER = ("tokens", "labels", "loss_mask", "position_ids", "document_ids", "attention_mask")


# --------------------------------------------------------------------------- low-level corpora


class IndexedCorpus(IndexedDataset):
    """An `IndexedDataset` that also describes itself for the index cache.

    The description holds a SHA-256 of the sequence lengths, the only part of
    the corpus the sample indices depend on: preprocessing new text into the
    same prefix changes it (and so the cache key) even when the number of
    documents and the file sizes stay the same, while copies of the same data
    on different machines share one cache. Hashing reads 4 bytes per
    sequence (about 0.2 s for 10^8 sequences), once per opened corpus.
    """

    _lengths_sha256: str | None = None

    def describe(self) -> dict:
        if self._lengths_sha256 is None:
            lengths = np.ascontiguousarray(self.sequence_lengths)
            self._lengths_sha256 = hashlib.sha256(memoryview(lengths).cast("B")).hexdigest()
        return {"path_prefix": os.path.abspath(self.prefix),
                "sequences": int(self.sequence_count), "documents": int(self.num_documents),
                "idx_bytes": os.path.getsize(idx_path(self.prefix)),
                "sequence_lengths_sha256": self._lengths_sha256}

    def locate(self, sequence: int) -> str:
        """`<prefix>.bin: document D` (and the sequence, when documents hold several), for
        messages."""
        document = int(np.searchsorted(self.document_indices, sequence, side="right")) - 1
        split = self.document_indices[document + 1] - self.document_indices[document] > 1
        return (f"{bin_path(self.prefix)}: document {document}"
                + (f" (sequence {sequence})" if split else ""))


def _existing_prefix_hint(prefix: str) -> str | None:
    """'did you mean ...' naming a dataset that exists where `prefix` points: the name
    with .bin/.idx dropped, `paratron preprocess`'s `_text_document` (or another key)
    added, or the closest prefix in the folder."""
    folder, name = os.path.split(prefix)
    try:
        names = [f.removesuffix(".idx") for f in os.listdir(folder or ".") if f.endswith(".idx")]
    except OSError:
        return None
    found = sorted(n for n in names if dataset_exists(os.path.join(folder, n)))
    stem = name[:-4] if name.endswith((".bin", ".idx")) else name
    close = ([stem] if stem in found else [f for f in found if f.startswith(stem + "_")][:1]
             or difflib.get_close_matches(name, found, n=1))
    return f"did you mean --data-path {os.path.join(folder, close[0])}?" if close else None


def open_corpus(prefix: str) -> IndexedCorpus:
    """Open `<prefix>.bin/.idx` for sampling, with a clear error when it does not exist."""
    if not dataset_exists(prefix):
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
        raise DataError(f"data prefix '{prefix}' does not exist (missing {', '.join(missing)}); "
                        + (_existing_prefix_hint(prefix) or "--data-path takes the path without "
                           ".bin/.idx, e.g. my_corpus_text_document"))
    corpus = IndexedCorpus(prefix)
    if not np.issubdtype(corpus.dtype, np.integer):
        raise DataError(f"{idx_path(prefix)}: tokens are {corpus.dtype}; a GPT corpus holds "
                        f"integer token ids")
    return corpus


# --------------------------------------------------------------------------- sample counts


def get_train_valid_test_num_samples(
    global_batch_size: int,
    train_iters: int | None = None,
    train_samples: int | None = None,
    eval_interval: int = 1000,
    eval_iters: int = 100,
) -> tuple[int, int, int]:
    """Samples each split must provide, as Megatron computes them.

    train = `train_samples` or `train_iters * global_batch_size`;
    valid = `(train_iters // eval_interval + 1) * eval_iters * global_batch_size`
    (with `--train-samples`, `train_iters = train_samples // global_batch_size`);
    test = `eval_iters * global_batch_size`.
    """
    if train_samples:
        train = int(train_samples)
        if not train_iters:
            train_iters = train // global_batch_size
    elif train_iters is not None:
        train = int(train_iters) * global_batch_size
    else:
        raise DataError("give --train-iters or --train-samples")
    if eval_interval <= 0:
        raise DataError(f"--eval-interval must be positive, got {eval_interval}")
    valid = (train_iters // eval_interval + 1) * eval_iters * global_batch_size
    test = eval_iters * global_batch_size
    return train, valid, test


# --------------------------------------------------------------------------- builder


def build_train_valid_test_datasets(
    data_path: Sequence[str] | None,
    split: str | None,
    seq_length: int,
    seed: int,
    num_samples: Sequence[int | None],
    tokenizer=None,
    cache_path: str | None = None,
    mock: bool = False,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    create_attention_mask: bool = False,
    data_path_config: str | None = None,
    train_data_path: Sequence[str] | None = None,
    valid_data_path: Sequence[str] | None = None,
    test_data_path: Sequence[str] | None = None,
    vocab_size: int | None = None,
):
    """The train, valid and test datasets exactly as Megatron-LM's
    BlendedMegatronDatasetBuilder builds them.

    The arguments are the data flags of the same names; `num_samples` comes from
    `get_train_valid_test_num_samples`; `tokenizer` is anything with `.eod`,
    `.vocab_size` and optionally `.pad`/`.bos` (None: mock data read as
    `NullTokenizer(vocab_size - 1)`). A split with zero weight in `--split` (or without
    a per-split path) is None. One prefix without weight gives a `GPTDataset`; weighted
    prefixes give a `BlendedDataset` of `sum_i ceil(N * w_i)` samples over per-corpus
    datasets of `ceil(ceil(N * w_i) * 1.005)`.
    """
    if tokenizer is None:
        # Mock data without a tokenizer: behave as NullTokenizer(vocab_size - 1),
        # whose vocabulary is vocab_size ids with the last one as eod.
        if vocab_size is None:
            raise DataError("give a tokenizer (--tokenizer-type ...) or --vocab-size")
        tokenizer = NullTokenizer(int(vocab_size) - 1)
    if seq_length is None or seq_length < 1:
        raise DataError(f"--seq-length must be a positive number, got {seq_length}")
    sizes = list(num_samples) + [None] * (3 - len(num_samples))

    per_split: list[Sequence[str] | None] = [train_data_path, valid_data_path, test_data_path]
    if data_path_config:
        conf = load_data_path_config(data_path_config)
        if conf["data_path"] is not None:
            data_path = conf["data_path"]
        if conf["split"] is not None:
            split = conf["split"]
        for i, name in enumerate(SPLIT_NAMES):
            if conf[name] is not None:
                per_split[i] = conf[name]

    if mock:  # --mock-data wins over any data path: Megatron's synthetic corpus, its 1,1,1 split
        data_path, per_split = None, [None, None, None]
    blend = parse_blend(data_path)
    blend_per_split = [parse_blend(p) for p in per_split]
    if blend is not None and any(b is not None for b in blend_per_split):
        raise DataError("give either --data-path or --train/valid/test-data-path, not both")
    if blend is None and all(b is None for b in blend_per_split) and not mock:
        raise DataError("no training data: give --data-path (or --data-path-config, "
                        "--train-data-path) or --mock-data")

    if mock:
        split = "1,1,1"
    elif blend is not None and split is None:
        split = DEFAULT_SPLIT
    config = GPTDatasetConfig(
        seq_length=seq_length, seed=seed, eod=int(tokenizer.eod), pad=pad_id_for(tokenizer),
        eod_mask_loss=eod_mask_loss, reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask, create_attention_mask=create_attention_mask,
        cache_path=cache_path, split=split or "", vocab_size=int(tokenizer.vocab_size))

    def splits_of(prefix: str | None, matrix, split_sizes) -> list[GPTDataset | None]:
        corpus = (MockCorpus(tokenizer.vocab_size, tokenizer.eod) if prefix is None
                  else open_corpus(prefix))
        n = len(corpus)
        out: list[GPTDataset | None] = []
        for i, bounds in enumerate(matrix):
            if bounds is None:
                out.append(None)
                continue
            begin, end = split_range(bounds, n)
            ids = np.arange(begin, end, dtype=np.int32)
            tokens = int(np.sum(corpus.sequence_lengths[ids], dtype=np.int64)) if len(ids) else 0
            if tokens < 2:
                if split_sizes[i] == 0:
                    out.append(None)
                    continue
                where = "mock data" if prefix is None else prefix
                raise DataError(f"the {SPLIT_NAMES[i]} split of {where} holds {end - begin} of "
                                f"{n} sequences ({tokens} tokens) with --split {split}; it needs "
                                f"at least 2 tokens (change --split or add data)")
            out.append(GPTDataset(corpus, prefix, ids, split_sizes[i], SPLIT_NAMES[i], config))
        return out

    def blended(prefixes, weights, matrix, split_sizes) -> list:
        if weights is not None:
            weights = normalize(weights)
        if len(prefixes) == 1 and weights is None:
            return splits_of(prefixes[0], matrix, split_sizes)
        if weights is None:
            per_prefix_sizes = [[None, None, None] for _ in prefixes]
        else:
            targets = [[None if n is None else blend_sizes([w], n, 0.0)[0] for n in split_sizes]
                       for w in weights]
            per_prefix_sizes = [[None if n is None else blend_sizes([w], n)[0]
                                 for n in split_sizes] for w in weights]
        mids = [splits_of(p, matrix, s) for p, s in zip(prefixes, per_prefix_sizes)]
        result: list = [None, None, None]
        for i in range(3):
            if matrix[i] is None:
                continue
            datasets = [m[i] for m in mids]
            if any(d is None for d in datasets):
                continue
            if weights is not None:
                if split_sizes[i] is None:
                    raise DataError("weighted --data-path needs a number of samples for every "
                                    "split")
                size = sum(t[i] for t in targets)
                result[i] = BlendedDataset(datasets, weights, size, SPLIT_NAMES[i], cache_path)
            else:
                lengths = [len(d) for d in datasets]
                size = None if split_sizes[i] is None else min(split_sizes[i], sum(lengths))
                result[i] = BlendedDataset(datasets, lengths, size, SPLIT_NAMES[i], cache_path)
        return result

    if blend is not None or mock:
        matrix = split_matrix(parse_split(split))
        if blend is None:
            return tuple(splits_of(None, matrix, sizes))
        return tuple(blended(blend[0], blend[1], matrix, sizes))

    result: list = [None, None, None]
    for i, b in enumerate(blend_per_split):
        if b is None:
            continue
        matrix = [(0.0, 1.0) if j == i else None for j in range(3)]
        split_sizes = [sizes[i] if j == i else 0 for j in range(3)]
        result[i] = blended(b[0], b[1], matrix, split_sizes)[i]
    return tuple(result)
