"""Errors a user can cause (bad config, data, checkpoint or command line).

The CLI prints these as one line without a traceback and exits non-zero. Programming errors
keep raising ordinary Python exceptions.
"""


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
