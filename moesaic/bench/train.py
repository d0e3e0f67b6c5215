"""`moesaic bench train`: end-to-end training throughput, dense vs MoE at matched active compute.

For each preset pair (`tiny` → `tiny-dense` and `tiny-moe`, …) the real `Trainer.train_step` runs
(data, forward, backward, clipping, AdamW, bias update) in this process. Configurations are
measured in interleaved rounds so that drifts of the machine hit all of them alike; each figure
is the median over rounds. Model FLOP utilisation is the model's FLOPs per second
(`flops_per_token · tokens/s`, 6·N_active + attention) over the measured throughput of a large
fp32 (bf16 on CUDA) matmul in the same process. Peak memory is CUDA's max allocated bytes, or on
CPU the peak resident size of a separate process that builds and trains the same config.
On CPU the timings run with OMP_WAIT_POLICY=passive by default (`openmp.py`: busy-waiting
workers on shared cores make each parallel region cost a time slice).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moesaic.bench import openmp
from moesaic.config import load_config
from moesaic.train import malloc

VARIANTS = ("dense", "moe")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="tiny", help="comma-separated sizes (tiny,small)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per config")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per config")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    openmp.add_argument(parser)
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)


def _overrides(args: argparse.Namespace, out: str) -> list[str]:
    return [
        f"out={out}",
        f"train.device={args.device}",
        f"train.threads={args.threads}",
        "train.checkpoint_every=0",
        "eval.every=0",
        "logging.progress=none",
    ]


def _trainer(preset: str, args: argparse.Namespace, out: str):
    from moesaic.train.loop import Trainer

    return Trainer(load_config(preset, _overrides(args, out)))


def matmul_peak(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of an n×n×n matmul (median of `reps`), the denominator of MFU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(trainer, steps: int) -> float:
    _sync(trainer.device)
    t0 = time.perf_counter()
    tokens0 = trainer.tokens_seen
    for _ in range(steps):
        trainer.train_step()
    _sync(trainer.device)
    return (trainer.tokens_seen - tokens0) / (time.perf_counter() - t0)


def _peak_memory_mb(preset: str, args: argparse.Namespace) -> float:
    """Peak memory of training `preset` for warmup + steps steps."""
    cmd = [sys.executable, "-m", "moesaic", "bench", "train", "--_memory-child", preset,
           "--device", args.device, "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory run of {preset} failed: {res.stderr.strip()[-500:]}")
    return float(res.stdout.strip().splitlines()[-1])


def _memory_child(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer(args.memory_child, args, out)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        for _ in range(args.warmup + args.steps):
            trainer.train_step()
        if trainer.device.type == "cuda":
            print(torch.cuda.max_memory_allocated(trainer.device) / 2**20)
        else:  # ru_maxrss is in KiB on Linux, bytes on macOS
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(rss / (2**20 if sys.platform == "darwin" else 2**10))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.memory_child:
        return _memory_child(args)
    code = openmp.rerun_if_needed("train", args.omp_wait_policy)
    if code is not None:
        return code
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for size in [s.strip() for s in args.presets.split(",") if s.strip()]:
            trainers = {v: _trainer(f"{size}-{v}", args, f"{out}/{v}") for v in VARIANTS}
            device = next(iter(trainers.values())).device
            for trainer in trainers.values():
                for _ in range(args.warmup):
                    trainer.train_step()
            rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for v, trainer in trainers.items():
                    rates[v].append(_time_steps(trainer, args.steps))
            peak = matmul_peak(device)
            dense_rate = statistics.median(rates["dense"])
            for v, trainer in trainers.items():
                rate = statistics.median(rates[v])
                model = trainer.model
                flops = model.flops_per_token(trainer.cfg.data.seq_len)
                row = {
                    "preset": f"{size}-{v}",
                    "params_total": model.num_params(active=False),
                    "params_active": model.num_params(active=True),
                    "flops_per_token": flops,
                    "tokens_per_s": rate,
                    "ratio_to_dense": rate / dense_rate,
                    # each round times dense, then this config: ratios of neighbours in time
                    "ratio_per_round": [
                        r / d for r, d in zip(rates[v], rates["dense"], strict=True)
                    ],
                    "mfu": flops * rate / peak,
                    "matmul_peak_gflops": peak / 1e9,
                }
                if not args.no_memory:
                    row["peak_memory_mb"] = _peak_memory_mb(f"{size}-{v}", args)
                rows.append(row)
    _print_table(rows)
    if args.json:
        report = {
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "omp_wait_policy": openmp.current(),
            "malloc_retains_freed": malloc.retain_freed_memory() if device.type == "cpu" else False,
            "torch": torch.__version__,
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


def _print_table(rows: list[dict]) -> None:
    head = f"{'preset':<12} {'active':>10} {'total':>10} {'tok/s':>9} {'vs dense':>8} {'MFU':>6}"
    head += f" {'peak MB':>8}  rounds vs dense"
    print(head)
    for r in rows:
        mem = f"{r['peak_memory_mb']:>8.0f}" if "peak_memory_mb" in r else f"{'-':>8}"
        spread = f"{min(r['ratio_per_round']):.2f}–{max(r['ratio_per_round']):.2f}"
        print(
            f"{r['preset']:<12} {r['params_active']:>10,} {r['params_total']:>10,} "
            f"{r['tokens_per_s']:>9.0f} {r['ratio_to_dense']:>8.2f} {r['mfu']:>6.1%} {mem}"
            f"  {spread}"
        )
