"""The one exception type that the data layer raises for bad input.

Bad data must stop a run with one line that says what is wrong and where (the
file, and the line when there is one), never with a traceback from deep inside
numpy or json. Everything in ``paratron.data`` that detects a problem with the
user's files raises :class:`DataError` with such a line; the command-line
entry points turn it into ``SystemExit(message)`` (exit status 1, message on
stderr).
"""

from __future__ import annotations


class DataError(Exception):
    """A problem with the user's data or data arguments, described in one line."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the caller passed in, so that
        # command-line users always see a single line on stderr.
        super().__init__(str(message).replace("\r", " ").replace("\n", " "))
