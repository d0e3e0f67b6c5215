"""How a run meets signals and failing disks, in one line each.

* SIGTERM / SIGINT: the training loop notes them and stops after the current step, which it
  checkpoints (`Trainer._run`); during the final evaluation, whose checkpoint is already
  written, they raise `Stopped` at once (`raise_stop`), and `--resume` finishes the evaluation.
* An OSError while writing run files (no space, a read-only or unwritable directory) becomes a
  one-line `CheckpointError` naming the file and the fix (`os_errors`).
* A start killed while writing its run files leaves only hidden temporary files
  (`start_up_debris`), which a fresh start of the same run removes.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

from moesaic.errors import CheckpointError
from moesaic.files import os_error_fix


class Stopped(Exception):
    """SIGTERM / SIGINT during the final evaluation."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def raise_stop(signum, frame) -> None:
    """A signal handler: stop now (where there is nothing left to save)."""
    raise Stopped(signum)


def signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def start_up_debris(path: Path) -> bool:
    """A temporary file a start killed while writing its run files leaves behind."""
    return path.is_file() and path.name.startswith((".config.yaml.", ".tokenizer.json."))


@contextlib.contextmanager
def os_errors(what: str) -> Iterator[None]:
    """An OSError writing `what` (no space, read-only, no permission) as a one-line error."""
    try:
        yield
    except OSError as e:
        where = e.filename or what
        raise CheckpointError(
            f"cannot write {what} ({e.strerror or e}: '{where}'); {os_error_fix(e, where)}"
        ) from None
