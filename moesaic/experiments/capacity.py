"""The capacity experiment: the modality tax of every arm at several model sizes, fixed data.

If the tax comes from dense layers forcing both modalities through too little capacity, it
should shrink as the model grows at fixed data, and per-token sparse capacity (modality FFNs,
MoE) should pay less of it where capacity binds — at the small sizes. Each size `d` in
`study.widths` sets `model.dim = d`, `model.ffn.hidden = ffn_ratio·d` and `model.heads =
d / head_dim`; at every size the full step-matched tax grid of `compete.py` (arms × text /
image / joint × seeds) trains on the same data. The summary reports, per size, everything the
tax study reports, and across sizes the tax against the tokens each modality saw per active
parameter (and, with the world's knowledge base on, its bits per active parameter: about 2 bits
per parameter is what language models can store, Allen-Zhu & Li 2024).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from moesaic.analysis.tax import HEADLINE_KEYS
from moesaic.errors import ConfigError
from moesaic.experiments.compete import Compete, CompeteConfig
from moesaic.experiments.engine import RunResult, RunSpec, run_name

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds: exercises the machinery (used by the tests); numbers are noise.
    "smoke": {
        "name": "capacity-smoke",
        "base": "tiny",
        "overrides": [
            "model.layers=2",
            "model.ffn.hidden=64",
            "data.seq_len=64",
            "data.batch_size=4",
            "data.vocab_size=512",
            "train.warmup=2",
            "train.threads=1",
            "train.checkpoint_every=0",
            "eval.every=0",
            "eval.batches=2",
            "logging.progress=none",
        ],
        "arms": ["dense", "moe"],
        "widths": [16, 32, 48],
        "head_dim": 16,
        "steps": 4,
        "experts": 8,
        "granularity": 2,
        "analyze": False,
        "description": "end-to-end check of the capacity machinery; losses are not meaningful",
    },
}


@dataclasses.dataclass
class CapacityConfig(CompeteConfig):
    name: str = "capacity"
    has_video_conditions: ClassVar[bool] = False
    widths: list[int] = dataclasses.field(default_factory=lambda: [32, 64, 128])
    ffn_ratio: int = 4  # model.ffn.hidden = ffn_ratio · width
    head_dim: int = 16  # model.heads = width / head_dim
    analyze: bool = False  # specialisation per size is optional (it costs an eval pass per run)

    def validate(self) -> CapacityConfig:
        super().validate()
        if not self.widths:
            raise ConfigError("study.widths is empty; give at least one model width, e.g. [32, 64]")
        if len(set(self.widths)) != len(self.widths):
            raise ConfigError(f"study.widths={self.widths} repeats a width")
        for w in self.widths:
            if w < 1 or w % self.head_dim:
                raise ConfigError(
                    f"study.widths has {w}; every width must be a positive multiple of "
                    f"study.head_dim={self.head_dim}"
                )
        if self.ffn_ratio < 1:
            raise ConfigError(f"study.ffn_ratio={self.ffn_ratio} must be >= 1")
        return self

    def size_overrides(self, width: int) -> list[str]:
        return [
            f"model.dim={width}",
            f"model.heads={width // self.head_dim}",
            f"model.ffn.hidden={self.ffn_ratio * width}",
        ]


def _per_width(study: CapacityConfig, width: int) -> CapacityConfig:
    """The study at one size, as a tax study (its runs' overrides carry the size)."""
    return dataclasses.replace(study, overrides=[*study.overrides, *study.size_overrides(width)])


def _tokens_per_param(result: RunResult, kinds: set[str]) -> float | None:
    active = result.summary.get("params_active")
    produced = result.summary.get("data_produced", {})
    if not active:
        return None
    return sum(v for k, v in produced.items() if k in kinds) / active


class Capacity(Compete):
    name = "capacity"
    config_class = CapacityConfig
    presets = PRESETS

    def plan(self, study: CapacityConfig, study_dir: Path, log: Callable) -> list[RunSpec]:
        specs = []
        for width in study.widths:
            for spec in super().plan(_per_width(study, width), study_dir, log):
                arm, variant, seed = (spec.tag(k) for k in ("arm", "variant", "seed"))
                name = run_name(arm, variant, f"d{width}", f"s{seed}")
                tags = (*spec.tags, ("width", width))
                specs.append(RunSpec(name, (*study.size_overrides(width), *spec.overrides), tags))
        return specs

    def summarize(
        self, study: CapacityConfig, study_dir: Path, results: list[RunResult], log: Callable
    ) -> dict[str, Any]:
        from moesaic.experiments.tax_summary import summarize

        sizes: dict[str, Any] = {}
        for width in study.widths:
            mine = [r for r in results if r.spec.tag("width") == width]
            body = summarize(_per_width(study, width), study_dir, mine, log)
            kinds = {"text": {"text"}, "image": set(study.image_mix)}
            for arm in study.arms:
                first = next(
                    r for r in mine if r.spec.tags[:2] == (("arm", arm), ("variant", "joint"))
                )
                body["arms"][arm]["tokens_per_active_param"] = {
                    m: _tokens_per_param(first, k) for m, k in kinds.items()
                }
            sizes[str(width)] = body
        return {"widths": list(study.widths), "sizes": sizes, "curves": _curves(study, sizes)}

    def report(self, summary: dict[str, Any], study_dir: Path) -> Any:
        from moesaic.report.capacity import capacity_report

        return capacity_report(summary)

    def console(self, summary: dict[str, Any]) -> str:
        lines = []
        for key, per_arm in summary["curves"].items():
            lines.append(f"{key} tax by width (mean [95 % interval], %):")
            for arm, points in per_arm.items():
                cells = []
                for p in points:
                    t = p["tax"] or {}
                    low, high = t.get("ci95") or (None, None)
                    mean = t.get("mean")
                    text = "—" if mean is None else f"{mean:+.2f}"
                    if low is not None and high is not None:
                        text += f" [{low:+.2f}, {high:+.2f}]"
                    cells.append(f"d{p['width']}: {text}")
                lines.append(f"  {arm:<20} " + "; ".join(cells))
        return "\n".join(lines)


def _knowledge_bits(study: CapacityConfig) -> float:
    """Information content of the world's knowledge base the runs train on (0 without one)."""
    from moesaic.data.world.knowledge import bits_per_entity
    from moesaic.experiments.engine import base_config

    kb = base_config(study).data.knowledge
    return kb.entities * bits_per_entity(kb.attributes) if kb.entities else 0.0


def _curves(study: CapacityConfig, sizes: dict[str, Any]) -> dict[str, Any]:
    """headline metric → arm → one point per width: the tax Stat, active parameters, the tokens
    of the metric's modality per active parameter (from the joint run of seed 1) and, with a
    knowledge base, its bits per active parameter."""
    bits = _knowledge_bits(study)
    out: dict[str, Any] = {}
    for key in HEADLINE_KEYS:
        modality = "text" if key.endswith("/text") else "image"
        per_arm: dict[str, list] = {}
        for arm in study.arms:
            points = []
            for width in study.widths:
                a = sizes[str(width)]["arms"][arm]
                cell = a["metrics"].get(key) or {}
                tpp = a.get("tokens_per_active_param", {}).get(modality)
                active = a.get("params_active")
                points.append(
                    {
                        "width": width,
                        "params_active": active,
                        "params_total": a.get("params_total"),
                        "tokens_per_active_param": tpp,
                        "knowledge_bits_per_active_param": bits / active
                        if bits and active
                        else None,
                        "tax": cell.get("tax"),
                        "delta": cell.get("delta"),
                    }
                )
            per_arm[arm] = points
        if any(p["tax"] for pts in per_arm.values() for p in pts):
            out[key] = per_arm
    return out


EXPERIMENT = Capacity()
