"""The depth-width experiment: at a fixed non-embedding parameter count, is a deep and thin model
better than a wide and shallow one (MobileLLM, arXiv 2402.14905), per modality and per arm?

Each depth L in `study.depths` gets the width D that brings the arm's non-embedding parameters
closest to `study.params`:

* **non-embedding parameters** = the transformer blocks (attention, FFN or experts, routers,
  norms, memory) and the final norm; the token embedding, text head, image input (patch
  projection and timestep MLP) and image head are input/output parameters, reported apart
  (they shrink with the width, so thinner shapes have fewer total parameters).
  `study.count` picks which count MoE arms hold fixed: `active` (per token, the default: equal
  compute in the FFN) or `total`; dense arms have one count.
* **the shape**: D is a multiple of `study.width_step`; the FFN width is `ffn_ratio · D` (so
  only depth and width change); `heads · head_dim = D` with the divisor of D whose (even)
  head width is closest to `study.head_dim`. The widths are found exactly: a parabola in D
  through three counted models gives the ideal width, and the grid widths around it are
  counted (models built on the meta device) and the closest kept. A shape whose count misses
  `params` by more than `study.tolerance` (relative) stops the study with the nearest count.

Every (arm, depth) trains a text-only and an image-only run per seed on the same data as the
tax study's unimodal runs (`compete.variant_overrides`), and the summary reports each loss
against depth with intervals, the per-seed slope of loss against log2(depth), the best depth
and every depth against it (paired by seed, Holm across depths), and a verdict per arm and
modality.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moesaic.analysis.stats import Stat, paired, with_holm
from moesaic.analysis.tax import LOSS_METRICS
from moesaic.config import ModelConfig
from moesaic.errors import ConfigError
from moesaic.experiments.arms import check_arms, get_arm
from moesaic.experiments.compete import variant_overrides
from moesaic.experiments.engine import RunResult, RunSpec, base_config, run_name
from moesaic.experiments.study import StudyConfig

VARIANTS = ("text", "image")
COUNTS = ("active", "total")
METRICS = {
    "text": ("text/text", "ood_text/text", "knowledge/text"),
    "image": ("image/image", "image_uncond/image"),
}
PRIMARY = {"text": "text/text", "image": "image/image"}

_RUN = [
    "train.threads=1",
    "eval.every=0",
    "logging.progress=none",
]

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds: exercises the machinery (used by the tests); numbers are noise.
    "smoke": {
        "name": "depth-smoke",
        "base": "tiny",
        "overrides": [
            *_RUN,
            "data.seq_len=64",
            "data.batch_size=4",
            "data.vocab_size=512",
            "train.warmup=2",
            "train.checkpoint_every=0",
            "eval.batches=2",
        ],
        "depths": [2, 8],
        "params": 19000,
        "head_dim": 8,
        "seeds": 2,
        "steps": 4,
        "experts": 8,
        "granularity": 2,
        "description": "end-to-end check of the depth machinery; losses are not meaningful",
    },
    # About 25 minutes on 2 idle CPU cores: 2 arms × 4 depths × 2 variants × 3 seeds = 48 runs.
    "quick": {
        "name": "depth-quick",
        "base": "tiny",
        "overrides": [
            *_RUN,
            "model.ffn.z_loss=1e-4",
            "data.seq_len=128",
            "data.batch_size=8",
            "data.vocab_size=1024",
            "data.knowledge.entities=100",
            "train.lr=3e-3",
            "train.warmup=30",
            "train.checkpoint_every=100",
            "eval.batches=8",
            "logging.every=10",
        ],
        "depths": [2, 4, 8, 16],
        "params": 206000,
        "seeds": 3,
        "steps": 400,
        "experts": 16,
        "granularity": 4,
        "jobs": 2,
        "description": "CPU-sized depth sweep at ≈ 206k non-embedding parameters: dense and "
        "MoE (16 experts of width D, top-4), text-only and image-only runs",
    },
    # One GPU (documented, not run here): the `small` preset's data, ≈ 95M non-embedding.
    "paper": {
        "name": "depth-paper",
        "base": "small",
        "overrides": [
            "model.ffn.z_loss=1e-4",
            "data.knowledge.entities=10000",
            "eval.every=1000",
            "logging.progress=plain",
        ],
        "depths": [2, 4, 8, 12, 16, 24],
        "params": 95_250_000,
        "head_dim": 64,
        "width_step": 16,
        "tolerance": 0.02,
        "seeds": 3,
        "steps": 5000,
        "experts": 64,
        "granularity": 4,
        "description": "GPU scale: ≈ 95M non-embedding parameters (the small preset's data; "
        "its 12 × 768 model has 113M), dense and MoE (64 experts of width D, top-4)",
    },
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One depth's model shape and its non-embedding parameter counts."""

    depth: int
    width: int
    heads: int
    head_dim: int
    ffn_hidden: int
    nonembedding_total: int
    nonembedding_active: int
    held: int  # the count held at the target (active or total, per `study.count`)
    deviation: float  # held / target − 1

    def overrides(self) -> list[str]:
        return [
            f"model.layers={self.depth}",
            f"model.dim={self.width}",
            f"model.heads={self.heads}",
            f"model.ffn.hidden={self.ffn_hidden}",
        ]


@dataclasses.dataclass
class DepthConfig(StudyConfig):
    name: str = "depth"
    arms: list[str] = dataclasses.field(default_factory=lambda: ["dense", "moe"])
    depths: list[int] = dataclasses.field(default_factory=lambda: [2, 4, 8, 16])
    params: int = 206000  # target non-embedding parameters of every shape
    count: str = "active"  # active | total: the count MoE arms hold at `params`
    ffn_ratio: int = 4  # model.ffn.hidden = ffn_ratio · width
    head_dim: int = 16  # wanted head width; heads · head_dim = width exactly
    width_step: int = 4  # widths are multiples of this
    tolerance: float = 0.05  # allowed |count / params − 1|
    steps: int = 300  # optimizer steps of every run
    image_mix: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"caption_image": 0.75, "image": 0.25}
    )
    experts: int = 16  # E of the MoE arms (experts of width F/G)
    granularity: int = 4  # G
    lr: dict[str, float] = dataclasses.field(default_factory=dict)  # per-arm train.lr

    def validate(self) -> DepthConfig:
        super().validate()
        if len(self.depths) < 2:
            raise ConfigError(
                f"study.depths={self.depths} has fewer than 2 shapes; give at least two depths "
                "to compare, e.g. [2, 4, 8, 16]"
            )
        if len(set(self.depths)) != len(self.depths):
            raise ConfigError(f"study.depths={self.depths} repeats a depth")
        for d in self.depths:
            if not isinstance(d, int) or d < 1:
                raise ConfigError(f"study.depths has {d}; every depth must be an integer >= 1")
        if self.count not in COUNTS:
            raise ConfigError(
                f"study.count='{self.count}' is not one of {', '.join(COUNTS)} (the non-embedding "
                "count MoE arms hold fixed)"
            )
        for key in ("params", "ffn_ratio", "steps", "experts", "granularity"):
            if getattr(self, key) < 1:
                raise ConfigError(f"study.{key}={getattr(self, key)} must be >= 1")
        for key in ("head_dim", "width_step"):
            value = getattr(self, key)
            if value < 2 or value % 2:
                raise ConfigError(
                    f"study.{key}={value} must be an even number >= 2 (RoPE needs even heads)"
                )
        if not 0.0 < self.tolerance < 1.0:
            raise ConfigError(f"study.tolerance={self.tolerance} must be in (0, 1)")
        check_arms(self.arms, self.lr)
        bad = [k for k in self.image_mix if k not in ("caption_image", "image")]
        if bad:
            raise ConfigError(
                f"study.image_mix has '{bad[0]}'; the image-only runs use caption_image and "
                "image documents only"
            )
        if sum(self.image_mix.values()) <= 0:
            raise ConfigError("study.image_mix has no positive weight")
        self.shapes()  # every shape must be buildable within the tolerance
        return self

    def shapes(self) -> dict[str, list[Shape]]:
        """arm → one shape per depth, in `depths` order (computed once per study object)."""
        if "_shapes" not in self.__dict__:
            self.__dict__["_shapes"] = {
                a: [fit_shape(self, a, d) for d in self.depths] for a in self.arms
            }
        return self.__dict__["_shapes"]

    def arm_overrides(self, arm: str) -> list[str]:
        out = get_arm(arm).overrides(self.experts, self.granularity)
        if arm in self.lr:
            out.append(f"train.lr={self.lr[arm]}")
        return out


def pick_heads(width: int, head_dim: int) -> tuple[int, int]:
    """(heads, head width) with heads · head width = width, the head width even and closest
    to `head_dim` (ties: the wider head). `width` must be even."""
    options = [(width // h, h) for h in range(1, width + 1) if width % h == 0]
    even = [(d, h) for d, h in options if d % 2 == 0]
    d, h = min(even, key=lambda o: (abs(o[0] - head_dim), -o[0]))
    return h, d


def nonembedding_params(model: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of the blocks and the final norm.

    Counted on the meta device with the model's own accounting, one block per distinct kind
    (MoE or dense FFN, with or without memory) times how many blocks are of that kind."""
    import torch

    from moesaic.model.params import inactive_params
    from moesaic.model.transformer import Block

    kinds: dict[tuple[bool, bool], list[int]] = {}
    for i in range(model.layers):
        moe = model.ffn.kind == "moe" and (i + 1) % model.ffn.every == 0
        kinds.setdefault((moe, i in model.memory.layers), []).append(i)
    total = active = model.dim  # the final norm
    with torch.device("meta"):
        for layers in kinds.values():
            block = Block(model, layers[0])
            n = sum(p.numel() for p in block.parameters())
            total += n * len(layers)
            active += (n - inactive_params(block)) * len(layers)
    return total, active


def _shape(study: DepthConfig, base: ModelConfig, depth: int, width: int) -> Shape | None:
    heads, head_dim = pick_heads(width, study.head_dim)
    ffn = dataclasses.replace(base.ffn, hidden=study.ffn_ratio * width)
    cfg = dataclasses.replace(base, layers=depth, dim=width, heads=heads, ffn=ffn)
    try:
        cfg.validate()
    except ConfigError:
        return None  # e.g. the FFN width is not divisible by the granularity
    total, active = nonembedding_params(cfg)
    held = active if study.count == "active" else total
    return Shape(
        depth, width, heads, head_dim, ffn.hidden, total, active, held, held / study.params - 1
    )


def fit_shape(study: DepthConfig, arm: str, depth: int) -> Shape:
    """The grid width whose count is closest to `study.params` at this depth (see the module
    doc); raises ConfigError when none is within the tolerance."""
    base = base_config(study, study.arm_overrides(arm)).model
    step = study.width_step
    probes = [s for s in (_shape(study, base, depth, k * step) for k in (1, 2, 3)) if s]
    if len(probes) < 3:
        probes += [s for s in (_shape(study, base, depth, k * step) for k in (4, 6, 8)) if s]
    smallest = probes[0] if probes else None
    if smallest is None or len(probes) < 3:
        raise ConfigError(
            f"no width that is a multiple of study.width_step={step} builds a {arm} model "
            f"with {depth} layers; change study.width_step, study.ffn_ratio or the granularity"
        )
    if smallest.held > study.params * (1 + study.tolerance):
        raise ConfigError(
            f"study.params={study.params} is below the smallest {arm} model with {depth} layers "
            f"(width {smallest.width}: {smallest.held:,} non-embedding parameters); raise "
            f"study.params or drop depth {depth}"
        )
    import numpy as np

    a, b, c = np.polyfit([s.width for s in probes], [s.held for s in probes], 2)
    ideal = max((-b + math.sqrt(b * b - 4 * a * (c - study.params))) / (2 * a), step)
    near = {max(step, (int(ideal // step) + k) * step) for k in (-1, 0, 1, 2)}
    found = [s for s in (_shape(study, base, depth, w) for w in sorted(near)) if s]
    best = min(found, key=lambda s: abs(s.deviation)) if found else None
    if best is None or abs(best.deviation) > study.tolerance:
        got = (
            f"width {best.width} gives {best.held:,} ({100 * best.deviation:+.1f} %)"
            if best
            else ""
        )
        raise ConfigError(
            f"study.params={study.params}: no {arm} shape with {depth} layers is within "
            f"study.tolerance={study.tolerance} ({got}); lower study.width_step, raise "
            "study.tolerance or pick another study.params"
        )
    return best


# ----------------------------------------------------------------------------- the summary


def _value(r: RunResult | None, key: str) -> float | None:
    return None if r is None else r.summary.get("eval", {}).get(key)


def _slope(depths: list[int], values: list[float | None]) -> float | None:
    """Least-squares slope of loss against log2(depth) over the depths with a value."""
    pts = [(math.log2(d), v) for d, v in zip(depths, values, strict=True) if v is not None]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def depth_curve(study: DepthConfig, by: dict, arm: str, variant: str, key: str) -> dict | None:
    """One loss against depth: Stats per depth, the per-seed slope against log2(depth), the
    best depth and every other depth against it (paired by seed, Holm across depths)."""
    seeds = study.seed_list()
    values = {d: [_value(by.get((arm, d, variant, s)), key) for s in seeds] for d in study.depths}
    if all(v is None for vals in values.values() for v in vals):
        return None
    points = [{"depth": d, "loss": Stat.of(values[d]).to_dict()} for d in study.depths]
    slopes = [_slope(study.depths, [values[d][i] for d in study.depths]) for i in range(len(seeds))]
    means = {d: Stat.of(values[d]).mean for d in study.depths}
    finite = {d: m for d, m in means.items() if math.isfinite(m)}
    best = min(finite, key=finite.get)
    tests = {str(d): paired(values[d], values[best]) for d in study.depths if d != best}
    out = {
        "points": points,
        "slope": Stat.of(slopes).to_dict(),
        "best_depth": best,
        "vs_best": {k: p.to_dict() for k, p in with_holm(tests).items()},
    }
    out["verdict"] = depth_verdict(out)
    return out


def depth_verdict(cell: dict[str, Any]) -> dict[str, Any]:
    """`trend`: deeper | shallower | none, from the 95 % interval of the per-seed slope of loss
    against log2(depth); `best_separated`: the best depth beats every other one (Holm p < 0.05
    over the depths)."""
    slope = cell["slope"]
    low, high = slope.get("ci95") or (None, None)
    if high is not None and high < 0:
        trend, text = "deeper", "deeper is better"
    elif low is not None and low > 0:
        trend, text = "shallower", "shallower is better"
    else:
        trend, text = "none", "no monotone trend with depth detectable"
    holm = [t.get("p_holm") for t in cell["vs_best"].values()]
    separated = bool(holm) and all(p is not None and p < 0.05 for p in holm)
    best = cell["best_depth"]
    text += f"; lowest mean loss at {best} layers" + (
        ", better than every other depth (Holm p < 0.05)"
        if separated
        else ", not distinguishable from every other depth"
    )
    return {"trend": trend, "best_separated": separated, "text": text}


def _shape_record(shape: Shape, run: RunResult | None) -> dict[str, Any]:
    summary = run.summary if run else {}
    return {
        **dataclasses.asdict(shape),
        "params_total": summary.get("params_total"),
        "params_active": summary.get("params_active"),
        "flops_per_token": summary.get("flops_per_token"),
    }


def summarize_depth(
    study: DepthConfig, study_dir: Path, results: list[RunResult], log: Callable
) -> dict[str, Any]:
    by = {
        (r.spec.tag("arm"), r.spec.tag("depth"), r.spec.tag("variant"), r.spec.tag("seed")): r
        for r in results
    }
    found = study.shapes()
    first = study.first_seed
    shape_out = {
        arm: [_shape_record(s, by.get((arm, s.depth, "text", first))) for s in found[arm]]
        for arm in study.arms
    }
    curves: dict[str, Any] = {}
    for arm in study.arms:
        curves[arm] = {}
        for variant in VARIANTS:
            cells = {k: depth_curve(study, by, arm, variant, k) for k in METRICS[variant]}
            curves[arm][variant] = {k: c for k, c in cells.items() if c is not None}
    labels = {m.key: m.label for m in LOSS_METRICS}
    return {
        "target": {"params": study.params, "count": study.count, "tolerance": study.tolerance},
        "depths": list(study.depths),
        "arms": list(study.arms),
        "labels": {k: labels.get(k, k) for v in METRICS.values() for k in v},
        "primary": dict(PRIMARY),
        "shapes": shape_out,
        "curves": curves,
    }


# ----------------------------------------------------------------------------- the experiment


class DepthWidth:
    name = "depth-width"
    config_class = DepthConfig
    presets = PRESETS

    def plan(self, study: DepthConfig, study_dir: Path, log: Callable) -> list[RunSpec]:
        """Every run, seed-major (a complete first seed comes first)."""
        found = study.shapes()
        specs = []
        for seed in study.seed_list():
            for arm in study.arms:
                for shape in found[arm]:
                    for variant in VARIANTS:
                        over = [
                            *study.arm_overrides(arm),
                            *shape.overrides(),
                            *variant_overrides(study, variant, seed),
                        ]
                        tags = (
                            ("arm", arm),
                            ("variant", variant),
                            ("seed", seed),
                            ("depth", shape.depth),
                            ("width", shape.width),
                        )
                        name = run_name(arm, variant, f"L{shape.depth}", f"s{seed}")
                        specs.append(RunSpec(name, tuple(over), tags))
        return specs

    def after_run(self, study: DepthConfig, spec: RunSpec, run_dir: Path) -> dict[str, Any]:
        return {}

    def summarize(
        self, study: DepthConfig, study_dir: Path, results: list[RunResult], log: Callable
    ) -> dict[str, Any]:
        return summarize_depth(study, study_dir, results, log)

    def report(self, summary: dict[str, Any], study_dir: Path) -> Any:
        from moesaic.report.depth import depth_report

        return depth_report(summary)

    def console(self, summary: dict[str, Any]) -> str:
        from moesaic.report.depth import depth_console

        return depth_console(summary)


EXPERIMENT = DepthWidth()
