"""Errors a user can cause (bad config, data, checkpoint or command line).

The CLI prints these as one line without a traceback and exits non-zero. Programming errors
keep raising ordinary Python exceptions.
"""


class MoesaicError(Exception):
    """A user-facing error; the message names the bad value and the fix."""


class ConfigError(MoesaicError):
    """Invalid configuration value, key or combination."""


class DataError(MoesaicError):
    """Unreadable or invalid data (raised in strict mode, or when nothing usable is left)."""


class CheckpointError(MoesaicError):
    """A checkpoint that is missing, truncated, from another config, or not ours."""
