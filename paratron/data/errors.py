"""The one exception type that the data layer raises for bad input.

Bad data must stop a run with one line that says what is wrong and where (the
file, and the line when there is one), never with a traceback from deep inside
numpy or json. Everything in `paratron.data` that detects a problem with the
user's files raises `DataError` with such a line; the command-line
entry points turn it into `SystemExit(message)` (exit status 1, message on
stderr).
"""

from __future__ import annotations

# How torch's DataLoader re-raises an error from a worker process: it builds a new
# exception of the same type from "Caught <type> in DataLoader worker process N." and
# the worker's whole formatted traceback, whose last line is "<module>.DataError: <message>".
_WORKER_HEADER = "Caught DataError in "
_WORKER_LAST_LINE = "DataError: "


def _original_message(message: str) -> str:
    """The worker's own message when `message` is a DataLoader's re-raised traceback."""
    if not message.startswith(_WORKER_HEADER) or "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip("\n").rsplit("\n", 1)[-1]
    _, found, original = last.partition(_WORKER_LAST_LINE)
    return original if found else message


class DataError(Exception):
    """A problem with the user's data or data arguments, described in one line."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the caller passed in, so that
        # command-line users always see a single line on stderr. A DataLoader worker's
        # error arrives wrapped in its traceback; only the original line is kept.
        message = _original_message(str(message))
        super().__init__(message.replace("\r", " ").replace("\n", " "))
