"""summary.json of a competition study (schema `moesaic-compete/1`) and its report.

    {
      "schema": "moesaic-compete/1",
      "study": {StudyConfig fields},
      "seeds": [0, ...],
      "metrics": {key: {"label", "modality": "text"|"image"|null, "higher_is_better"}},
      "data": {
        "caption_loss": false,
        "steps": {"text": S_t, "image": S_i, "joint": {seed: steps}},
        "mix": {"text": {...}, "image": {...}, "joint": {seed: {...}}},
        "coverage": {seed: {"joint_tokens", "unimodal_tokens", "ratio": {kind: joint/unimodal}}},
        "caption_shift": {"unigram_js", "bigram_js", "register"}
      },
      "arms": {arm: {
        "description", "overrides": [...], "lr",
        "params_total", "params_active", "ffn_params_total", "ffn_params_active",
        "flops_per_token",
        "train_flops": {"text", "image", "joint", "study"}   (per seed; study = sum of the 3),
        "runs": {"text"|"image"|"joint": [run dir per seed]},
        "metrics": {key: {"label", "modality", "higher_is_better",
                          "unimodal": Stat|null, "joint": Stat, "tax": Stat|null}},
        "tax_minus_baseline": {key: Stat}   (tax − tax of the first arm, paired by seed, in
                                             percentage points; 0 for the first arm itself),
        "specialization": {overall metrics of the first seed's joint run} | null
      }},
      "least_tax": {metric key: arm},
      "tax_table": the plain-text table the command prints,
      "report": "report.html"
    }

Stat = {"mean", "std" (sample, over seeds; null for one seed), "n", "values": per seed}.
Numbers that are undefined are null. Losses are held-out eval losses (text CE in nats, image
flow MSE); tax is in percent, positive = competition.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moesaic.analysis.tax import (
    LOSS_METRICS,
    MetricSpec,
    format_tax_table,
    least_tax,
    tax_difference,
    tax_table,
)
from moesaic.experiments.arms import get_arm
from moesaic.experiments.compete import VARIANTS, joint_coverage, seeds_of
from moesaic.files import atomic_write_text
from moesaic.jsonsafe import json_safe

SCHEMA = "moesaic-compete/1"
LOWER_IS_BETTER_WORDS = ("loss", "mse", "error", "fid")


def task_spec(name: str) -> MetricSpec:
    """How a task score is read (names as `moesaic.evaluate.tasks.run_tasks` returns them).

    Scores are accuracies (higher is better) unless the name says loss / mse / error / fid.
    Text-to-image scores (`t2i/...`) are taxed against the image-only run, which also learns to
    generate from captions; captioning and VQA need both modalities and are joint-only.
    """
    low = name.lower()
    higher = not any(w in low for w in LOWER_IS_BETTER_WORDS)
    modality = "image" if low.startswith("t2i") else None
    return MetricSpec(f"tasks/{name}", f"task {name}", modality, higher)


def _results(specs, summaries, tasks) -> dict[str, dict[str, dict[str, list]]]:
    """arm → variant → metric key → per-seed values (None where missing)."""
    by: dict[tuple[str, str, int], dict[str, float]] = {}
    for s in specs:
        values = dict(summaries[s.name].get("eval", {}))
        values.update({f"tasks/{k}": v for k, v in tasks.get(s.name, {}).items()})
        by[(s.arm, s.variant, s.seed)] = values
    seeds = sorted({s.seed for s in specs})
    out: dict[str, dict[str, dict[str, list]]] = {}
    for arm in dict.fromkeys(s.arm for s in specs):
        out[arm] = {}
        for variant in VARIANTS:
            keys = set()
            for seed in seeds:
                keys |= set(by.get((arm, variant, seed), {}))
            out[arm][variant] = {
                k: [by.get((arm, variant, seed), {}).get(k) for seed in seeds] for k in keys
            }
    return out


def _caption_shift(study) -> dict[str, Any]:
    """Caption shift of the study's data, with the first seed's tokenizer."""
    from moesaic.data import measure_caption_shift
    from moesaic.experiments.compete import base_config, tokenizer_for, variant_overrides

    cfg = base_config(study, variant_overrides(study, "text", study.first_seed))
    shift = measure_caption_shift(cfg.data, tokenizer_for(cfg))
    return {**shift, "register": cfg.data.caption_register}


def build_summary(study, study_dir, specs, summaries, tasks, analyses, data_plan) -> dict:
    seeds = seeds_of(study)
    task_names = sorted({k for t in tasks.values() for k in t})
    metrics = [*LOSS_METRICS, *(task_spec(n) for n in task_names)]
    table = tax_table(_results(specs, summaries, tasks), metrics)
    first = {(s.arm, s.variant): summaries[s.name] for s in specs if s.seed == seeds[0]}
    arms: dict[str, Any] = {}
    for arm in study.arms:
        arm_specs = [s for s in specs if s.arm == arm]
        joint = first[(arm, "joint")]
        flops = {v: first[(arm, v)].get("train_flops") for v in VARIANTS}
        flops["study"] = sum(f for f in flops.values() if f)
        arms[arm] = {
            "description": get_arm(arm).description,
            "overrides": [o for o in arm_specs[0].overrides if o.startswith("model.")],
            "lr": study.lr.get(arm),
            "params_total": joint.get("params_total"),
            "params_active": joint.get("params_active"),
            **_ffn_params(study_dir / "runs" / f"{arm}-joint-s{seeds[0]}"),
            "flops_per_token": joint.get("flops_per_token"),
            "train_flops": flops,
            "runs": {
                v: [str(s.run_dir(study_dir)) for s in arm_specs if s.variant == v]
                for v in VARIANTS
            },
            "metrics": {k: c.to_dict() for k, c in table.get(arm, {}).items()},
            "tax_minus_baseline": {
                k: d.to_dict()
                for k in table.get(arm, {})
                if (d := tax_difference(table, arm, study.arms[0], k)) is not None
            },
            "specialization": (analyses.get(arm, {}).get("specialization") or {}).get("overall"),
        }
    joint_mix = {str(s): data_plan[str(s)]["joint"]["mix"] for s in seeds}
    joint_steps = {str(s): data_plan[str(s)]["joint"]["steps"] for s in seeds}
    return json_safe(
        {
            "schema": SCHEMA,
            "study": study.__dict__,
            "seeds": seeds,
            "metrics": {
                m.key: {
                    "label": m.label,
                    "modality": m.modality,
                    "higher_is_better": m.higher_is_better,
                }
                for m in metrics
            },
            "data": {
                "caption_loss": False,
                "steps": {
                    "text": study.text_steps,
                    "image": study.image_steps,
                    "joint": joint_steps,
                },
                "mix": {"text": {"text": 1.0}, "image": study.image_mix, "joint": joint_mix},
                "coverage": {
                    str(s): joint_coverage(study_dir, data_plan, s, study.arms[0]) for s in seeds
                },
                "caption_shift": _caption_shift(study),
            },
            "arms": arms,
            "least_tax": {m.key: least_tax(table, m.key) for m in metrics if m.modality},
            "tax_table": format_tax_table(table, metrics),
            "report": "report.html",
        }
    )


def _ffn_params(run_dir: Path) -> dict[str, int | None]:
    """FFN parameters (total / active per token) from the model built from the run's config."""
    from moesaic.config import load_config
    from moesaic.model import Transformer
    from moesaic.model.params import param_breakdown

    cfg = load_config(run_dir / "config.yaml")
    parts = param_breakdown(Transformer(cfg.model))
    return {"ffn_params_total": parts["ffn_total"], "ffn_params_active": parts["ffn_active"]}


def load_curves(summary: dict[str, Any]) -> dict[str, dict[str, list[dict]]]:
    """arm → variant → metrics.jsonl records of the first seed's runs."""
    from moesaic.train.metrics import read_metrics

    return {
        arm: {v: read_metrics(Path(a["runs"][v][0]) / "metrics.jsonl") for v in VARIANTS}
        for arm, a in summary["arms"].items()
    }


def write_outputs(summary: dict[str, Any], study_dir: Path, analyses: dict) -> dict[str, Any]:
    from moesaic.report.study import study_report

    atomic_write_text(study_dir / "summary.json", json.dumps(summary, indent=1, allow_nan=False))
    study_report(summary, load_curves(summary), analyses).write(study_dir / "report.html")
    return summary
