"""`moesaic bench memory`: the n-gram memory's share of a training step.

The real `Trainer.train_step` (data, forward, backward, clipping, optimizer) runs for three
configurations built in this process: the preset without memory (the reference), the same
model with a memory of ≥ 1M table rows trained by the lazy row AdamW (the default), and the
same memory trained by dense AdamW (`memory.lazy_adam=false`: dense gradients, dense clipping
and a dense optimizer step over the whole table). They are measured in interleaved rounds, so
drifts of a shared machine hit all alike; each figure is a median over rounds, as a ratio to
the reference's step time. The memory's share of a step is `1 − t_reference / t_memory`.
Every time is taken twice: wall-clock, and the CPU time of this process (all its threads),
which on a machine shared with other jobs does not count the time the process waited for a
core; on CUDA only wall-clock time is meaningful.

Also measured: one optimizer step over a table of the same shape alone, fused AdamW with a
dense gradient vs the lazy row AdamW with the row-sparse gradient of one step's lookups, as a
share of the reference step.
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
from moesaic.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default="tiny", help="preset name or YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every configuration")
    parser.add_argument("--layers", default="1", help="memory blocks, comma-separated")
    parser.add_argument("--orders", default="2,3", help="n-gram orders, comma-separated")
    parser.add_argument("--heads", type=int, default=4, help="hash heads per order")
    parser.add_argument("--table-rows", type=int, default=131072, help="rows per table")
    parser.add_argument("--dim", type=int, default=32, help="row width")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per config")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per config")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense-AdamW config")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    openmp.add_argument(parser)


def _memory_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model.memory.layers=[{args.layers}]",
        f"model.memory.orders=[{args.orders}]",
        f"model.memory.heads={args.heads}",
        f"model.memory.table_rows={args.table_rows}",
        f"model.memory.dim={args.dim}",
    ]


def _trainer(args: argparse.Namespace, out: str, extra: list[str]):
    from moesaic.train.loop import Trainer

    common = [f"out={out}", f"train.device={args.device}", f"train.threads={args.threads}",
              "train.checkpoint_every=0", "eval.every=0", "logging.progress=none"]  # fmt: skip
    return Trainer(load_config(args.config, [*args.overrides, *common, *extra]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_seconds(trainer, steps: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per training step."""
    _sync(trainer.device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step()
    _sync(trainer.device)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def _median_seconds(fn, reps: int = 7) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds of `fn()`."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def optimizer_step_seconds(rows: int, dim: int, lookups: int, device: torch.device) -> dict:
    """One optimizer step over a [rows, dim] table: fused AdamW with a dense gradient, and the
    lazy row AdamW with a sparse gradient of `lookups` looked-up rows; (wall, CPU) seconds."""
    from moesaic.train.optim import LazyRowAdamW

    g = torch.Generator().manual_seed(0)
    table = torch.nn.Parameter(torch.randn(rows, dim, generator=g).to(device))
    dense = torch.optim.AdamW([table], lr=1e-3, fused=True)
    table.grad = torch.randn(rows, dim, generator=g).to(device)
    dense_s = _median_seconds(lambda: (dense.step(), _sync(device)))
    lazy = LazyRowAdamW([{"params": [table], "lazy_rows": True, "weight_decay": 0.0}], lr=1e-3)
    index = torch.randint(0, rows, (1, lookups), generator=g).to(device)
    values = torch.randn(lookups, dim, generator=g).to(device)

    def lazy_step():
        table.grad = torch.sparse_coo_tensor(index, values, (rows, dim), check_invariants=False)
        lazy.step()
        _sync(device)

    return {"dense_adamw_s": dense_s, "lazy_rows_s": _median_seconds(lazy_step)}


def run(args: argparse.Namespace) -> int:
    code = openmp.rerun_if_needed("memory", args.omp_wait_policy)
    if code is not None:
        return code
    configs = {"reference": [], "memory, lazy Adam": _memory_overrides(args)}
    if not args.no_dense:
        configs["memory, dense AdamW"] = [*_memory_overrides(args), "model.memory.lazy_adam=false"]
    with tempfile.TemporaryDirectory() as out:
        trainers = {name: _trainer(args, f"{out}/{i}", extra)
                    for i, (name, extra) in enumerate(configs.items())}  # fmt: skip
        for trainer in trainers.values():
            for _ in range(args.warmup):
                trainer.train_step()
        seconds: dict[str, list[float]] = {name: [] for name in trainers}
        cpu: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                wall_s, cpu_s = _step_seconds(trainer, args.steps)
                seconds[name].append(wall_s)
                cpu[name].append(cpu_s)
        ref = trainers["reference"]
        device = ref.device
        memory_cfg = trainers["memory, lazy Adam"].cfg
        data = memory_cfg.data
        lookups = data.batch_size * data.seq_len * memory_cfg.model.memory.tables
        table = trainers["memory, lazy Adam"].model.blocks[int(args.layers.split(",")[0])]
        table_rows = table.memory.table.shape[0]
        ref_s = statistics.median(seconds["reference"])
        ref_cpu = statistics.median(cpu["reference"])
        rows = []
        for name, trainer in trainers.items():
            step_s, cpu_s = statistics.median(seconds[name]), statistics.median(cpu[name])
            model = trainer.model
            rows.append({
                "config": name,
                "params_total": model.num_params(active=False),
                "params_active": model.num_params(active=True),
                "step_s": step_s,
                "ratio_to_reference": step_s / ref_s,
                "memory_share": 1.0 - ref_s / step_s,
                "ratio_per_round": [s / r for s, r in zip(seconds[name], seconds["reference"],
                                                          strict=True)],
                "cpu_step_s": cpu_s,
                "cpu_ratio_to_reference": cpu_s / ref_cpu,
                "cpu_memory_share": 1.0 - ref_cpu / cpu_s,
            })  # fmt: skip
        del trainers
    opt = optimizer_step_seconds(table_rows, args.dim, lookups, device)
    optimizer = {
        "table_rows": table_rows,
        "dim": args.dim,
        "lookups": lookups,
        "dense_adamw_share_of_reference_step": opt["dense_adamw_s"][0] / ref_s,
        "lazy_rows_share_of_reference_step": opt["lazy_rows_s"][0] / ref_s,
        "cpu_dense_adamw_share_of_reference_step": opt["dense_adamw_s"][1] / ref_cpu,
        "cpu_lazy_rows_share_of_reference_step": opt["lazy_rows_s"][1] / ref_cpu,
    }
    _print(rows, optimizer)
    if args.json:
        report = {
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "omp_wait_policy": openmp.current(),
            "torch": torch.__version__,
            "memory": memory_cfg.model.memory.__dict__ | {"table_rows_total": table_rows},
            "rows": rows,
            "optimizer_step": optimizer,
        }
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


def _print(rows: list[dict], optimizer: dict) -> None:
    print(f"{'config':<20} {'total':>11} {'active':>10} {'vs ref':>7} {'share':>6}"
          f"  {'rounds vs ref':<13} {'CPU vs ref':>10} {'share':>6}")  # fmt: skip
    for r in rows:
        spread = f"{min(r['ratio_per_round']):.2f}–{max(r['ratio_per_round']):.2f}"
        print(
            f"{r['config']:<20} {r['params_total']:>11,} {r['params_active']:>10,} "
            f"{r['ratio_to_reference']:>7.3f} {r['memory_share']:>6.1%}  {spread:<13} "
            f"{r['cpu_ratio_to_reference']:>10.3f} {r['cpu_memory_share']:>6.1%}"
        )
    o = optimizer
    print(
        f"one optimizer step over the {o['table_rows']:,} x {o['dim']} table, as a share of a "
        f"reference step (wall / CPU): AdamW {o['dense_adamw_share_of_reference_step']:.1%} / "
        f"{o['cpu_dense_adamw_share_of_reference_step']:.1%}, lazy rows "
        f"{o['lazy_rows_share_of_reference_step']:.1%} / "
        f"{o['cpu_lazy_rows_share_of_reference_step']:.1%} ({o['lookups']:,} lookups)"
    )
