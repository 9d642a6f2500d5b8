"""Reading raw text corpora: JSONL (optionally gzipped), JSON lists, plain text.

Preprocessing and the SFT dataset share it, so both accept the same inputs and report bad
input the same way (`file:line: what is wrong`). Per file: `*.jsonl(.gz)` is one object
per line (Megatron's input); `*.json` a list of objects when it starts with `[`, else
JSON lines; anything else not starting with `{` or `[` plain text, one document per
non-blank line. A line longer than `max_line_length` (32 Mi by default,
`--max-line-length`) is read in pieces and dropped, so one runaway line costs seconds and
megabytes, not minutes and gigabytes.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

from paratron.data.errors import DataError

JSONL, JSON_LIST, TEXT = "jsonl", "json", "text"

#: The longest line read, in characters (32 Mi: a document of about 8 million tokens).
MAX_LINE_LENGTH = 1 << 25
#: Characters read at a time while skipping the rest of an overlong line.
_SKIP_CHUNK = 1 << 20


@dataclass(frozen=True)
class BadLine:
    """Stands in for a line that could not be read (too long), with the message saying why.

    It travels to whoever parses the line (a preprocessing worker, the SFT
    reader), which stops on it or, with `--skip-bad-lines`, counts it as
    skipped, exactly as for malformed JSON.
    """

    message: str


def expand_inputs(pattern: str) -> list[str]:
    """Files named by `--input`: a path, a glob, or a comma-separated list of either;
    sorted per glob."""
    files: list[str] = []
    for part in [p for p in pattern.split(",") if p]:
        if os.path.isfile(part):
            files.append(part)
            continue
        matches = sorted(p for p in glob.glob(part) if os.path.isfile(p))
        if not matches:
            raise DataError(f"{part}: no such file (and no file matches it as a glob)")
        files.extend(matches)
    if not files:
        raise DataError(f"--input '{pattern}' names no file")
    return files


def open_text(path: str):
    """Open a text file for reading as UTF-8, transparently un-gzipping `*.gz`."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def detect_format(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(".txt"):
        return TEXT
    if name.endswith(".jsonl"):
        return JSONL
    try:
        with open_text(path) as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    first = head.lstrip()[:1]
    if first == "[":
        return JSON_LIST
    if first == "{" or name.endswith(".json"):
        return JSONL
    return TEXT


def _bounded_lines(f, path: str, max_line_length: int) -> Iterator[tuple[int, str | BadLine]]:
    """Numbered lines of `f`; a line over `max_line_length` characters becomes a `BadLine`.

    `readline(limit)` never returns more than `limit` characters, so an
    overlong line is detected after reading just past the limit, and its
    remainder is consumed in pieces of `_SKIP_CHUNK`.
    """
    number = 0
    while line := f.readline(max_line_length + 1):
        number += 1
        if len(line) <= max_line_length or line.endswith("\n"):
            yield number, line
            continue
        length = len(line)
        while not line.endswith("\n"):
            line = f.readline(_SKIP_CHUNK)
            if not line:
                break
            length += len(line) - line.endswith("\n")
        yield number, BadLine(
            f"{path}:{number}: line of {length} characters is longer than the limit of "
            f"{max_line_length} (raise it with --max-line-length)"
        )


def _is_blank(line: str | BadLine) -> bool:
    return isinstance(line, str) and not line.strip()


def iter_raw(path: str, max_line_length: int = MAX_LINE_LENGTH
             ) -> tuple[str, Iterator[tuple[int, Any]]]:
    """`(format, iterator of (line number, payload))` for one input file.

    The payload is the raw line for JSONL (parsed later, by a worker), the
    object for a JSON list (line = item number, from 1), the line's text for
    plain text (blank lines skipped), or a `BadLine` for a line longer
    than `max_line_length` characters. Raises DataError for an unreadable
    file or a malformed JSON list.
    """
    fmt = detect_format(path)

    def lines() -> Iterator[tuple[int, str | BadLine]]:
        try:
            with open_text(path) as f:
                yield from _bounded_lines(f, path, max_line_length)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: cannot read ({exc})") from None

    if fmt == JSONL:
        return fmt, ((n, line) for n, line in lines() if not _is_blank(line))
    if fmt == TEXT:
        return fmt, ((n, line if isinstance(line, BadLine) else line.rstrip("\r\n"))
                     for n, line in lines() if not _is_blank(line))
    try:
        with open_text(path) as f:
            items = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}, "
                        f"column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of objects at the top level")
    return fmt, ((n, item) for n, item in enumerate(items, start=1))


def parse_json_line(path: str, number: int, line: str | BadLine) -> dict:
    """One JSONL line as a dict; DataError `file:line: malformed JSON` (or why it is a
    BadLine) otherwise."""
    if isinstance(line, BadLine):
        raise DataError(line.message)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{number}: malformed JSON ({exc.msg}, "
                        f"column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
    return obj


def iter_records(
    path: str, skip_bad_lines: bool = False, skipped: list | None = None,
    max_line_length: int = MAX_LINE_LENGTH,
) -> Iterator[tuple[int, dict]]:
    """Parsed objects of a JSONL or JSON-list file, with their line (or item) numbers.

    With `skip_bad_lines` a malformed line is left out and its error appended
    to `skipped`; otherwise it raises DataError.
    """
    fmt, items = iter_raw(path, max_line_length)
    if fmt == TEXT:
        raise DataError(f"{path}: expected JSON or JSONL records")
    for number, payload in items:
        try:
            obj = parse_json_line(path, number, payload) if fmt == JSONL else payload
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, "
                                f"got {type(obj).__name__}")
        except DataError as err:
            if not skip_bad_lines:
                raise
            if skipped is not None:
                skipped.append(str(err))
            continue
        yield number, obj


# --------------------------------------------------------------------------- documents


ALPACA_FIELDS = (("instruction", "query"), ("input",), ("output", "response"))


def document_text(obj: dict, key: str, path: str, number: int):
    """The value of `key` in a record: a string, or a list of strings (pre-split sentences).

    A record in Alpaca form (instruction/input/output, or query/response)
    without a `text` field gives, for `key == "text"`, its non-empty
    fields joined by blank lines, so an SFT file can also be used for
    continued pretraining. A `null` value is bad input (DataError naming
    the line), not an empty document: it usually means a broken export.
    """
    value = obj.get(key)
    if value is None and key == "text" and any(f in obj for f in ("instruction", "query")):
        parts = []
        for names in ALPACA_FIELDS:
            for name in names:
                if obj.get(name):
                    parts.append(str(obj[name]))
                    break
        return "\n\n".join(parts)
    if value is None:
        if key not in obj:
            present = ", ".join(sorted(obj)[:8]) or "none"
            raise DataError(f"{path}:{number}: missing key '{key}' (keys present: {present}); "
                            "see --json-keys")
        raise DataError(f"{path}:{number}: key '{key}' is null (expected a string)")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise DataError(f"{path}:{number}: key '{key}' must hold a string, got {type(value).__name__}")


# --------------------------------------------------------------------------- sentences


# A sentence ends at . ! ? (or a CJK full stop), plus any closing quotes or
# brackets, where whitespace and then more text follow.
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])([\"')\]”’]*)\s+(?=\S)")


def regex_sentence_splitter(text: str, keep_newlines: bool = False) -> list[str]:
    """Split text after `. ! ?` (and CJK full stops) followed by whitespace.

    The fallback when NLTK's punkt model is not installed: it does not know
    abbreviations ("Dr. Smith" is split), which only changes where sentence
    boundaries fall, never which text is kept. With `keep_newlines` the
    whitespace after a sentence stays at its end, so joining the sentences
    gives back the text.
    """
    out: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        out.append(text[start : m.end() if keep_newlines else m.end(1)])
        start = m.end()
    out.append(text[start:])
    return [s for s in out if s.strip()]


def make_sentence_splitter(lang: str = "english", keep_newlines: bool = False):
    """NLTK's punkt splitter when NLTK and its model are installed, else
    `regex_sentence_splitter`."""
    try:
        import nltk  # type: ignore[import-not-found]

        punkt = nltk.data.load(f"tokenizers/punkt/{lang}.pickle")
    except Exception:
        return lambda text: regex_sentence_splitter(text, keep_newlines)
    if keep_newlines:
        return lambda text: [text[a:b] for a, b in _spans_keep_whitespace(punkt, text)]
    return punkt.tokenize


def _spans_keep_whitespace(punkt, text: str):
    spans = list(punkt.span_tokenize(text))
    for i, (a, b) in enumerate(spans):
        yield a, spans[i + 1][0] if i + 1 < len(spans) else len(text)
