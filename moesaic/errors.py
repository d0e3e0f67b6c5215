"""Errors a user can cause (bad config, data, checkpoint or command line).

The CLI prints these as one line without a traceback and exits non-zero. Programming errors
keep raising ordinary Python exceptions.
"""

import difflib
from collections.abc import Iterable


class MoesaicError(Exception):
    """A user-facing error; the message names the bad value and the fix.

    Its text is always one printable line: control characters that reach a message from a
    value (a config string, a file name read from data) are shown escaped.
    """

    def __str__(self) -> str:
        text = super().__str__()
        if text.isprintable():
            return text
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ConfigError(MoesaicError):
    """Invalid configuration value, key or combination."""


class DataError(MoesaicError):
    """Unreadable or invalid data (raised in strict mode, or when nothing usable is left)."""


class CheckpointError(MoesaicError):
    """A checkpoint that is missing, truncated, from another config, or not ours."""


def did_you_mean(value: str, choices: Iterable[str], prefix: str = "", listing: bool = True) -> str:
    """The tail of a one-line error about an unknown name: "; did you mean 'X'?" for the
    closest choice (named with `prefix`), else the list of choices in parentheses (or "")."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), choices, n=1)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f" ({', '.join(choices)})" if listing and choices else ""
