"""The memory-allocation experiment: sparse parameters split between routed experts and an
n-gram lookup memory at fixed total and active parameters (after Engram, arXiv 2601.07372).

Engram reports that, at fixed total and active parameters, giving about a fifth of the sparse
parameters to a hashed n-gram memory (`model.memory`) and the rest to routed experts beats pure
MoE: loss is U-shaped in the share ρ given to experts, lowest near ρ ≈ 0.75–0.8. Here one MoE
arm (`moe`, `moe-groups` or `moe-shared-per-modality`) with `study.experts` routed experts
defines the sparse budget S = experts × `expert_unit_params` (an expert's SwiGLU and router
column in every MoE block). Each ρ in `study.rhos` re-splits S with `params.memory_split`:
round(ρ·S/u) experts, and the largest prime tables whose whole memory fits in the rest (its
layout — layers, orders, heads, row width, conv — from the study's `model.memory.*`
overrides). ρ = 1 is the pure MoE, without memory.

What is held fixed, exactly (checked from the runs' own summaries):

* total parameters: P_total(ρ) + leftover(ρ) = P_total(1), where leftover < one step of the
  prime table sizes (`split.leftover`);
* active parameters: the ρ < 1 models differ only by their routers (dim per expert per MoE
  block); ρ = 1 has no memory, so it lacks the memory's active parameters (its projections,
  gate norms, convolution and one looked-up row per table). These are not compensated: a
  pure MoE has nowhere to put them. `study.total_tolerance` / `study.active_tolerance` bound
  the relative differences to ρ = 1 and refuse a study whose memory layout breaks them (the
  report lists every ρ's counts).

At every ρ the full step-matched tax grid of `compete.py` (text-only, image-only and joint runs
× seeds) trains on the same data, so the summary holds, per ρ, the held-out losses (the curve
against ρ), the modality tax, and how both differ from ρ = 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from moesaic.analysis.stats import Stat, paired, parabola_fit, with_holm
from moesaic.analysis.tax import HEADLINE_KEYS
from moesaic.config import ModelConfig
from moesaic.errors import ConfigError
from moesaic.experiments.arms import get_arm
from moesaic.experiments.compete import Compete, CompeteConfig
from moesaic.experiments.engine import RunResult, RunSpec, base_config, run_name
from moesaic.model.params import MemorySplit, expert_unit_params, memory_split

MOE_ARMS = ("moe", "moe-groups", "moe-shared-per-modality")
# (variant, metric) whose best ρ is "the" best ρ (for the tax comparison)
PRIMARY = ("text", "text/text")
# the loss curves against ρ: per variant, the eval keys it is scored on
CURVE_METRICS = {
    "text": ("text/text", "ood_text/text", "knowledge/text"),
    "image": ("image/image", "image_uncond/image"),
    "joint": (
        "text/text",
        "ood_text/text",
        "knowledge/text",
        "image/image",
        "image_uncond/image",
        "caption/text",
    ),
}
VARIANT_LABELS = {"text": "text-only runs", "image": "image-only runs", "joint": "joint runs"}

_MICRO = [
    "model.dim=32",
    "model.layers=2",
    "model.heads=2",
    "model.ffn.hidden=64",
    "model.memory.layers=[1]",
    "model.memory.heads=1",
    "model.memory.dim=4",
    "model.memory.conv_kernel=2",
    "data.seq_len=64",
    "data.batch_size=4",
    "data.vocab_size=512",
    "data.knowledge.entities=30",
]
_QUICK = [
    "model.dim=64",
    "model.layers=4",
    "model.heads=4",
    "model.ffn.hidden=256",
    "model.ffn.z_loss=1e-4",
    "model.memory.layers=[1]",
    "model.memory.heads=2",
    "model.memory.dim=16",
    "data.seq_len=128",
    "data.batch_size=8",
    "data.vocab_size=1024",
    "data.knowledge.entities=100",
    "train.lr=3e-3",
    "train.warmup=30",
    "train.threads=1",
    "train.checkpoint_every=100",
    "eval.every=0",
    "eval.batches=8",
    "logging.every=10",
    "logging.progress=none",
]

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds: exercises the machinery (used by the tests); numbers are noise.
    "smoke": {
        "name": "allocation-smoke",
        "base": "tiny",
        "overrides": [
            *_MICRO,
            "train.warmup=2",
            "train.threads=1",
            "train.checkpoint_every=0",
            "eval.every=0",
            "eval.batches=2",
            "logging.progress=none",
        ],
        "rhos": [1.0, 0.75, 0.5],
        "seeds": 2,
        "steps": 4,
        "experts": 8,
        "granularity": 2,
        "active_tolerance": 0.05,
        "fit_bootstrap": 200,
        "description": "end-to-end check of the allocation machinery; losses are not meaningful",
    },
    # About 25 minutes on 2 idle CPU cores: 6 ρ × 3 variants × 3 seeds = 54 runs.
    "quick": {
        "name": "allocation-quick",
        "base": "tiny",
        "overrides": _QUICK,
        "seeds": 3,
        "steps": 300,
        "experts": 16,
        "granularity": 4,
        "jobs": 2,
        "description": "CPU-sized ρ sweep: 4 × 64 MoE, 16 experts of 64 (top-4), memory in "
        "block 1, knowledge base of 100 people",
    },
    # One GPU (documented, not run here): the `small` preset, 64 experts of width 768.
    "paper": {
        "name": "allocation-paper",
        "base": "small",
        "overrides": [
            "model.ffn.z_loss=1e-4",
            "model.memory.layers=[1, 6]",
            "model.memory.heads=8",
            "model.memory.dim=32",
            "data.knowledge.entities=10000",
            "eval.every=1000",
            "logging.progress=plain",
        ],
        "seeds": 3,
        "steps": 5000,
        "experts": 64,
        "granularity": 4,
        "description": "GPU scale: small preset (12 × 768), 64 experts of 768 (top-4), memory in "
        "blocks 1 and 6, knowledge base of 10 000 people",
    },
}


@dataclasses.dataclass
class AllocationConfig(CompeteConfig):
    name: str = "allocation"
    has_video_conditions: ClassVar[bool] = False
    arms: list[str] = dataclasses.field(default_factory=lambda: ["moe"])
    rhos: list[float] = dataclasses.field(default_factory=lambda: [1.0, 0.9, 0.8, 0.7, 0.6, 0.4])
    total_tolerance: float = 0.01  # |P_total(ρ) / P_total(1) − 1| allowed
    active_tolerance: float = 0.03  # |P_active(ρ) / P_active(1) − 1| allowed
    fit_bootstrap: int = 2000  # bootstrap resamples of seeds for the parabola's minimum
    analyze: bool = False

    def validate(self) -> AllocationConfig:
        super().validate()
        if len(self.arms) != 1 or self.arms[0] not in MOE_ARMS:
            raise ConfigError(
                f"study.arms={self.arms} must name one MoE arm ({', '.join(MOE_ARMS)}); the ρ "
                "sweep moves that arm's sparse parameters between experts and memory"
            )
        if self.match != "steps":
            raise ConfigError(
                f"study.match='{self.match}': the allocation experiment supports steps only"
            )
        if not self.rhos:
            raise ConfigError(
                "study.rhos is empty; give the expert shares to sweep, e.g. [1.0, 0.8, 0.6]"
            )
        for rho in self.rhos:
            if not isinstance(rho, int | float) or not 0.0 < rho <= 1.0:
                raise ConfigError(
                    f"study.rhos has {rho}; every ρ (the share of sparse parameters given to "
                    "routed experts) must be in (0, 1]"
                )
        if len(set(self.rhos)) != len(self.rhos):
            raise ConfigError(f"study.rhos={self.rhos} repeats a value")
        if 1.0 not in self.rhos:
            raise ConfigError(
                f"study.rhos={self.rhos} lacks 1.0, the pure MoE every ρ is compared with; add it"
            )
        for key in ("total_tolerance", "active_tolerance"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"study.{key}={getattr(self, key)} must be in [0, 1)")
        if self.fit_bootstrap < 0:
            raise ConfigError(f"study.fit_bootstrap={self.fit_bootstrap} must be >= 0")
        check_splits(self)
        return self

    def arm_model(self) -> ModelConfig:
        """The arm's model (pure MoE with `experts`, memory layout from the overrides)."""
        arm = get_arm(self.arms[0]).overrides(self.experts, self.granularity)
        cfg = base_config(self, arm)
        return cfg.model

    def sparse_params(self) -> int:
        return self.experts * expert_unit_params(self.arm_model())

    def split(self, rho: float) -> MemorySplit:
        return memory_split(self.arm_model(), self.sparse_params(), rho)

    def rho_overrides(self, rho: float) -> list[str]:
        split = self.split(rho)
        memory = (
            f"model.memory.table_rows={split.table_rows}"
            if split.table_rows
            else "model.memory.layers=[]"
        )
        return [f"model.ffn.experts={split.experts}", memory]


def rho_tag(rho: float) -> str:
    return f"rho{rho:g}"


def _sizes(model: ModelConfig, vocab_size: int, patch_dim: int) -> dict[str, int]:
    """Total / active parameters and the memory's, of a model built on the meta device."""
    import torch

    from moesaic.model import Transformer
    from moesaic.model.params import param_breakdown

    cfg = dataclasses.replace(model, vocab_size=vocab_size, patch_dim=patch_dim)
    with torch.device("meta"):
        m = Transformer(cfg)
    parts = param_breakdown(m)
    return {
        "params_total": m.num_params(active=False),
        "params_active": m.num_params(active=True),
        "memory_total": parts["memory_total"],
        "memory_active": parts["memory_active"],
        "router": parts["router"],
    }


def check_splits(study: AllocationConfig) -> None:
    """Every ρ can be built, the splits are distinct, and total / active parameters stay within
    the study's tolerances of ρ = 1 (counted with `data.vocab_size` as the vocabulary)."""
    data = base_config(study).data
    sizes, experts = {}, {}
    for rho in study.rhos:
        split = study.split(rho)  # raises ConfigError for an impossible split
        if split.experts in experts:
            raise ConfigError(
                f"study.rhos {experts[split.experts]:g} and {rho:g} both give {split.experts} "
                "routed experts; drop one or raise study.experts for a finer grid"
            )
        experts[split.experts] = rho
        sizes[rho] = _sizes(split.apply(study.arm_model()), data.vocab_size, data.patch_dim)
    ref = sizes[1.0]
    for rho, s in sizes.items():
        for key, tol in (("total", study.total_tolerance), ("active", study.active_tolerance)):
            dev = s[f"params_{key}"] / ref[f"params_{key}"] - 1
            if abs(dev) > tol:
                raise ConfigError(
                    f"at rho={rho:g} the {key} parameters differ from rho=1 by {100 * dev:+.1f} % "
                    f"(> study.{key}_tolerance={tol}); shrink the memory's active part "
                    "(model.memory.dim, heads, layers) or raise the tolerance"
                )


def _per_rho(study: AllocationConfig, rho: float) -> AllocationConfig:
    """The study at one ρ, as a tax study (its runs' overrides carry the split)."""
    split = study.split(rho)
    return dataclasses.replace(
        study,
        overrides=[*study.overrides, *study.rho_overrides(rho)],
        experts=split.experts,
    )


# ----------------------------------------------------------------------------- the summary


def _value(r: RunResult | None, key: str) -> float | None:
    return None if r is None else r.summary.get("eval", {}).get(key)


def _u_shape(
    study: AllocationConfig, by: dict, variant: str, key: str, realized: dict[float, float]
) -> dict[str, Any] | None:
    """Loss against ρ for one (variant, metric): per-ρ Stats, every ρ against ρ = 1 paired by
    seed (Holm across ρ), the best ρ, and a parabola in realized ρ with a bootstrap minimum."""
    seeds = study.seed_list()
    rhos = study.rhos
    values = {rho: [_value(by.get((rho, variant, s)), key) for s in seeds] for rho in rhos}
    if all(v is None for vals in values.values() for v in vals):
        return None
    points = [
        {"rho": rho, "realized_rho": realized[rho], "loss": Stat.of(values[rho]).to_dict()}
        for rho in rhos
    ]
    tests = {f"{rho:g}": paired(values[rho], values[1.0]) for rho in rhos if rho != 1.0}
    vs_pure = {k: p.to_dict() for k, p in with_holm(tests).items()} if tests else {}
    means = {rho: Stat.of(values[rho]).mean for rho in rhos}
    finite = {rho: m for rho, m in means.items() if math.isfinite(m)}
    best = min(finite, key=finite.get) if finite else None
    fit = None
    if len(rhos) >= 3:
        x = [realized[rho] for rho in rhos]
        v_SX = [[values[rho][i] for rho in rhos] for i in range(len(seeds))]
        fit = parabola_fit(x, v_SX, study.fit_bootstrap).to_dict()
    out = {"points": points, "vs_pure": vs_pure, "best_rho": best, "fit": fit}
    out["verdict"] = u_shape_verdict(out)
    return out


def u_shape_verdict(cell: dict[str, Any]) -> dict[str, Any]:
    """Classify one loss curve against ρ.

    * `memory_helps`: the best ρ is < 1 and its paired difference L(ρ_best) − L(1) has a
      Holm-corrected p (across the ρ compared with 1) below 0.05 — correcting for picking the
      best of several ρ;
    * `interval_below_zero`: the same difference's 95 % t-interval lies below 0 (uncorrected);
    * `interior_minimum`: the bootstrap 95 % interval of the fitted parabola's lowest point
      lies strictly inside the studied range of realized ρ (both ends excluded), i.e. a U.
    """
    best = cell["best_rho"]
    diff = cell["vs_pure"].get(f"{best:g}") if best is not None and best != 1.0 else None
    p_holm = (diff or {}).get("p_holm")
    high = ((diff or {}).get("ci95") or [None, None])[1]
    fit = cell.get("fit") or {}
    xs = [p["realized_rho"] for p in cell["points"]]
    low_b, high_b = fit.get("argmin_ci95") or (None, None)
    interior = low_b is not None and high_b is not None and min(xs) < low_b and high_b < max(xs)
    helps = p_holm is not None and p_holm < 0.05 and (diff.get("mean") or 0) < 0
    below = high is not None and high < 0
    if helps and interior:
        text = "U-shaped: memory beats pure MoE and the fitted minimum is inside the range"
    elif helps:
        text = "memory beats pure MoE; the location of the minimum is not resolved"
    elif below:
        text = (
            "the best ρ < 1 is below pure MoE by its uncorrected interval, but not after "
            "correcting for the choice of ρ"
        )
    elif best == 1.0:
        text = "pure MoE (ρ = 1) has the lowest mean loss"
    else:
        text = "no detectable difference from pure MoE at this power"
    return {
        "memory_helps": helps,
        "interval_below_zero": below,
        "interior_minimum": interior,
        "text": text,
    }


def _tax_vs_pure(study: AllocationConfig, taxes: dict[str, list]) -> dict[str, Any]:
    """Per ρ < 1: tax(ρ) − tax(1) per seed for the headline metrics, Holm over the metrics."""
    out = {}
    for i, rho in enumerate(study.rhos):
        if rho == 1.0:
            continue
        ref = study.rhos.index(1.0)
        tests = {}
        for key, points in taxes.items():
            a, b = ((points[j]["tax"] or {}).get("values") for j in (i, ref))
            if a and b:
                tests[key] = paired(a, b)
        out[f"{rho:g}"] = {k: p.to_dict() for k, p in with_holm(tests).items()}
    return out


def _params(study: AllocationConfig, by: dict) -> dict[str, Any]:
    """Per ρ: the split and the parameters the runs report (joint run of the first seed)."""
    from moesaic.config import load_config

    first = study.first_seed
    splits: dict[str, Any] = {}
    for rho in study.rhos:
        split = study.split(rho)
        run = by[(rho, "joint", first)]
        cfg = load_config(run.run_dir / "config.yaml")
        sizes = _sizes(cfg.model, cfg.model.vocab_size, cfg.model.patch_dim)
        splits[f"{rho:g}"] = {
            "rho": rho,
            "realized_rho": split.realized_rho,
            "experts": split.experts,
            "table_rows": split.table_rows,
            "expert_params": split.expert_params,
            "memory_params": split.memory_params,
            "leftover": split.leftover,
            "params_total": run.summary.get("params_total"),
            "params_active": run.summary.get("params_active"),
            "memory_active": sizes["memory_active"],
            "router": sizes["router"],
            "flops_per_token": run.summary.get("flops_per_token"),
        }
    ref = splits["1"]
    for s in splits.values():
        for key in ("total", "active"):
            s[f"{key}_vs_pure"] = s[f"params_{key}"] / ref[f"params_{key}"] - 1
    return splits


def summarize_allocation(
    study: AllocationConfig, study_dir: Path, results: list[RunResult], log: Callable
) -> dict[str, Any]:
    from moesaic.experiments.tax_summary import summarize

    by = {(r.spec.tag("rho"), r.spec.tag("variant"), r.spec.tag("seed")): r for r in results}
    splits = _params(study, by)
    realized = {rho: splits[f"{rho:g}"]["realized_rho"] for rho in study.rhos}
    per_rho = {}
    for rho in study.rhos:
        mine = [r for r in results if r.spec.tag("rho") == rho]
        per_rho[f"{rho:g}"] = summarize(_per_rho(study, rho), study_dir, mine, log)
    curves: dict[str, Any] = {}
    for variant, keys in CURVE_METRICS.items():
        cells = {k: _u_shape(study, by, variant, k, realized) for k in keys}
        curves[variant] = {k: c for k, c in cells.items() if c is not None}
    primary = curves.get(PRIMARY[0], {}).get(PRIMARY[1])
    best = primary["best_rho"] if primary else None
    arm = study.arms[0]
    taxes = {
        key: [
            {
                "rho": rho,
                "realized_rho": realized[rho],
                "tax": (per_rho[f"{rho:g}"]["arms"][arm]["metrics"].get(key) or {}).get("tax"),
                "delta": (per_rho[f"{rho:g}"]["arms"][arm]["metrics"].get(key) or {}).get("delta"),
            }
            for rho in study.rhos
        ]
        for key in HEADLINE_KEYS
        if any(key in per_rho[f"{rho:g}"]["arms"][arm]["metrics"] for rho in study.rhos)
    }
    return {
        "arm": arm,
        "rhos": list(study.rhos),
        "sparse_params": study.sparse_params(),
        "expert_unit_params": expert_unit_params(study.arm_model()),
        "memory_layout": {
            k: v
            for k, v in dataclasses.asdict(study.arm_model().memory).items()
            if k != "table_rows"
        },
        "tolerance": {"total": study.total_tolerance, "active": study.active_tolerance},
        "splits": splits,
        "curves": curves,
        "primary": {"variant": PRIMARY[0], "metric": PRIMARY[1], "best_rho": best},
        "taxes": taxes,
        "tax_vs_pure": _tax_vs_pure(study, taxes),
        "per_rho": per_rho,
    }


# ----------------------------------------------------------------------------- the experiment


class Allocation(Compete):
    name = "memory-allocation"
    config_class = AllocationConfig
    presets = PRESETS

    def plan(self, study: AllocationConfig, study_dir: Path, log: Callable) -> list[RunSpec]:
        specs = []
        for rho in study.rhos:
            for spec in super().plan(_per_rho(study, rho), study_dir, log):
                arm, variant, seed = (spec.tag(k) for k in ("arm", "variant", "seed"))
                name = run_name(arm, variant, rho_tag(rho), f"s{seed}")
                tags = (*spec.tags, ("rho", rho))
                overrides = (*spec.overrides, *study.rho_overrides(rho))
                specs.append(RunSpec(name, overrides, tags))
        return specs

    def summarize(
        self, study: AllocationConfig, study_dir: Path, results: list[RunResult], log: Callable
    ) -> dict[str, Any]:
        return summarize_allocation(study, study_dir, results, log)

    def report(self, summary: dict[str, Any], study_dir: Path) -> Any:
        from moesaic.report.allocation import allocation_report

        return allocation_report(summary)

    def console(self, summary: dict[str, Any]) -> str:
        from moesaic.report.allocation import allocation_console

        return allocation_console(summary)


EXPERIMENT = Allocation()
