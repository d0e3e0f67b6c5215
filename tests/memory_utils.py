"""Tiny models with n-gram memory and a way to read a memory layer's output."""

from __future__ import annotations

import dataclasses

import torch

from moesaic.config import MemoryConfig, ModelConfig
from moesaic.model import Transformer
from tests.model_utils import tiny_config

SMALL_MEMORY = {"layers": [1], "heads": 2, "table_rows": 101, "dim": 8}
MICRO_MEMORY = [  # config overrides: memory in the second block of the MICRO model
    "model.memory.layers=[1]",
    "model.memory.heads=2",
    "model.memory.table_rows=499",
    "model.memory.dim=8",
]


def memory_config(base: ModelConfig | None = None, **memory: object) -> ModelConfig:
    """`base` (the tiny test model by default) with a small memory; `memory` overrides fields."""
    base = base or tiny_config()
    return dataclasses.replace(base, memory=MemoryConfig(**{**SMALL_MEMORY, **memory}))


def loud(model: Transformer) -> Transformer:
    """Scale the memory's weights up so its effect on outputs is far above float noise."""
    with torch.no_grad():
        for block in model.blocks:
            if block.memory is not None:
                block.memory.table[1:].normal_(0, 1.0)
                block.memory.w_kv.weight.normal_(0, 0.5)
                if block.memory.conv_DK is not None:
                    block.memory.conv_DK.normal_(0, 0.5)
    return model


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return loud(Transformer(cfg))


def memory_outputs(model: Transformer, batch, **kw) -> dict[int, torch.Tensor]:
    """The residual update [B, L, D] of every memory block for one forward pass."""
    got: dict[int, torch.Tensor] = {}
    handles = [
        block.memory.register_forward_hook(lambda m, a, y, i=i: got.__setitem__(i, y.detach()))
        for i, block in enumerate(model.blocks)
        if block.memory is not None
    ]
    try:
        with torch.no_grad():
            model(batch, **kw)
    finally:
        for h in handles:
            h.remove()
    return got
