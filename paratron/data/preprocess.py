"""Tokenize raw text into Megatron `.bin/.idx` files (the library side of `paratron preprocess`).

Produces the same files as Megatron-LM's `tools/preprocess_data.py` for the same input
and tokenizer: `<prefix>_<key>_document.bin/.idx` per JSON key (`_sentence` with sentence
splitting), documents in input order, `eod` appended to every non-empty document with
`append_eod`, an empty document kept as an empty entry.

Fast: the main process hands batches of a few hundred lines to `workers` processes in
order (`Pool.imap`); each parses and tokenizes its batch in one `encode_batch` call and
returns flat numpy arrays, appended with one write per batch. Safe: a malformed line
raises `DataError` naming `file:line` (or is counted and skipped with `skip_bad_lines`),
an OS error names the file and cause, and outputs are written under exclusive temporary
names renamed only on success, removed on every way out (SIGTERM included) and, when a
killed run left them, by the next run.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, TextIO

import numpy as np

from paratron.data.errors import DataError
from paratron.data.indexed_dataset import (IndexedDatasetWriter, optimal_dtype,
                                            remove_stale_temporaries, temporary_path,
                                            write_error)
from paratron.data.readers import (JSON_LIST, JSONL, MAX_LINE_LENGTH, TEXT, BadLine,
                                   document_text, expand_inputs, iter_raw,
                                   make_sentence_splitter, parse_json_line)
from paratron.data.tokenizer import Tokenizer, build_tokenizer

#: Documents per batch handed to a worker, and the most characters in one batch.
BATCH_DOCUMENTS = 256
BATCH_CHARS = 4 << 20


class Terminated(BaseException):
    """SIGTERM arrived during `preprocess_data`; raised so that its cleanup runs.

    A BaseException, like KeyboardInterrupt: no `except Exception` on the way
    up may swallow a request to stop.
    """


@dataclass
class PreprocessResult:
    """What a preprocessing run wrote and how long it took."""

    output_prefixes: dict[str, str]  # json key -> prefix of its .bin/.idx
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)  # one message per skipped bad line


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs, picklable (the tokenizer is rebuilt in each worker)."""

    tokenizer_args: dict
    json_keys: tuple[str, ...]
    append_eod: bool
    split_sentences: bool
    keep_newlines: bool
    lang: str
    skip_bad_lines: bool


class _Encoder:
    """Turns a batch of raw records into flat token arrays, one set per JSON key."""

    def __init__(self, job: _Job, tokenizer: Tokenizer | None = None) -> None:
        self.job = job
        self.tokenizer = tokenizer or build_tokenizer(**job.tokenizer_args)
        self.splitter: Callable[[str], list[str]] | None = (
            make_sentence_splitter(job.lang, job.keep_newlines) if job.split_sentences else None)
        self.dtype = optimal_dtype(self.tokenizer.vocab_size)

    def __call__(self, batch: tuple[str, str, list[tuple[int, Any]]]):
        fmt, path, items = batch
        job = self.job
        numbers: list[int] = []
        texts: dict[str, list] = {k: [] for k in job.json_keys}
        skipped: list[str] = []
        nbytes = 0
        for number, payload in items:
            try:
                obj = self._record(fmt, path, number, payload)
                values = [document_text(obj, key, path, number) for key in job.json_keys]
            except DataError as err:
                if not job.skip_bad_lines:
                    raise
                skipped.append(str(err))
                continue
            if isinstance(payload, str):  # a JSONL or text line; a JSON list is measured below
                nbytes += len(payload) + (fmt == TEXT)
            numbers.append(number)
            for key, value in zip(job.json_keys, values):
                texts[key].append(value)
        if fmt == JSON_LIST:
            nbytes = sum(len(t) if isinstance(t, str) else sum(map(len, t))
                         for ts in texts.values() for t in ts)
        encoded = {key: self._encode_key(texts[key], path, numbers) for key in job.json_keys}
        return len(numbers), nbytes, encoded, skipped

    def _record(self, fmt: str, path: str, number: int, payload) -> dict:
        """One input record as a dict; DataError (naming `path:number`) for a bad one."""
        if isinstance(payload, BadLine):
            raise DataError(payload.message)
        if fmt == TEXT:
            return {self.job.json_keys[0]: payload}
        if fmt == JSONL:
            return parse_json_line(path, number, payload)
        if not isinstance(payload, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, "
                            f"got {type(payload).__name__}")
        return payload

    def _encode_key(self, docs: list, path: str, numbers: list[int]):
        """Flat ids, per-sequence lengths and sequences per document for one key of a batch."""
        # Each document becomes a list of sentences (one "sentence" without splitting).
        sentences_of = []
        for doc in docs:
            if isinstance(doc, list):
                sentences_of.append(doc)
            elif self.splitter is not None:
                sentences_of.append(self.splitter(doc) if doc else [])
            else:
                sentences_of.append([doc])
        flat_sentences = [s for sents in sentences_of for s in sents]
        try:
            ids = self.tokenizer.encode_batch(flat_sentences) if flat_sentences else []
        except DataError as err:
            # Find the document the tokenizer refused, to name its line.
            for number, sents in zip(numbers, sentences_of):
                try:
                    self.tokenizer.encode_batch(sents)
                except DataError:
                    raise DataError(f"{path}:{number}: {err}") from None
            raise
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64,
                           count=int(lengths.sum()))
        if flat.size:
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= self.tokenizer.vocab_size:
                bad = hi if hi >= self.tokenizer.vocab_size else lo
                position = int(np.flatnonzero(flat == bad)[0])
                sentence = int(np.searchsorted(np.cumsum(lengths), position, side="right"))
                doc_ends = np.cumsum([len(s) for s in sentences_of])
                doc = int(np.searchsorted(doc_ends, sentence, side="right"))
                raise DataError(f"{path}:{numbers[doc]}: token id {bad} is outside the vocabulary "
                                f"(size {self.tokenizer.vocab_size} of {self.tokenizer.name})")
        # Which sentence belongs to which document; empty sentences are dropped.
        owner = np.repeat(np.arange(len(sentences_of)), [len(s) for s in sentences_of])
        keep = lengths > 0
        lengths, owner = lengths[keep], owner[keep]
        per_doc = np.bincount(owner, minlength=len(sentences_of)).astype(np.int64)
        if self.job.append_eod and len(lengths):
            # The last sequence of every non-empty document gets the eod token.
            last = np.cumsum(per_doc)[per_doc > 0] - 1
            flat = np.insert(flat, np.cumsum(lengths)[last], self.tokenizer.eod)
            lengths[last] += 1
        return flat.astype(self.dtype), lengths.astype(np.int32), per_doc


# One encoder per worker process, created by the pool's initializer: the state
# of that worker, not of the program.
_worker_encoder: _Encoder | None = None


def _init_worker(job: _Job) -> None:
    global _worker_encoder
    # A worker ends when the pool terminates it; the parent's SIGTERM handler (see
    # _sigterm_raises) is for the parent alone.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # held while forked
    # The processes are the parallelism; keep the Rust tokenizer single-threaded in each.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = _Encoder(job)


def _encode_in_worker(batch):
    assert _worker_encoder is not None
    return _worker_encoder(batch)


def _batches(files: Sequence[str], max_line_length: int) -> Iterator[tuple[str, str, list]]:
    """Batches of raw records, in input order; DataError for a file without any."""
    for path in files:
        fmt, items = iter_raw(path, max_line_length)
        count = 0
        batch: list = []
        chars = 0
        for item in items:
            count += 1
            batch.append(item)
            chars += len(item[1]) if isinstance(item[1], str) else 1000
            if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
                yield fmt, path, batch
                batch, chars = [], 0
        if batch:
            yield fmt, path, batch
        if count == 0:
            raise DataError(f"{path}: empty input file (no documents)")


def _progress_bar(progress: bool | None, file: TextIO):
    """A documents/s bar on `file` when asked (None: when it is a terminal)."""
    if progress is None:
        progress = hasattr(file, "isatty") and file.isatty()
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(file=file, unit=" docs", desc="Tokenizing", dynamic_ncols=True, mininterval=0.5)


@contextlib.contextmanager
def _sigterm_raises():
    """While the block runs, SIGTERM raises `Terminated` in the main thread.

    By default SIGTERM ends the process on the spot, skipping every `except`
    and `finally`: the temporary outputs would stay forever. Python can only
    install handlers from the main thread; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        # Once: a second SIGTERM must not cut the cleanup short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _remove_quietly(paths: Sequence[str]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def output_prefix_for(output_prefix: str, key: str, split_sentences: bool) -> str:
    """Megatron's output naming: `<prefix>_<key>_document` (`_sentence` when split)."""
    return f"{output_prefix}_{key}_{'sentence' if split_sentences else 'document'}"


def preprocess_data(
    input: str,
    output_prefix: str,
    tokenizer_type: str,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    split_sentences: bool = False,
    keep_newlines: bool = False,
    lang: str = "english",
    workers: int = 1,
    log_interval: int = 1000,
    skip_bad_lines: bool = False,
    log: Callable[[str], None] | None = None,
    progress: bool | None = None,
    progress_file: TextIO | None = None,
    max_line_length: int = MAX_LINE_LENGTH,
) -> PreprocessResult:
    """Tokenize `input` (a file, glob or comma-separated list) into indexed datasets.

    Returns a `PreprocessResult`. Raises `DataError` on bad
    input or a failed write, and `Terminated` on SIGTERM, leaving no
    output or temporary files behind. `log` receives progress lines
    (default: stderr). `progress` shows a bar with documents/s on
    `progress_file` (default stderr) in place of the periodic lines: True,
    False, or None for "when that file is a terminal". Lines longer than
    `max_line_length` characters are bad lines.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if max_line_length < 1:
        raise DataError(f"--max-line-length must be at least 1, got {max_line_length}")
    if not json_keys:
        raise DataError("--json-keys needs at least one key")
    files = expand_inputs(input)
    tokenizer_args = dict(tokenizer_type=tokenizer_type, vocab_file=vocab_file,
                          merge_file=merge_file, tokenizer_model=tokenizer_model,
                          vocab_size=vocab_size)
    tokenizer = build_tokenizer(**tokenizer_args)
    job = _Job(tokenizer_args=tokenizer_args, json_keys=tuple(json_keys), append_eod=append_eod,
               split_sentences=split_sentences, keep_newlines=keep_newlines, lang=lang,
               skip_bad_lines=skip_bad_lines)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise DataError(f"{out_dir}: output folder does not exist "
                        f"(from --output-prefix {output_prefix})")

    prefixes = {k: output_prefix_for(output_prefix, k, split_sentences) for k in json_keys}
    for path in (p + ext for p in prefixes.values() for ext in (".bin", ".idx")):
        remove_stale_temporaries(path)
    temp = {k: (temporary_path(p + ".bin"), temporary_path(p + ".idx"))
            for k, p in prefixes.items()}
    dtype = optimal_dtype(tokenizer.vocab_size)
    writers: dict[str, IndexedDatasetWriter] = {}
    result = PreprocessResult(output_prefixes=prefixes)
    start = time.time()
    bar = _progress_bar(progress, progress_file or sys.stderr)
    with _sigterm_raises():
        try:
            for key in json_keys:
                writers[key] = IndexedDatasetWriter(temp[key][0], dtype, exclusive=True)
            batches = _batches(files, max_line_length)
            with _encoding(job, tokenizer, batches, workers) as encoded_batches:
                _write_batches(encoded_batches, writers, result, log, bar, log_interval)
            if result.documents == 0:
                what = f" after skipping {len(result.skipped)} bad lines" if result.skipped else ""
                first = f" (first: {result.skipped[0]})" if result.skipped else ""
                raise DataError(f"{input}: no documents{what}{first}")
            for key in json_keys:
                writers[key].finalize(temp[key][1])
            for key in json_keys:
                _publish(temp[key][0], prefixes[key] + ".bin")
                _publish(temp[key][1], prefixes[key] + ".idx")
        except BaseException:
            for w in writers.values():
                w.close()
            _remove_quietly([p for paths in temp.values() for p in paths])
            raise
        finally:
            if bar is not None:
                bar.close()
    result.seconds = time.time() - start
    elapsed = max(result.seconds, 1e-9)
    log(f"Done: {result.documents} documents, {result.tokens} tokens in {result.seconds:.2f} s "
        f"({result.documents / elapsed:.1f} docs/s, "
        f"{result.input_bytes / elapsed / 1024 / 1024:.2f} MB/s)"
        + "".join(f"; wrote {p}.bin/.idx" for p in prefixes.values()))
    if result.skipped:
        log(f"Skipped {len(result.skipped)} bad lines (first: {result.skipped[0]})")
    return result


@contextlib.contextmanager
def _encoding(job: _Job, tokenizer: Tokenizer, batches: Iterator, workers: int):
    """The encoded batches, in input order: encoded here, or by a pool of workers ended on exit."""
    if workers == 1:
        yield map(_Encoder(job, tokenizer), batches)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # SIGTERM waits until the pool is whole: raised half-way through building it, it would
    # leave workers no one ends, and the exit would wait on them forever.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(job,))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    try:
        yield pool.imap(_encode_in_worker, batches, chunksize=1)
    finally:
        pool.terminate()
        pool.join()


def _write_batches(encoded_batches, writers: dict, result: PreprocessResult, log, bar,
                   log_interval: int) -> None:
    """Append every encoded batch to the writers, counting into `result` and reporting progress."""
    first_key = next(iter(writers))
    start = time.time()
    next_log = log_interval if log_interval > 0 and bar is None else None
    for ndocs, nbytes, encoded, skipped in encoded_batches:
        result.skipped.extend(skipped)
        result.documents += ndocs
        result.input_bytes += nbytes
        if bar is not None:
            bar.update(ndocs)
        for key, (flat, lengths, per_doc) in encoded.items():
            writers[key].add_batch(flat, lengths, per_doc)
            if key == first_key:
                result.sequences += len(lengths)
                result.tokens += int(flat.size)
        if next_log is not None and result.documents >= next_log:
            elapsed = max(time.time() - start, 1e-9)
            log(f"Processed {result.documents} documents ({result.documents / elapsed:.1f} "
                f"docs/s, {result.input_bytes / elapsed / 1024 / 1024:.2f} MB/s).")
            next_log = (result.documents // log_interval + 1) * log_interval


def _publish(temporary: str, final: str) -> None:
    """Rename a complete temporary output to its final name."""
    try:
        os.replace(temporary, final)
    except OSError as exc:
        raise write_error(final, exc) from None
