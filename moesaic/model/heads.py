"""Modality inputs and outputs: image input projection + timestep embedding, heads, losses.

Images use rectified flow (design.md §3): `x_t = t·x0 + (1−t)·ε` with t = 1 clean and t = 0 pure
noise. The noised patch enters through a linear projection plus an embedding of t; the image
head predicts the velocity `x0 − ε` (`prediction: velocity`) or the clean patch `x0`
(`prediction: x0`); either way the loss is the MSE against that target, averaged over every
element of the positions that carry image loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t·1000, the usual diffusion-step range


def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of flow time: [...] -> [..., dim] (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    angles = (t.float() * TIME_SCALE).unsqueeze(-1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t -> Linear -> SiLU -> Linear: [...] -> [..., D]."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.w_in = nn.Linear(dim, dim, bias=False)
        self.w_out = nn.Linear(dim, dim, bias=False)

    def forward(self, t: Tensor) -> Tensor:
        return self.w_out(F.silu(self.w_in(timestep_features(t, self.dim))))


class ImageInput(nn.Module):
    """Noised patches in: `proj(x_t) + time(t)`: ([..., P], [...]) -> [..., D]."""

    def __init__(self, patch_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(patch_dim, dim, bias=False)
        self.time = TimestepEmbedding(dim)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.proj(x_t) + self.time(t)


def flow_input(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = t·x0 + (1−t)·ε, one t per position (its image's): [B, L, P]."""
    t = t.unsqueeze(-1).to(x0.dtype)
    return t * x0 + (1 - t) * noise


def flow_target(x0: Tensor, noise: Tensor, prediction: str) -> Tensor:
    """What the image head regresses: velocity x0 − ε, or x0 itself."""
    return x0 - noise if prediction == "velocity" else x0


def text_loss(logits_BLV: Tensor, targets_BL: Tensor) -> tuple[Tensor, Tensor]:
    """(mean CE over targets >= 0 in fp32, number of targets); 0 (with a graph) when none."""
    ce = F.cross_entropy(
        logits_BLV.reshape(-1, logits_BLV.shape[-1]).float(),
        targets_BL.reshape(-1),
        ignore_index=-1,
        reduction="sum",
    )
    count = (targets_BL >= 0).sum()
    return ce / count.clamp_min(1), count


def image_loss(pred_BLP: Tensor, target_BLP: Tensor, mask_BL: Tensor) -> tuple[Tensor, Tensor]:
    """(MSE over all elements of positions in mask, in fp32; number of positions)."""
    sq = (pred_BLP.float() - target_BLP.float()).square().sum(-1)
    count = mask_BL.sum()
    n_elements = (count * pred_BLP.shape[-1]).clamp_min(1)
    return torch.where(mask_BL, sq, 0.0).sum() / n_elements, count
