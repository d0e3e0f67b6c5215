"""`moesaic eval RUN_DIR`: held-out per-modality losses of a run's latest checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moesaic.train.checkpoint import atomic_write_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory (runs/NAME)")
    p.add_argument("--batches", type=int, default=None, help="eval batches per set")


def run(args: argparse.Namespace) -> int:
    from moesaic.evaluate.runs import load_run

    run = load_run(Path(args.run_dir))
    result = {"step": run.step, "losses": run.eval_losses(args.batches)}
    out = Path(args.run_dir) / "eval.json"
    atomic_write_text(out, json.dumps(result, indent=1))
    for key, value in result["losses"].items():
        print(f"{key:24s} {value:.4f}")
    print(f"wrote {out}")
    return 0
