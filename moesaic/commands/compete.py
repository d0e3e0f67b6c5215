"""`moesaic compete [STUDY.yaml] [--experiment tax|capacity] [--preset NAME] [--out DIR]
[--seeds N] [--arms a,b] [--jobs N] [key=value ...]`: run a study on the experiment engine
(`moesaic.experiments`) and print its table; the modality-tax study by default."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moesaic.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "args",
        nargs="*",
        metavar="[STUDY.yaml] [key=value ...]",
        help="a study YAML file and/or overrides: study.steps=200 sets a study field, "
        "anything else (train.lr=1e-3) is applied to every run",
    )
    p.add_argument(
        "--experiment",
        help="tax (the modality tax per arm, default) or capacity (tax against model size)",
    )
    p.add_argument("--preset", help="study preset, e.g. smoke, quick or paper (default: quick)")
    p.add_argument("--out", default="runs", help="parent directory of the study (default runs/)")
    p.add_argument("--seeds", type=int, help="seeds per run (intervals need at least 2)")
    p.add_argument("--arms", help="comma-separated arms, e.g. dense,modality,moe,moe-groups")
    p.add_argument(
        "--jobs",
        type=int,
        help="runs trained at once in separate processes (default: the preset's)",
    )
    p.add_argument("--name", help="study name (default: the preset's, e.g. compete-quick)")


def run(args: argparse.Namespace) -> int:
    from moesaic.config_tree import read_yaml
    from moesaic.experiments.arms import parse_arms
    from moesaic.experiments.engine import StudyInterrupted, get_experiment, run_experiment
    from moesaic.experiments.study import load_study

    t0 = time.perf_counter()
    files = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if len(files) > 1:
        raise ConfigError(f"give at most one study file, got {', '.join(files)}")
    name = args.experiment
    if name is None and files and Path(files[0]).is_file():
        name = read_yaml(Path(files[0]), "study file").get("experiment")
    experiment = get_experiment(name or "tax")
    preset = args.preset or (None if files else "quick")
    for flag, value in (("seeds", args.seeds), ("jobs", args.jobs), ("name", args.name)):
        if value is not None:
            overrides.append(f"study.{flag}={value}")
    if args.arms is not None:
        overrides.append(f"study.arms=[{','.join(parse_arms(args.arms))}]")
    study = load_study(
        experiment.config_class, experiment.presets, files[0] if files else None, preset, overrides
    )
    print(f"study {study.name} ({experiment.name}): {study.seeds} seed(s)", flush=True)
    try:
        summary = run_experiment(experiment, study, args.out, log=lambda m: print(m, flush=True))
    except StudyInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    print()
    print(experiment.console(summary))
    study_dir = Path(args.out) / study.name
    print(f"summary: {study_dir / 'summary.json'}")
    print(f"report:  {study_dir / 'report.html'}")
    print(f"elapsed: {(time.perf_counter() - t0) / 60:.1f} min")
    return 0
