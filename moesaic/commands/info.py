"""`moesaic info CONFIG|RUN_DIR [key=value ...]`: parameters, FLOPs and tokens per step."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from moesaic.config import Config, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="preset name, YAML path or run directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.ffn.kind=moe")


def describe(cfg: Config) -> dict[str, float]:
    """Sizes of the model a config builds (on the meta device: no memory, no tokenizer run)."""
    from moesaic.model import Transformer
    from moesaic.model.params import param_breakdown

    model_cfg = cfg.model
    if model_cfg.vocab_size == 0:  # the tokenizer is trained to data.vocab_size tokens
        model_cfg = dataclasses.replace(model_cfg, vocab_size=cfg.data.vocab_size)
    if model_cfg.patch_dim == 0:
        model_cfg = dataclasses.replace(model_cfg, patch_dim=cfg.data.patch_dim)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    parts = param_breakdown(model)
    return {
        "params_total": model.num_params(active=False),
        "params_active": model.num_params(active=True),
        "memory_total": parts["memory_total"],
        "memory_active": parts["memory_active"],
        "memory_rows": sum(b.memory.table.shape[0] for b in model.blocks if b.memory is not None),
        "flops_per_token": model.flops_per_token(cfg.data.seq_len),
        "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum,
    }


def run(args: argparse.Namespace) -> int:
    target = Path(args.target)
    if target.is_dir() and (target / "config.yaml").is_file():
        cfg = load_config(target / "config.yaml", args.overrides)
    else:
        cfg = load_config(args.target, args.overrides)
    info = describe(cfg)
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
