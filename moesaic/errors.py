"""Errors a user can cause (bad config, data, checkpoint or command line).

The CLI prints these as one line without a traceback and exits non-zero. Programming errors
keep raising ordinary Python exceptions.
"""

import difflib
from collections.abc import Iterable


class MoesaicError(Exception):
    """A user-facing error; the message names the bad value and the fix."""


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
