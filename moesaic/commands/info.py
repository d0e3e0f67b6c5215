"""`moesaic info CONFIG|RUN_DIR [key=value ...]`: parameters, FLOPs and tokens per step."""

from __future__ import annotations

import argparse
from pathlib import Path

from moesaic.config import load_config
from moesaic.model.sizes import config_sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="preset name, YAML path or run directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.ffn.kind=moe")


def run(args: argparse.Namespace) -> int:
    target = Path(args.target)
    if target.is_dir() and (target / "config.yaml").is_file():
        cfg = load_config(target / "config.yaml", args.overrides)
    else:
        cfg = load_config(args.target, args.overrides)
    info = config_sizes(cfg)
    ffn = cfg.model.ffn
    kind = ffn.kind
    if kind == "moe":
        kind += (
            f" (E={ffn.experts}, G={ffn.granularity}, k={ffn.active_experts}, shared={ffn.shared}"
        )
        kind += f", groups={ffn.groups})"
    print(f"config          {cfg.name}: dim={cfg.model.dim} layers={cfg.model.layers} ffn={kind}")
    print(f"params total    {info['params_total']:,}")
    print(f"params active   {info['params_active']:,}")
    mem = cfg.model.memory
    if mem.layers:
        print(
            f"memory          blocks {mem.layers}, orders {mem.orders}, {mem.heads} heads: "
            f"{info['memory_rows']:,} rows x {mem.dim}; {info['memory_total']:,} params, "
            f"{info['memory_active']:,} active"
        )
    print(f"FLOPs/token     {info['flops_per_token']:,} (training, seq_len={cfg.data.seq_len})")
    print(f"tokens/step     {info['tokens_per_step']:,} per process")
    return 0
