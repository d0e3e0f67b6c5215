"""The run's metrics log: `metrics.jsonl` (one JSON object per line) and optional TensorBoard.

Each line has `kind` ("train" or "eval") and `step`. On resume the log is cut back to the
checkpoint's step, so a resumed run's log equals an uninterrupted run's (timings aside).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moesaic.errors import ConfigError
from moesaic.files import atomic_write_text


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete records; a torn last line (a crash mid-write) is ignored."""
    records = []
    if not Path(path).is_file():
        return records
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = False, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "logging.tensorboard=true needs the tensorboard extra: "
                    "pip install 'moesaic[tensorboard]'"
                ) from None
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(_clean(record)) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
