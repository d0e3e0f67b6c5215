"""AdamW with decoupled weight decay, warmup + cosine schedule, and pickle-free optimizer state.

Weight decay applies to matrices inside the network; norms, biases and embeddings (token and
patch-position embeddings) are not decayed. The learning rate is a pure function of the step, so
the schedule needs no state of its own to resume.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moesaic.config import TrainConfig
from moesaic.errors import CheckpointError


def _no_decay(name: str, param: nn.Parameter) -> bool:
    lowered = name.lower()
    return param.dim() < 2 or "norm" in lowered or "embed" in lowered


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _fused_supported(model: nn.Module) -> bool:
    """The fused AdamW kernel (several times faster than `foreach` on CPU) takes plain float
    tensors on CPU or CUDA; sharded (DTensor) parameters keep the `foreach` implementation."""
    for p in model.parameters():
        if type(p.data) is not torch.Tensor or p.device.type not in ("cpu", "cuda"):
            return False
        if not p.is_floating_point():
            return False
    return True


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    fused = _fused_supported(model)
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=1e-8,
        fused=fused or None,
        foreach=None if fused else True,
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr to lr·min_lr_ratio at `steps`."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_state_to_tensors(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as named tensors (`<param name>/<key>`) plus JSON-safe group settings."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{names[id(param)]}/{key}"] = value
    groups = [
        {k: v for k, v in g.items() if k != "params"}
        | {"params": [names[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    for g in groups:
        g["betas"] = list(g["betas"])
    return tensors, {"param_groups": groups}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    params = dict(model.named_parameters())
    groups = meta["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError("optimizer state has a different number of parameter groups")
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        if [id(p) for p in group["params"]] != [id(params[n]) for n in saved["params"]]:
            raise CheckpointError("optimizer state does not match the model's parameters")
        for key, value in saved.items():
            if key != "params":
                group[key] = tuple(value) if key == "betas" else value
    optimizer.state.clear()
    for full_name, value in tensors.items():
        name, key = full_name.rsplit("/", 1)
        if name not in params:
            raise CheckpointError(f"optimizer state names unknown parameter '{name}'")
        param = params[name]
        device = param.device if value.dim() else value.device  # scalar `step` stays on CPU
        optimizer.state[param][key] = value.to(device, copy=True)
