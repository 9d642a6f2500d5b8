"""Supervised fine-tuning data: conversations in, samples with a loss only on the answers out.

Records are Alpaca's `{"instruction", "input", "output"}` (optional `system`; or
`{"query", "response"}`) or chat `{"messages": [{"role", "content"}, ...]}`, rendered with
the tokenizer's chat template when it has one, else in Stanford Alpaca's layout, with a
loss mask on exactly the responses plus one eod after each. A sample holds one
conversation padded with loss 0, or with `sequence_packing` several packed in order
(positions restart; attention stays within each); a longer one is cut at the end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from paratron.data.errors import DataError
from paratron.data.gpt_dataset import packed_attention_mask
from paratron.data.indexed_dataset import (IndexedDataset, IndexedDatasetWriter, bin_path,
                                            dataset_exists, optimal_dtype,
                                            remove_stale_temporaries, temporary_path)
from paratron.data.indices import parse_split, split_matrix, split_range
from paratron.data.readers import expand_inputs, iter_records

DEFAULT_INSTRUCTION = "### Instruction:\n"
DEFAULT_RESPONSE = "\n\n### Response:\n"
ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------- records -> messages


def record_to_messages(record: dict, where: str) -> list[dict]:
    """One input record as a list of `{"role", "content"}` messages."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for m in messages:
            if (not isinstance(m, dict) or m.get("role") not in ROLES
                    or not isinstance(m.get("content"), str)):
                raise DataError(f"{where}: each message needs a role ({'/'.join(ROLES)}) "
                                f"and a string content")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: conversation has no assistant message to learn from")
        return out
    if "instruction" in record or "query" in record:
        prompt = record.get("instruction", record.get("query"))
        answer = record.get("output", record.get("response"))
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise DataError(f"{where}: needs string 'instruction' and 'output' "
                            f"(or 'query' and 'response')")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: 'input' must be a string")
        user = f"{prompt}\n\n{extra}" if extra else prompt
        out = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        return out + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    keys = ", ".join(sorted(record)[:8])
    raise DataError(f"{where}: not an SFT record (needs instruction/output, query/response "
                    f"or messages; has {keys})")


def load_conversations(path: str, skip_bad_lines: bool = False) -> list[list[dict]]:
    """All conversations in a JSON / JSONL file (or glob), in file order."""
    conversations = []
    for file in expand_inputs(path):
        count = 0
        for number, record in iter_records(file, skip_bad_lines=skip_bad_lines, skipped=[]):
            conversations.append(record_to_messages(record, f"{file}:{number}"))
            count += 1
        if count == 0:
            raise DataError(f"{file}: empty input file (no conversations)")
    return conversations


# --------------------------------------------------------------------------- messages -> ids


def tokenize_conversation(messages: list[dict], tokenizer, use_chat_template: bool | None = None):
    """`(ids, mask)` int64 arrays: the rendered conversation and 1 on response tokens (+ eod)."""
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    pieces = (_template_pieces(messages, tokenizer) if use_chat_template
              else _default_pieces(messages))
    eod = int(tokenizer.eod)
    ids: list[int] = []
    mask: list[int] = []
    bos = getattr(tokenizer, "bos", None)
    if not use_chat_template and bos is not None and bos != eod:
        ids.append(int(bos))
        mask.append(0)
    for text, is_response in pieces:
        piece = tokenizer.encode_plain(text) if text else []
        if is_response and (not piece or piece[-1] != eod):
            piece = piece + [eod]
        ids.extend(piece)
        mask.extend([int(is_response)] * len(piece))
    return np.array(ids, dtype=np.int64), np.array(mask, dtype=np.int64)


def _default_pieces(messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, is response) pieces in Stanford Alpaca's layout (`tokenize_conversation`
    puts the tokenizer's BOS in front when it has one distinct from eod):

        {system}\\n\\n                      (only when there is a system message)
        ### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}<eod>
        ### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}<eod>   (further turns)
    """
    pieces: list[tuple[str, bool]] = []
    prompt = ""
    for m in messages:
        if m["role"] == "system":
            prompt += m["content"] + "\n\n"
        elif m["role"] == "user":
            prompt += DEFAULT_INSTRUCTION + m["content"] + DEFAULT_RESPONSE
        else:
            pieces.append((prompt, False))
            pieces.append((m["content"], True))
            prompt = ""
    return pieces


def _template_pieces(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """(text, is response) pieces from the tokenizer's chat template: what the template
    adds for an assistant turn after the prompt it ends with `add_generation_prompt=True`
    is the response (its trailing whitespace counts as prompt)."""
    pieces: list[tuple[str, bool]] = []
    done = ""  # text of the conversation rendered so far
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise DataError("the tokenizer's chat template does not render conversations "
                            "incrementally; SFT cannot tell prompt from response with it")
        response = after[len(before):]
        stripped = response.rstrip()
        pieces.append((before[len(done):], False))
        pieces.append((stripped, True))
        done = before + stripped
    return pieces


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class _Bin:
    """Which conversations make up one packed sample (indices into the conversation list)."""

    members: tuple[int, ...]


class SFTDataset(torch.utils.data.Dataset):
    """SFT samples from tokenized conversations; see the module docstring.

    `conversations` is a list of `(ids, mask)`; `num_samples` is how
    many samples the trainer needs (the conversations, or packed samples,
    are repeated over as many epochs as that takes, each epoch shuffled with
    `numpy.random.RandomState(seed)`); `None` means one epoch.
    """

    def __init__(
        self,
        conversations: Sequence[tuple[np.ndarray, np.ndarray]],
        seq_length: int,
        pad: int,
        num_samples: int | None = None,
        seed: int = 1234,
        max_padding_length: int | None = None,
        sequence_packing: bool = False,
        create_attention_mask: bool = False,
    ) -> None:
        if not conversations:
            raise DataError("no SFT conversations")
        self.conversations = conversations
        self.packing = sequence_packing
        self.length = (seq_length if sequence_packing or not max_padding_length
                       else max_padding_length)
        self.pad = int(pad)
        self.create_attention_mask = create_attention_mask
        self.units = (self._pack() if sequence_packing
                      else [_Bin((i,)) for i in range(len(conversations))])
        epochs = 1 if num_samples is None else max(1, -(-num_samples // len(self.units)))
        rng = np.random.RandomState(seed)
        self.order = np.concatenate([rng.permutation(len(self.units)) for _ in range(epochs)])

    def _pack(self) -> list[_Bin]:
        """Greedy, in order: start a new sample when the next conversation no longer fits."""
        bins, current, used = [], [], 0
        for i, (ids, _) in enumerate(self.conversations):
            n = min(len(ids), self.length + 1) - 1  # positions the conversation fills
            if n <= 0:
                continue
            if current and used + n > self.length:
                bins.append(_Bin(tuple(current)))
                current, used = [], 0
            current.append(i)
            used += n
        if current:
            bins.append(_Bin(tuple(current)))
        return bins

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([int(idx)]).items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A whole micro-batch, what stacking `self[i]` gives, written into one array per
        field (the data loader calls this rather than `__getitem__` sample by sample)."""
        b, s = len(indices), self.length
        tokens = np.full((b, s), self.pad, dtype=np.int64)
        labels = np.full((b, s), self.pad, dtype=np.int64)
        loss_mask = np.zeros((b, s), dtype=np.float32)
        position_ids = np.empty((b, s), dtype=np.int64)
        position_ids[...] = np.arange(s)
        document_ids = np.zeros((b, s), dtype=np.int64)
        for row, idx in enumerate(indices):
            at = 0
            members = self.units[int(self.order[idx])].members
            for d, i in enumerate(members):
                ids, mask = self.conversations[i]
                keep = s + 1 if not self.packing else s - at + 1  # a longer one is cut
                ids = ids[:keep]
                n = len(ids) - 1
                tokens[row, at : at + n] = ids[:-1]
                labels[row, at : at + n] = ids[1:]
                loss_mask[row, at : at + n] = mask[1 : n + 1]  # trained where the label is
                document_ids[row, at : at + n] = d  # a response token
                if self.packing:
                    position_ids[row, at : at + n] -= at
                at += n
            if self.packing and at < s:  # padding: its own document, no loss
                position_ids[row, at:] -= at
                document_ids[row, at:] = len(members)
        sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                  "position_ids": position_ids}
        if self.packing:
            sample["document_ids"] = document_ids
        sample = {k: torch.from_numpy(v) for k, v in sample.items()}
        if self.packing and self.create_attention_mask:
            sample["attention_mask"] = packed_attention_mask(sample["document_ids"]).unsqueeze(-3)
        return sample


# --------------------------------------------------------------------------- indexed form


def write_sft_indexed(conversations: Sequence[tuple[np.ndarray, np.ndarray]], output_prefix: str,
                      vocab_size: int):
    """Write tokenized conversations as `<prefix>_input_ids_document` and
    `<prefix>_loss_mask_document`."""
    ids_prefix = f"{output_prefix}_input_ids_document"
    mask_prefix = f"{output_prefix}_loss_mask_document"
    finals = [prefix + ext for prefix in (ids_prefix, mask_prefix) for ext in (".bin", ".idx")]
    for path in finals:
        remove_stale_temporaries(path)
    temps = [temporary_path(path) for path in finals]
    writers: list[IndexedDatasetWriter] = []
    try:
        writers.append(IndexedDatasetWriter(temps[0], optimal_dtype(vocab_size), exclusive=True))
        writers.append(IndexedDatasetWriter(temps[2], np.uint8, exclusive=True))
        for ids, mask in conversations:
            writers[0].add_document(ids)
            writers[1].add_document(mask)
        writers[0].finalize(temps[1])
        writers[1].finalize(temps[3])
        for temp, final in zip(temps, finals):
            os.replace(temp, final)
    except BaseException:
        for w in writers:
            w.close()
        for temp in temps:
            if os.path.exists(temp):
                os.unlink(temp)
        raise
    return ids_prefix, mask_prefix


def read_sft_indexed(prefix: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Conversations written by `write_sft_indexed` (`prefix` with or without the suffix)."""
    base = prefix.removesuffix("_input_ids_document")
    ids_ds = IndexedDataset(f"{base}_input_ids_document")
    mask_ds = IndexedDataset(f"{base}_loss_mask_document")
    if ids_ds.num_documents != mask_ds.num_documents:
        raise DataError(f"{base}: {ids_ds.num_documents} conversations but "
                        f"{mask_ds.num_documents} loss masks")
    return [(ids_ds.document(d), mask_ds.document(d)) for d in range(ids_ds.num_documents)]


def _check_vocabulary(conversations: Sequence[tuple[np.ndarray, np.ndarray]], vocab_size: int,
                      where: str) -> None:
    """DataError naming the file and conversation when a token id is outside the vocabulary.

    Indexed SFT data may have been tokenized with another tokenizer; an SFT
    corpus is small enough to check whole at start-up (vectorised, a few
    thousand conversations at a time), before the embedding meets an
    impossible id.
    """
    piece = 4096
    for lo in range(0, len(conversations), piece):
        ids = [c[0] for c in conversations[lo : lo + piece]]
        tokens = np.concatenate(ids)
        outside = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
        if len(outside):
            ends = np.cumsum([len(x) for x in ids])
            d = lo + int(np.searchsorted(ends, outside[0], side="right"))
            raise DataError(f"{where}: conversation {d} holds token id {int(tokens[outside[0]])}, "
                            f"outside the tokenizer's vocabulary of {vocab_size} ids; tokenize the "
                            f"data with the tokenizer given for training")


def _load(path: str, tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    base = path.removesuffix("_input_ids_document")
    if dataset_exists(f"{base}_input_ids_document"):
        conversations = read_sft_indexed(base)
        _check_vocabulary(conversations, int(tokenizer.vocab_size),
                          bin_path(f"{base}_input_ids_document"))
        return conversations
    return [tokenize_conversation(m, tokenizer) for m in load_conversations(path)]


def build_sft_datasets(
    data_path: Sequence[str] | str | None,
    split: str | None,
    seq_length: int,
    seed: int,
    num_samples: Sequence[int | None],
    tokenizer,
    max_padding_length: int | None = None,
    sequence_packing: bool = False,
    create_attention_mask: bool = False,
    train_data_path: Sequence[str] | str | None = None,
    valid_data_path: Sequence[str] | str | None = None,
    test_data_path: Sequence[str] | str | None = None,
):
    """Train/valid/test SFT datasets from JSON/JSONL files or their indexed form.

    One `data_path` is divided into splits by `split` (conversation
    counts rounded as for pretraining); per-split paths are used whole.
    A split with no conversations is None.
    """
    pad = getattr(tokenizer, "pad", None)
    pad = int(pad) if pad is not None and pad >= 0 else int(tokenizer.eod)

    def first(p):
        if p is None:
            return None
        if isinstance(p, str):
            return p
        words = [w for entry in p for w in str(entry).split()]
        if len(words) != 1:
            raise DataError(f"SFT data takes one file (or glob) per split, got: {' '.join(words)}")
        return words[0]

    def make(convs, i):
        if not convs:
            return None
        return SFTDataset(convs, seq_length, pad, num_samples[i], seed, max_padding_length,
                          sequence_packing, create_attention_mask)

    per_split = [first(train_data_path), first(valid_data_path), first(test_data_path)]
    if any(p is not None for p in per_split):
        return tuple(make(_load(p, tokenizer), i) if p else None for i, p in enumerate(per_split))
    path = first(data_path)
    if path is None:
        raise DataError("SFT needs --data-path (or --train-data-path) with a JSON/JSONL file")
    conversations = _load(path, tokenizer)
    ranges = [None if bounds is None else split_range(bounds, len(conversations))
              for bounds in split_matrix(parse_split(split or "969,30,1"))]
    return tuple(None if r is None else make(conversations[r[0]:r[1]], i)
                 for i, r in enumerate(ranges))
