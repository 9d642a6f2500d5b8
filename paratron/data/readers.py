"""Reading raw text corpora: JSONL (optionally gzipped), JSON lists, plain text.

Used by preprocessing and by the SFT dataset, so both accept the same inputs
and report bad input the same way (``file:line: what is wrong``).

Formats, decided per file from its name and first character:

* ``*.jsonl`` (and ``*.jsonl.gz``): one JSON object per line (Megatron's input);
* ``*.json``: a JSON list of objects (Alpaca style) when it starts with ``[``,
  else JSON lines;
* ``*.txt`` and anything else that does not start with ``{`` or ``[``: plain
  text, one document per non-blank line.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from typing import Any, Iterator

from paratron.data.errors import DataError

JSONL, JSON_LIST, TEXT = "jsonl", "json", "text"


def expand_inputs(pattern: str) -> list[str]:
    """Files named by ``--input``: a path, a glob, or a comma-separated list of either; sorted per glob."""
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
    """Open a text file for reading as UTF-8, transparently un-gzipping ``*.gz``."""
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


def iter_raw(path: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    """``(format, iterator of (line number, payload))`` for one input file.

    The payload is the raw line for JSONL (parsed later, by a worker), the
    object for a JSON list (line = item number, from 1), the line's text for
    plain text (blank lines skipped). Raises DataError for an unreadable
    file or a malformed JSON list.
    """
    fmt = detect_format(path)

    def lines() -> Iterator[tuple[int, str]]:
        try:
            with open_text(path) as f:
                for number, line in enumerate(f, start=1):
                    yield number, line
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: cannot read ({exc})") from None

    if fmt == JSONL:
        return fmt, ((n, line) for n, line in lines() if line.strip())
    if fmt == TEXT:
        return fmt, ((n, line.rstrip("\r\n")) for n, line in lines() if line.strip())
    try:
        with open_text(path) as f:
            items = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of objects at the top level")
    return fmt, ((n, item) for n, item in enumerate(items, start=1))


def parse_json_line(path: str, number: int, line: str) -> dict:
    """One JSONL line as a dict; DataError ``file:line: malformed JSON`` otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{number}: malformed JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
    return obj


def iter_records(path: str, skip_bad_lines: bool = False, skipped: list | None = None) -> Iterator[tuple[int, dict]]:
    """Parsed objects of a JSONL or JSON-list file, with their line (or item) numbers.

    With ``skip_bad_lines`` a malformed line is left out and its error appended
    to ``skipped``; otherwise it raises DataError.
    """
    fmt, items = iter_raw(path)
    if fmt == TEXT:
        raise DataError(f"{path}: expected JSON or JSONL records")
    for number, payload in items:
        try:
            obj = parse_json_line(path, number, payload) if fmt == JSONL else payload
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
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
    """The value of ``key`` in a record: a string, or a list of strings (pre-split sentences).

    A record in Alpaca form (instruction/input/output, or query/response)
    without a ``text`` field gives, for ``key == "text"``, its non-empty
    fields joined by blank lines, so an SFT file can also be used for
    continued pretraining.
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
            raise DataError(f"{path}:{number}: missing key '{key}' (keys present: {present}); see --json-keys")
        return ""
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
    """Split text after ``. ! ?`` (and CJK full stops) followed by whitespace.

    The fallback when NLTK's punkt model is not installed: it does not know
    abbreviations ("Dr. Smith" is split), which only changes where sentence
    boundaries fall, never which text is kept. With ``keep_newlines`` the
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
    """NLTK's punkt splitter when NLTK and its model are installed, else :func:`regex_sentence_splitter`."""
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
