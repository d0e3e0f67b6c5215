"""The modality tax (design.md §5), per seed, and its summary over seeds.

For an architecture A and a metric of modality m, with a unimodal run U (trained on the m-data
only) and a joint run J (the same m-data plus the other modality's data):

    tax = (L(J) − L(U)) / L(U) × 100              for losses (lower is better)
    tax = (M(U) − M(J)) / M(U) × 100              for scores (higher is better)

so a positive tax always means competition (the joint run is worse on m) and a negative tax
means synergy. The score form is the loss form with the sign flipped; it keeps the denominator
at the unimodal value, so both read "percent worse than unimodal". The tax is undefined (NaN)
when the unimodal value is 0 or either value is not finite. Beside the percentage the absolute
difference Δ = L(J) − L(U) (nats, or MSE) is reported, paired the same way.

With several seeds the tax is computed per seed from the paired runs (joint seed s against
unimodal seed s: same initialisation seed, same data order) and summarised with a 95 %
t-interval (`analysis.stats.Stat`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from moesaic.analysis.stats import Stat


def modality_tax(l_joint: float, l_unimodal: float, higher_is_better: bool = False) -> float:
    """Percent by which the joint run is worse than the unimodal run (NaN when undefined)."""
    j, u = float(l_joint), float(l_unimodal)
    if not (math.isfinite(j) and math.isfinite(u)) or u == 0.0:
        return float("nan")
    tax = (j - u) / u * 100.0
    return -tax if higher_is_better else tax


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One metric of a tax table.

    key: where the value lives in a run's results (e.g. "text/text", an eval-loss key).
    modality: which unimodal run is the reference ("text" or "image"); None = joint-only
        metric (no unimodal reference exists, e.g. captioning needs both modalities).
    headline: one of the metrics whose arm-vs-baseline tests form one Holm family.
    """

    key: str
    label: str
    modality: str | None
    higher_is_better: bool = False
    headline: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "modality": self.modality,
            "higher_is_better": self.higher_is_better,
            "headline": self.headline,
        }


# The eval-loss metrics every study reports (keys of the trainer's eval losses, design.md §5).
LOSS_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("text/text", "text CE (in-distribution)", "text", headline=True),
    MetricSpec("ood_text/text", "text CE (out-of-distribution)", "text", headline=True),
    MetricSpec("knowledge/text", "fact recall CE (knowledge base)", "text", headline=True),
    MetricSpec("image/image", "image flow MSE (caption→image)", "image", headline=True),
    MetricSpec("image_uncond/image", "image flow MSE (unconditional)", "image", headline=True),
    MetricSpec("caption/text", "caption CE (image→text)", None),
)
HEADLINE_KEYS = tuple(m.key for m in LOSS_METRICS if m.headline)


def time_bin_metrics(bins: int) -> tuple[MetricSpec, ...]:
    """Caption→image flow MSE per flow-time bin (`evaluate.losses.TIME_BINS` bins of t)."""
    return tuple(
        MetricSpec(
            f"image/image_t{i}", f"image MSE, t in [{i / bins:.2f}, {(i + 1) / bins:.2f})", "image"
        )
        for i in range(bins)
    )


@dataclasses.dataclass(frozen=True)
class TaxCell:
    """One (arm, metric) over seeds: unimodal and joint values, the per-seed tax (%) and the
    per-seed absolute difference joint − unimodal."""

    metric: MetricSpec
    unimodal: Stat
    joint: Stat
    tax: Stat
    delta: Stat

    def to_dict(self) -> dict[str, Any]:
        ref = self.metric.modality is not None
        return {
            **self.metric.to_dict(),
            "unimodal": self.unimodal.to_dict() if ref else None,
            "joint": self.joint.to_dict(),
            "tax": self.tax.to_dict() if ref else None,
            "delta": self.delta.to_dict() if ref else None,
        }


def tax_cell(
    metric: MetricSpec, unimodal: Sequence[float | None], joint: Sequence[float | None]
) -> TaxCell:
    """Tax over seeds from paired per-seed values (`unimodal[i]` pairs with `joint[i]`).

    None (a missing run or metric) counts as NaN: that seed drops out of the tax and the means.
    For a joint-only metric pass `unimodal=[]`.
    """
    nan = float("nan")
    j = [nan if v is None else float(v) for v in joint]
    if metric.modality is None:
        return TaxCell(metric, Stat.of([]), Stat.of(j), Stat.of([]), Stat.of([]))
    if len(unimodal) != len(joint):
        raise ValueError(f"{metric.key}: {len(unimodal)} unimodal vs {len(joint)} joint values")
    u = [nan if v is None else float(v) for v in unimodal]
    taxes = [modality_tax(jj, uu, metric.higher_is_better) for uu, jj in zip(u, j, strict=True)]
    deltas = [jj - uu for uu, jj in zip(u, j, strict=True)]
    return TaxCell(metric, Stat.of(u), Stat.of(j), Stat.of(taxes), Stat.of(deltas))


def tax_verdict(tax: Mapping[str, Any] | None) -> str:
    """competition / synergy / no tax detectable, from the 95 % interval of a tax Stat."""
    if not tax or tax.get("mean") is None:
        return "no value"
    low, high = tax.get("ci95") or (None, None)
    if low is None or high is None:
        return "one seed, no interval"
    return "competition" if low > 0 else "synergy" if high < 0 else "no tax detectable"
