"""Progress display: a tqdm bar on a terminal, plain log lines otherwise (CI, files, pipes)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm


def _fmt(values: dict[str, float]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )


class Progress:
    """`mode`: bar | plain | none | auto (bar when `stream` is a terminal, else plain)."""

    def __init__(
        self,
        total: int,
        initial: int,
        mode: str = "auto",
        desc: str = "",
        stream: TextIO | None = None,
    ):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "plain"
        self.mode = mode
        self.desc = desc
        self.total = total
        self.bar = None
        if mode == "bar":
            self.bar = tqdm(
                total=total, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True
            )
        self._last_plain = time.monotonic()

    def update(self, step: int, values: dict[str, Any], force_line: bool = False) -> None:
        """Advance to `step` (1-based count of finished steps) and show `values`."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(_fmt(values), refresh=True)
        elif self.mode == "plain" and force_line:
            print(
                f"{self.desc} step {step}/{self.total} {_fmt(values)}", file=self.stream, flush=True
            )

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        elif self.mode != "none":
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
