"""`moesaic compete [STUDY.yaml] [--preset smoke|quick|paper] [--out DIR] [--seeds N]
[--arms a,b] [key=value ...]`: the modality-competition study (moesaic.experiments.compete)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moesaic.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "args",
        nargs="*",
        metavar="[STUDY.yaml] [key=value ...]",
        help="a study YAML file and/or overrides: study.text_steps=200 sets a study field, "
        "anything else (train.lr=1e-3) is applied to every run",
    )
    p.add_argument("--preset", help="study preset: smoke, quick or paper (default: quick)")
    p.add_argument("--out", default="runs", help="parent directory of the study (default runs/)")
    p.add_argument("--seeds", type=int, help="seeds per run (mean ± spread is reported)")
    p.add_argument("--arms", help="comma-separated arms, e.g. dense,modality,moe,moe-groups")
    p.add_argument(
        "--jobs",
        type=int,
        help="runs trained at once in separate processes (default: the preset's)",
    )
    p.add_argument("--name", help="study name (default: the preset's, e.g. compete-quick)")


def run(args: argparse.Namespace) -> int:
    from moesaic.experiments.arms import parse_arms
    from moesaic.experiments.compete import StudyInterrupted, run_study
    from moesaic.experiments.presets import load_study

    files = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if len(files) > 1:
        raise ConfigError(f"give at most one study file, got {', '.join(files)}")
    preset = args.preset or (None if files else "quick")
    if args.seeds is not None:
        overrides.append(f"study.seeds={args.seeds}")
    if args.arms is not None:
        overrides.append(f"study.arms=[{','.join(parse_arms(args.arms))}]")
    if args.jobs is not None:
        overrides.append(f"study.jobs={args.jobs}")
    if args.name is not None:
        overrides.append(f"study.name={args.name}")
    study = load_study(files[0] if files else None, preset, overrides)
    print(f"study {study.name}: arms {', '.join(study.arms)}; {study.seeds} seed(s)", flush=True)
    try:
        summary = run_study(study, args.out, log=lambda m: print(m, flush=True))
    except StudyInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    print()
    print(summary["tax_table"])
    _print_relative(summary)
    shift = summary["data"]["caption_shift"]
    print(
        f"\ncaption shift (JS, bits): unigram {shift['unigram_js']:.4f}, "
        f"bigram {shift['bigram_js']:.4f}"
    )
    study_dir = Path(args.out) / study.name
    print(f"summary: {study_dir / 'summary.json'}")
    print(f"report:  {study_dir / 'report.html'}")
    return 0


def _print_relative(summary: dict) -> None:
    """Each arm's tax minus the first arm's, paired by seed (percentage points)."""
    arms = list(summary["arms"])
    if len(arms) < 2:
        return
    keys = [k for k in ("text/text", "ood_text/text", "image/image") if k in summary["metrics"]]
    print(f"\ntax relative to {arms[0]} (percentage points, mean ± std over seeds):")
    for arm in arms[1:]:
        diffs = summary["arms"][arm].get("tax_minus_baseline", {})
        cells = []
        for k in keys:
            d = diffs.get(k) or {}
            mean, std = d.get("mean"), d.get("std")
            text = (
                "—" if mean is None else f"{mean:+.2f}" + ("" if std is None else f" ± {std:.2f}")
            )
            cells.append(f"{summary['metrics'][k]['label']}: {text}")
        print(f"  {arm:<24} " + "; ".join(cells))
