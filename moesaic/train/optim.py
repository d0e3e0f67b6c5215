"""AdamW with decoupled weight decay, warmup + cosine schedule, and pickle-free optimizer state.

Weight decay applies to matrices inside the network; norms, biases and embeddings (token and
patch-position embeddings, n-gram memory tables) are not decayed. The learning rate is a pure
function of the step, so the schedule needs no state of its own to resume.

N-gram memory tables (`model/memory.py`, `memory.lazy_adam`) hold millions of rows of which a
step reads a few thousand: a dense AdamW step, dense gradient and dense clipping over them
would cost more than the rest of a small model's step. Their group is marked `lazy_rows` and
`LazyRowAdamW` updates only the rows that have a gradient; on plain tensors the model then
produces row-sparse gradients (`NgramMemory.sparse_grads`) and `clip_grad_norm_` takes them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from moesaic.config import TrainConfig
from moesaic.errors import CheckpointError


def _no_decay(name: str, param: nn.Parameter) -> bool:
    lowered = name.lower()
    return param.dim() < 2 or "norm" in lowered or "embed" in lowered


def _memory_tables(model: nn.Module) -> tuple[set[int], set[int]]:
    """ids of all memory tables, and of those trained lazily (`memory.lazy_adam`)."""
    from moesaic.model.memory import memory_layers

    layers = memory_layers(model)
    return {id(m.table) for m in layers}, {id(m.table) for m in layers if m.lazy_adam}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decayed matrices, undecayed rest, and (when there are any) the lazily updated tables."""
    decay, no_decay, lazy = [], [], []
    tables, lazy_tables = _memory_tables(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in lazy_tables:
            lazy.append(param)
        elif id(param) in tables or _no_decay(name, param):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if lazy:
        groups.append({"params": lazy, "weight_decay": 0.0, "lazy_rows": True})
    return groups


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
    """AdamW over the model's parameters; `LazyRowAdamW` when it has lazily trained memory
    tables, whose gradients it then asks to be row-sparse unless they are sharded (FSDP
    reduces dense gradients)."""
    from moesaic.model.memory import memory_layers

    fused = _fused_supported(model)
    groups = param_groups(model, cfg.weight_decay)
    lazy = any(g.get("lazy_rows") for g in groups)
    for m in memory_layers(model):
        m.sparse_grads = m.lazy_adam and type(m.table.data) is torch.Tensor
    return (LazyRowAdamW if lazy else torch.optim.AdamW)(
        groups,
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=1e-8,
        fused=fused or None,
        foreach=None if fused else True,
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself, or this rank's shard of a DTensor (FSDP)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _rows_with_gradient(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices [R] whose gradient is not all zero, and those rows' gradients [R, width]."""
    if grad.is_sparse:
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        keep = values.ne(0).any(dim=1)
        return rows[keep], values[keep]
    rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)
    return rows, grad.index_select(0, rows)


class LazyRowAdamW(torch.optim.AdamW):
    """AdamW in which the parameters of groups marked `lazy_rows` are updated row by row.

    In a lazy group, a row whose gradient in a step is not all zero — in the memory tables,
    exactly the rows that were looked up — gets the AdamW update (decoupled weight decay, both
    moments, bias correction); every other row keeps its value and moments (no decay, no
    momentum drift). The bias correction uses the parameter's step count (the optimizer steps
    in which it had a gradient), as torch's SparseAdam does; so when every row has a gradient
    in every step this is AdamW, and a row first used late takes smaller first steps than a
    dense AdamW would. Gradients may be sparse COO tensors (only the looked-up rows: nothing
    scales with the table size), dense tensors, or FSDP shards (each rank updates its rows).
    Other groups are AdamW as configured (fused where possible). The state has AdamW's keys,
    so checkpoints save and load it like any other.
    """

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        held = []
        for group in self.param_groups:
            if group.get("lazy_rows"):
                held += [(group, p, p.grad) for p in group["params"] if p.grad is not None]
        for _, p, _ in held:
            p.grad = None  # AdamW skips parameters without a gradient
        try:
            super().step()
        finally:
            for _, p, grad in held:
                p.grad = grad
        with torch.no_grad():
            for group, p, grad in held:
                self._row_step(group, p, grad)
        return loss

    def _row_step(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor) -> None:
        if group["amsgrad"] or group["maximize"]:
            raise NotImplementedError("lazy rows support plain AdamW only")
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        rows, g = _rows_with_gradient(_local(grad))
        if not rows.numel():
            return
        param, exp_avg, exp_avg_sq = (_local(t) for t in (p, state["exp_avg"], state["exp_avg_sq"]))
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        m_rows, v_rows = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
        m_rows.lerp_(g, 1 - beta1)
        v_rows.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        exp_avg.index_copy_(0, rows, m_rows)
        exp_avg_sq.index_copy_(0, rows, v_rows)
        denom = (v_rows.sqrt_() / math.sqrt(1 - beta2**step)).add_(eps)
        delta = m_rows.div_(denom).mul_(-lr / (1 - beta1**step))
        if wd:  # decoupled decay of the same rows: p ← p − lr·wd·p − lr·m̂ / (√v̂ + eps)
            delta.add_(param.index_select(0, rows), alpha=-lr * wd)
        param.index_add_(0, rows, delta)  # one pass over the rows of the large table


def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` that also takes row-sparse (COO) gradients: they are
    coalesced in place and enter the norm with their stored rows. Returns the pre-clip norm."""
    params = [p for p in params if p.grad is not None]
    sparse = [p for p in params if p.grad.is_sparse]
    if not sparse:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    for p in sparse:
        p.grad = p.grad.coalesce()
    dense = [p for p in params if not p.grad.is_sparse]
    norms = [torch.linalg.vector_norm(p.grad.values()) for p in sparse]
    if dense:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in dense]))
    total = torch.linalg.vector_norm(torch.stack(norms))
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as torch scales the dense ones
        for p in sparse:
            p.grad.values().mul_(scale)
    return total


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
