"""`moesaic train CONFIG [key=value ...]` and `moesaic train --resume RUN_DIR [key=value ...]`.

The same command runs under `torchrun --nproc_per_node N -m moesaic train ...` (one process per
rank, see `train/distributed.py`); only rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moesaic.config import load_config
from moesaic.errors import CheckpointError, ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="preset name (e.g. tiny) or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.ffn.kind=moe")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    p.add_argument("--name", help="run name (default: the config's name)")
    p.add_argument("--out", help="parent directory of runs (default: the config's out, runs/)")


def run(args: argparse.Namespace) -> int:
    from moesaic.cli import interrupt_name
    from moesaic.runconfig import load_run_config, run_dir_for
    from moesaic.train.loop import Trainer

    overrides = list(args.overrides)
    if args.resume:
        if args.config is not None:  # `train --resume DIR k=v`: argparse puts k=v in `config`
            overrides.insert(0, args.config)
        run_dir = Path(args.resume)
        if run_dir.is_dir() and not (run_dir / "config.yaml").is_file():
            raise CheckpointError(
                f"nothing to resume: '{run_dir}' has no config.yaml (it stopped before it "
                f"started, or is not a run); start it with: moesaic train CONFIG "
                f"name={run_dir.name} out={run_dir.parent}"
            )
        cfg = load_run_config(run_dir, overrides)
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():
            done = json.loads(summary_path.read_text())
            if done.get("status") == "finished" and done.get("step") == cfg.train.steps:
                print(f"run '{run_dir}' already finished at step {done['step']}")
                return 0
    else:
        if args.config is None:
            raise ConfigError("give a config (a preset such as tiny, or a YAML path) or --resume")
        if args.name:
            overrides.append(f"name={args.name}")
        if args.out:
            overrides.append(f"out={args.out}")
        cfg = load_config(args.config, overrides)
        run_dir = run_dir_for(cfg)
    try:
        trainer = Trainer(cfg, run_dir, resume=bool(args.resume))
    except KeyboardInterrupt as e:
        started = (run_dir / "config.yaml").is_file()
        then = f"; continue with: moesaic train --resume {run_dir}" if started else ""
        print(
            f"stopped by {interrupt_name(e)} during start-up, before any training; "
            f"nothing to save{then}",
            file=sys.stderr,
        )
        return 130
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    if not trainer.world.is_main:
        return 0 if summary["status"] == "finished" else 130
    if summary["status"] == "finished":
        losses = ", ".join(f"{k}={v:.4f}" for k, v in summary["eval"].items() if "ppl" not in k)
        print(f"finished {summary['step']} steps in {trainer.run_dir}: {losses}")
        return 0
    return 130
