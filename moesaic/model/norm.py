"""RMSNorm, shared by the transformer and the parameter accounting (norm weights are not
matmul parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # the weight in x's dtype (bf16 under mixed precision) keeps the fused kernel, which
        # accumulates in fp32 either way
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
