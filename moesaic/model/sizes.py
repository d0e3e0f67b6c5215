"""The sizes of the model a config builds, without building it in memory.

Used by `moesaic info` and by the experiments that plan runs by their parameters or FLOPs. The
model is built on the meta device, so no weights are allocated and no tokenizer is trained.
"""

from __future__ import annotations

import dataclasses

import torch

from moesaic.config import Config
from moesaic.model.params import inactive_params, param_breakdown
from moesaic.model.transformer import Transformer


def config_sizes(cfg: Config, vocab_size: int | None = None) -> dict[str, float]:
    """Parameter counts and FLOPs of `cfg`'s model.

    `vocab_size` is the tokenizer's when known; otherwise `model.vocab_size`, or
    `data.vocab_size` when that is 0 (the size the tokenizer is trained to). Keys:
    `params_total`, `params_active`, `params_n` (active non-embedding: the blocks and the final
    norm), `memory_total`, `memory_active`, `memory_rows` (the n-gram memory's tables),
    `flops_per_token` (training, forward + backward) and `tokens_per_step`.
    """
    model_cfg = cfg.model
    if vocab_size is not None and model_cfg.vocab_size == 0:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size)
    elif model_cfg.vocab_size == 0:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=cfg.data.vocab_size)
    if model_cfg.patch_dim == 0:
        model_cfg = dataclasses.replace(model_cfg, patch_dim=cfg.data.patch_dim)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    parts = param_breakdown(model)
    inner = sum(p.numel() for p in model.blocks.parameters())
    inner += sum(p.numel() for p in model.norm.parameters())
    return {
        "params_total": model.num_params(active=False),
        "params_active": model.num_params(active=True),
        "params_n": inner - inactive_params(model),
        "memory_total": parts["memory_total"],
        "memory_active": parts["memory_active"],
        "memory_rows": sum(b.memory.table.shape[0] for b in model.blocks if b.memory is not None),
        "flops_per_token": model.flops_per_token(cfg.data.seq_len),
        "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum,
    }
