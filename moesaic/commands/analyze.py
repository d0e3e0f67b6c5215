"""`moesaic analyze RUN_DIR`: expert specialisation and activation sparsity of a run."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory (runs/NAME)")
    p.add_argument("--batches", type=int, default=None, help="eval batches per set")
    p.add_argument(
        "--tokens",
        choices=("last", "all"),
        default="last",
        help="hidden vectors for sparsity: last position of each document (default) or all",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--no-plots", action="store_true", help="write analysis.json only")


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def run(args: argparse.Namespace) -> int:
    from moesaic.analysis.runs import analyze_run
    from moesaic.report.plots import save_analysis_figures

    run_dir = Path(args.run_dir)
    result = analyze_run(run_dir, args.batches, args.tokens, args.device)
    if not args.no_plots:
        save_analysis_figures(result, run_dir / "analysis", title=run_dir.name)
    spec = result.get("specialization")
    if spec:
        print("layer  text  shared  image  entropy/logE  max/mean  r(und,gen)  time-CV")
        for i, v in spec["layers"].items():
            f = v["classes"]["fractions"]
            print(
                f"{i:>5}  {_fmt(f['text']):>4}  {_fmt(f['shared']):>6}  {_fmt(f['image']):>5}"
                f"  {_fmt(v['entropy_norm']):>12}  {_fmt(v['max_mean_load']):>8}"
                f"  {_fmt(v['understanding_generation_r']):>10}  {_fmt(v['time_cv']):>7}"
            )
    else:
        print("no MoE layers: specialisation not applicable")
    sets = result["sparsity"]["sets"]
    if sets:
        print(f"\nsparsity, mean over layers ({result['tokens']} tokens)")
        print(f"  {'set':<9} top1%   gini     L0  eff-rank")
        for name, layers in sets.items():
            means = {
                m: sum(x[m] for x in layers if x[m] is not None) / max(len(layers), 1)
                for m in ("top1_mass", "gini", "l0_fraction", "eff_rank_ratio")
            }
            print(f"  {name:<9} " + "  ".join(f"{_fmt(means[m]):>5}" for m in means))
    print(
        f"wrote {run_dir / 'analysis.json'}"
        + ("" if args.no_plots else f" and {run_dir / 'analysis'}/")
    )
    return 0
