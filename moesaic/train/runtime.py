"""Where and how a run computes: device, precision and threads."""

from __future__ import annotations

import contextlib
import functools

import torch

from moesaic.config import TrainConfig
from moesaic.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device='{name}' is not a device; use auto, cpu or cuda[:N]"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device='{name}' but CUDA is not available; use train.device=cpu")
    return device


def autocast_factory(cfg: TrainConfig, device: torch.device):
    """A zero-argument context-manager factory: bf16 autocast or a no-op."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def set_threads(cfg: TrainConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
