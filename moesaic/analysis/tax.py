"""The modality tax (design.md §5) and the arms × metrics table of a competition study.

For an architecture A and a metric of modality m, with a unimodal run U (trained on the m-data
only) and a joint run J (the same m-data plus the other modality's data):

    tax = (L(J) − L(U)) / L(U) × 100              for losses (lower is better)
    tax = (M(U) − M(J)) / M(U) × 100              for scores (higher is better)

so a positive tax always means competition (the joint run is worse on m) and a negative tax
means synergy. The score form is the loss form with the sign flipped; it keeps the denominator
at the unimodal value, so both read "percent worse than unimodal". The tax is undefined (NaN)
when the unimodal value is 0 or either value is not finite.

With several seeds the tax is computed per seed from the paired runs (joint seed s against
unimodal seed s: same initialisation seed, same data order), then summarised as mean ± sample
standard deviation over seeds (`Stat`); n = 1 gives std NaN.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def modality_tax(l_joint: float, l_unimodal: float, higher_is_better: bool = False) -> float:
    """Percent by which the joint run is worse than the unimodal run (NaN when undefined)."""
    j, u = float(l_joint), float(l_unimodal)
    if not (math.isfinite(j) and math.isfinite(u)) or u == 0.0:
        return float("nan")
    tax = (j - u) / u * 100.0
    return -tax if higher_is_better else tax


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean ± sample std (ddof=1) of the finite values; NaN values are counted in `missing`."""

    mean: float
    std: float
    n: int
    values: tuple[float, ...]
    missing: int = 0

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        vals = tuple(float(v) for v in values)
        finite = [v for v in vals if math.isfinite(v)]
        n = len(finite)
        mean = sum(finite) / n if n else float("nan")
        std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else float("nan")
        return cls(mean, std, n, vals, len(vals) - n)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": _json_float(self.mean),
            "std": _json_float(self.std),
            "n": self.n,
            "values": [_json_float(v) for v in self.values],
        }

    def format(self, digits: int = 2, unit: str = "") -> str:
        if not math.isfinite(self.mean):
            return "—"
        text = f"{self.mean:+.{digits}f}" if unit == "%" else f"{self.mean:.{digits}f}"
        if math.isfinite(self.std):
            text += f" ± {self.std:.{digits}f}"
        return text + unit


def _json_float(v: float) -> float | None:
    """JSON has no NaN: undefined numbers are written as null."""
    return float(v) if math.isfinite(v) else None


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One row group of the tax table.

    key: where the value lives in a run's results (e.g. "text/text", an eval-loss key).
    modality: which unimodal run is the reference ("text" or "image"); None = joint-only
        metric (no unimodal reference exists, e.g. captioning needs both modalities).
    """

    key: str
    label: str
    modality: str | None
    higher_is_better: bool = False


# The eval-loss metrics every study reports (keys of `Trainer` eval losses, design.md §5).
LOSS_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("text/text", "text CE (in-distribution)", "text"),
    MetricSpec("ood_text/text", "text CE (out-of-distribution)", "text"),
    MetricSpec("image/image", "image flow MSE", "image"),
    MetricSpec("caption/text", "caption CE (image→text)", None),
)


@dataclasses.dataclass(frozen=True)
class TaxCell:
    """One (arm, metric): unimodal and joint values and the per-seed tax, over seeds."""

    arm: str
    metric: MetricSpec
    unimodal: Stat
    joint: Stat
    tax: Stat

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.metric.label,
            "modality": self.metric.modality,
            "higher_is_better": self.metric.higher_is_better,
            "unimodal": self.unimodal.to_dict() if self.metric.modality else None,
            "joint": self.joint.to_dict(),
            "tax": self.tax.to_dict() if self.metric.modality else None,
        }


def tax_cell(
    arm: str,
    metric: MetricSpec,
    unimodal: Sequence[float | None],
    joint: Sequence[float | None],
) -> TaxCell:
    """Tax over seeds from paired per-seed values (`unimodal[i]` pairs with `joint[i]`).

    None (a missing run or metric) counts as NaN: that seed drops out of the tax and the means.
    """
    if metric.modality is not None and len(unimodal) != len(joint):
        raise ValueError(f"{arm}/{metric.key}: {len(unimodal)} unimodal vs {len(joint)} joint")
    u = [float("nan") if v is None else float(v) for v in unimodal]
    j = [float("nan") if v is None else float(v) for v in joint]
    if metric.modality is None:
        taxes: list[float] = []
    else:
        taxes = [modality_tax(jj, uu, metric.higher_is_better) for uu, jj in zip(u, j, strict=True)]
    return TaxCell(arm, metric, Stat.of(u), Stat.of(j), Stat.of(taxes))


def tax_table(
    results: Mapping[str, Mapping[str, Mapping[str, Sequence[float | None]]]],
    metrics: Sequence[MetricSpec] = LOSS_METRICS,
) -> dict[str, dict[str, TaxCell]]:
    """arm → metric key → `TaxCell`.

    `results[arm][variant][metric_key]` is the list of per-seed values (index = seed position),
    with variant "text", "image" (the unimodal runs) and "joint". A metric whose key no run of
    an arm reports is left out of that arm's row.
    """
    table: dict[str, dict[str, TaxCell]] = {}
    for arm, variants in results.items():
        joint = variants.get("joint", {})
        row: dict[str, TaxCell] = {}
        for spec in metrics:
            uni = variants.get(spec.modality, {}) if spec.modality else {}
            j_vals = joint.get(spec.key)
            if j_vals is None:
                continue
            u_vals = uni.get(spec.key) if spec.modality else []
            if spec.modality and u_vals is None:
                u_vals = [None] * len(j_vals)
            row[spec.key] = tax_cell(arm, spec, u_vals or [], j_vals)
        table[arm] = row
    return table


def tax_difference(
    table: Mapping[str, Mapping[str, TaxCell]], arm: str, baseline: str, key: str
) -> Stat | None:
    """Paired per-seed difference tax(arm) − tax(baseline) in percentage points.

    Both arms see identical data and initialisation seeds, so pairing by seed removes the
    seed-to-seed variation they share; the difference exceeds seed noise when |mean| is large
    against its std. None when either arm lacks the metric.
    """
    a, b = table.get(arm, {}).get(key), table.get(baseline, {}).get(key)
    if a is None or b is None or a.metric.modality is None:
        return None
    return Stat.of(x - y for x, y in zip(a.tax.values, b.tax.values, strict=True))


def least_tax(table: Mapping[str, Mapping[str, TaxCell]], key: str) -> str | None:
    """The arm with the smallest mean tax on metric `key` (None if no arm has a finite one)."""
    best, best_val = None, math.inf
    for arm, row in table.items():
        cell = row.get(key)
        if cell is not None and math.isfinite(cell.tax.mean) and cell.tax.mean < best_val:
            best, best_val = arm, cell.tax.mean
    return best


def format_tax_table(
    table: Mapping[str, Mapping[str, TaxCell]], metrics: Sequence[MetricSpec] = LOSS_METRICS
) -> str:
    """A plain-text table: one line per (arm, metric) with unimodal, joint and tax."""
    head = f"{'arm':<24} {'metric':<32} {'unimodal':>17} {'joint':>17} {'tax':>19}"
    lines = [head, "-" * len(head)]
    for arm, row in table.items():
        for spec in metrics:
            cell = row.get(spec.key)
            if cell is None:
                continue
            uni = cell.unimodal.format(4) if spec.modality else "(joint only)"
            tax = cell.tax.format(2, "%") if spec.modality else ""
            lines.append(
                f"{arm:<24} {spec.label:<32} {uni:>17} {cell.joint.format(4):>17} {tax:>19}"
            )
    return "\n".join(lines)
