"""`moesaic bench study`: how fast a study's runs train, against what the machine could do.

For each model width (`--widths`, default 32, 64, 128) the quick study's text-only and joint
runs (dense and MoE) train in this process. Per step the time is split into data (drawing and
packing the batch), forward, backward and optimizer (clipping, AdamW, router-bias update); a
held-out evaluation and a checkpoint are timed once each. The FLOP-bound ideal is the matmul
throughput of one large fp32 matmul measured in the same process (`bench train.matmul_peak`),
divided by the step's training FLOPs (`flops_per_token · tokens per step`); `of ideal` is the
measured steps/s over that ideal, i.e. the model FLOP utilisation of the whole step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moesaic.bench import openmp
from moesaic.bench.train import matmul_peak

PHASES = ("data", "forward", "backward", "optimizer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--widths", default="32,64,128", help="model widths to measure")
    parser.add_argument("--preset", default="quick", help="the tax study preset to take runs from")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a study job's)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    openmp.add_argument(parser)


def _trainer(preset: str, variant: str, arm: str, width: int, args, out: str):
    from moesaic.experiments.arms import get_arm
    from moesaic.experiments.compete import EXPERIMENT, variant_overrides
    from moesaic.experiments.engine import base_config
    from moesaic.experiments.study import load_study
    from moesaic.train.loop import Trainer

    study = load_study(EXPERIMENT.config_class, EXPERIMENT.presets, None, preset)
    over = [
        *get_arm(arm).overrides(study.experts, study.granularity),
        *variant_overrides(study, variant, 0),
        f"model.dim={width}",
        f"model.heads={max(1, width // 32)}",
        f"model.ffn.hidden={4 * width}",
        f"train.threads={args.threads}",
        "train.checkpoint_every=0",
        "eval.every=0",
        "logging.progress=none",
        f"out={out}",
        f"name={arm}-{variant}-{width}",
    ]
    return Trainer(base_config(study, over))


def _timed_step(trainer) -> dict[str, float]:
    """One optimizer step of `Trainer.train_step`, with the time of each phase."""
    import math

    from moesaic.model.moe import update_router_biases

    cfg, t = trainer.cfg.train, {p: 0.0 for p in PHASES}
    for _ in range(cfg.grad_accum):
        t0 = time.perf_counter()
        batch = next(trainer.stream)
        t1 = time.perf_counter()
        with trainer.autocast():
            out = trainer.forward(batch)
        t2 = time.perf_counter()
        (out.loss / cfg.grad_accum).backward()
        t3 = time.perf_counter()
        t["data"] += t1 - t0
        t["forward"] += t2 - t1
        t["backward"] += t3 - t2
    t0 = time.perf_counter()
    params = [p for p in trainer.model.parameters() if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    trainer.optimizer.step()
    update_router_biases(trainer.model)
    trainer.optimizer.zero_grad(set_to_none=True)
    t["optimizer"] = time.perf_counter() - t0
    return t


def measure(trainer, steps: int, warmup: int, peak: float) -> dict:
    for _ in range(warmup):
        _timed_step(trainer)
    rows = [_timed_step(trainer) for _ in range(steps)]
    per_step = {p: statistics.median(r[p] for r in rows) for p in PHASES}
    step = sum(per_step.values())
    tokens = trainer.cfg.data.seq_len * trainer.cfg.data.batch_size * trainer.cfg.train.grad_accum
    tokens *= max(1, len(trainer.cfg.data.parts))
    flops = trainer.model.flops_per_token(trainer.cfg.data.seq_len) * tokens
    t0 = time.perf_counter()
    trainer.evaluate()
    evaluation = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.save_checkpoint()
    checkpoint = time.perf_counter() - t0
    return {
        "steps_per_s": 1 / step,
        "ideal_steps_per_s": peak / flops,
        "of_ideal": flops / step / peak,
        "phase_share": {p: per_step[p] / step for p in PHASES},
        "eval_in_steps": evaluation / step,
        "checkpoint_in_steps": checkpoint / step,
        "flops_per_step": flops,
        "params_active": trainer.model.num_params(active=True),
    }


def run(args: argparse.Namespace) -> int:
    code = openmp.rerun_if_needed("study", args.omp_wait_policy)
    if code is not None:
        return code
    torch.set_num_threads(args.threads)
    peak = matmul_peak(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="moesaic-bench-study-") as out:
        for width in (int(w) for w in args.widths.split(",")):
            for arm in ("dense", "moe"):
                for variant in ("text", "joint"):
                    trainer = _trainer(args.preset, variant, arm, width, args, out)
                    row = measure(trainer, args.steps, args.warmup, peak)
                    rows.append({"width": width, "arm": arm, "variant": variant, **row})
                    trainer.metrics.close()
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s ({args.threads} thread(s))")
    print(
        f"{'width':>5} {'arm':<6} {'run':<6} {'steps/s':>8} {'of ideal':>8}  "
        f"{'data':>5} {'fwd':>5} {'bwd':>5} {'opt':>5}  {'eval':>6} {'ckpt':>5} (steps)"
    )
    for r in rows:
        s = r["phase_share"]
        print(
            f"{r['width']:>5} {r['arm']:<6} {r['variant']:<6} {r['steps_per_s']:>8.1f} "
            f"{r['of_ideal']:>8.1%}  "
            + " ".join(f"{s[p]:>5.0%}" for p in PHASES)
            + f"  {r['eval_in_steps']:>6.1f} {r['checkpoint_in_steps']:>5.1f}"
        )
    if args.json:
        report = {
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads": args.threads,
            "omp_wait_policy": openmp.current(),
            "torch": torch.__version__,
            "matmul_peak_gflops": peak / 1e9,
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=1))
    return 0
