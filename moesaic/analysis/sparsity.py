"""Activation sparsity of hidden vectors (design.md §5), vectorised over many vectors.

For each hidden vector h ∈ R^d, with a = |h| and p = a / Σa:

* top-k% mass  `Σ_top k% a / Σ a` for k ∈ {1, 5, 10}, the top `ceil(k·d/100)` (at least one)
  entries: 1 for a one-hot vector, ≈ k/100 for a uniform one;
* L0-style fraction of entries with `a > mean(a) + std(a)` (population std): 1/d for one-hot,
  0 for uniform (no entry exceeds the mean);
* Gini coefficient of a, `Σ_i (2i − d − 1) a_(i) / (d Σ a)` with a sorted ascending, i = 1..d:
  0 for uniform, (d − 1)/d for one-hot;
* effective-rank ratio `exp(H(p)) / d`, H in nats with 0·log 0 = 0: 1 for uniform, 1/d for
  one-hot.

Higher top-k mass / Gini and lower L0 / effective rank = sparser. An all-zero vector has no
defined value (NaN everywhere). Computed in float64 so the extremes come out exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

TOPK_PERCENTS = (1, 5, 10)
METRICS = ("top1_mass", "top5_mass", "top10_mass", "l0_fraction", "gini", "eff_rank_ratio")


def _as_tensor(h: Any) -> Tensor:
    t = h.detach() if isinstance(h, Tensor) else torch.as_tensor(h)
    t = t.to(torch.float64)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    return t.reshape(-1, t.shape[-1])


def topk_count(d: int, percent: float) -> int:
    """How many entries make the top `percent`% of a d-vector: ceil(percent·d/100), ≥ 1."""
    return max(1, math.ceil(percent * d / 100 - 1e-9))


def sparsity_metrics(h: Any) -> dict[str, Tensor]:
    """Per-vector metrics of `h` [..., d] → {name: [N]} with N = prod(leading dims)."""
    a_ND = _as_tensor(h).abs()
    n, d = a_ND.shape
    total_N = a_ND.sum(-1)
    defined_N = total_N > 0
    safe_N = torch.where(defined_N, total_N, torch.ones_like(total_N))
    sorted_ND = a_ND.sort(dim=-1, descending=True).values
    out: dict[str, Tensor] = {}
    for pct in TOPK_PERCENTS:
        m = topk_count(d, pct)
        out[f"top{pct}_mass"] = sorted_ND[:, :m].sum(-1) / safe_N
    mean_N = a_ND.mean(-1, keepdim=True)
    std_N = a_ND.std(-1, unbiased=False, keepdim=True)
    out["l0_fraction"] = (a_ND > mean_N + std_N).to(torch.float64).mean(-1)
    ascending_ND = sorted_ND.flip(-1)
    i_D = torch.arange(1, d + 1, dtype=torch.float64)
    out["gini"] = ((2 * i_D - d - 1) * ascending_ND).sum(-1) / (d * safe_N)
    p_ND = a_ND / safe_N.unsqueeze(-1)
    plogp = torch.where(p_ND > 0, p_ND * p_ND.clamp_min(1e-300).log(), torch.zeros_like(p_ND))
    out["eff_rank_ratio"] = torch.exp(-plogp.sum(-1)) / d
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return {k: torch.where(defined_N, v, nan) for k, v in out.items()}


def summarize(h: Any) -> dict[str, float]:
    """Mean of each metric over the vectors of `h` (NaN vectors ignored) plus their count."""
    per = sparsity_metrics(h)
    out: dict[str, float] = {}
    for name, v in per.items():
        ok = torch.isfinite(v)
        out[name] = float(v[ok].mean()) if ok.any() else float("nan")
    out["vectors"] = float(next(iter(per.values())).numel())
    return out


def compare(
    per_set: Mapping[str, Sequence[Mapping[str, float]]], reference: str, other: str
) -> list[dict[str, float]]:
    """Per layer: other − reference for each metric (e.g. OOD text minus in-distribution)."""
    rows = []
    for ref, oth in zip(per_set[reference], per_set[other], strict=True):
        rows.append({m: oth[m] - ref[m] for m in METRICS})
    return rows
