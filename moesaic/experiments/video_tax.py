"""The video conditions of the modality-tax study (`study.video`): text + video and image + video.

Per arm and seed the study then also trains a video-only run and two step-matched joint runs,
text + video (`data.parts = [text, video]`) and image + video (`[image mix, video]`), whose
batches stack the unimodal runs' own batches (`compete.py`). Each modality's tax in a condition
is taken against its own unimodal run, per seed, with the same statistics as the text + image
joint run (`tax_summary.metric_cell`):

    text + video    text metrics against the text-only run, video metrics against video-only
    image + video   image metrics against the image-only run, video metrics against video-only

The paper this study follows (Tong et al. 2026) reports that text + video pretraining, with no
captions, pays no text tax: its text perplexity beats text-only training.

The section this adds to summary.json (key `video`, present only with `study.video`):

    mix         study.video_mix
    metrics     {key: {label, modality: text|image|video (the reference run), higher_is_better,
                       headline}}
    conditions  {text_video | image_video: {label, parts [modality, modality], metrics [key]}}
    arms        {arm: {runs {variant: [dir per seed]}, train_flops {variant: first seed},
                       conditions {condition: {key: cell as in arms.metrics of the tax study}}}}
    comparisons {condition: {arm: {key: Paired}}}  tax(arm) − tax(first arm), pp; Holm over the
                headline metrics of each arm and condition
    fairness    {equal_steps, equal_tokens, runs {arm: {seed: {steps {variant},
                 tokens_per_step {modality: {variant}}}}}}
    note        what the paper reports;  tax_table  the plain-text table the command prints
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moesaic.analysis.stats import Paired, paired, with_holm
from moesaic.analysis.tax import LOSS_METRICS, MetricSpec, tax_verdict
from moesaic.experiments.engine import RunResult
from moesaic.experiments.tax_summary import _cell, _num, metric_cell

VIDEO_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("video/video", "video flow MSE (bare clips)", "video", headline=True),
    MetricSpec("action_video/video", "video flow MSE (clips with actions)", "video", headline=True),
)
# condition (its run's variant) -> (label, the two modalities whose batches it stacks)
CONDITIONS: dict[str, tuple[str, tuple[str, str]]] = {
    "text_video": ("text + video", ("text", "video")),
    "image_video": ("image + video", ("image", "video")),
}
PAPER_NOTE = (
    "Tong et al. 2026 (arXiv 2603.03276) report that text + video pretraining (no captions) pays "
    "no text tax: its text perplexity is better than text-only training's."
)


def condition_metrics(condition: str) -> tuple[MetricSpec, ...]:
    """The metrics taxed in one condition: each of its two modalities' headline losses."""
    mods = CONDITIONS[condition][1]
    own = tuple(m for m in LOSS_METRICS if m.modality in mods and m.headline)
    return own + (VIDEO_METRICS if "video" in mods else ())


def _tokens_per_step(result: RunResult, kinds: set[str]) -> float:
    produced = result.summary.get("data_produced", {})
    return sum(v for k, v in produced.items() if k in kinds) / max(result.summary["step"], 1)


def video_fairness(study, by: Mapping) -> dict[str, Any]:
    """Steps of every run, and per-modality document tokens of each video condition against its
    unimodal runs, all read from the runs' own summaries (`step`, `data_produced`)."""
    kinds = {"text": {"text"}, "image": set(study.image_mix), "video": set(study.video_mix)}
    runs: dict[str, Any] = {}
    equal_steps = equal_tokens = True
    variants = ("text", "image", "video", *CONDITIONS)
    for arm in study.arms:
        runs[arm] = {}
        for seed in study.seed_list():
            got = {v: by.get((arm, v, seed)) for v in variants}
            if any(r is None for r in got.values()):
                continue
            steps = {v: r.summary["step"] for v, r in got.items()}
            equal_steps &= len(set(steps.values())) == 1
            per_step: dict[str, dict[str, float]] = {m: {} for m in kinds}
            for cond, (_, mods) in CONDITIONS.items():
                for m in mods:
                    per_step[m][m] = _tokens_per_step(got[m], kinds[m])
                    per_step[m][cond] = _tokens_per_step(got[cond], kinds[m])
                    equal_tokens &= all(
                        got[cond].summary.get("data_produced", {}).get(k)
                        == got[m].summary.get("data_produced", {}).get(k)
                        for k in kinds[m]
                    )
            runs[arm][str(seed)] = {"steps": steps, "tokens_per_step": per_step}
    return {"equal_steps": equal_steps, "equal_tokens": equal_tokens, "runs": runs}


def summarize_video(study, results: list[RunResult]) -> dict[str, Any]:
    """The `video` section of the tax study's summary (module doc)."""
    seeds = study.seed_list()
    by = {(r.spec.tag("arm"), r.spec.tag("variant"), r.spec.tag("seed")): r for r in results}
    arms: dict[str, Any] = {}
    taxes: dict[str, dict[str, dict[str, list]]] = {c: {} for c in CONDITIONS}
    for arm in study.arms:
        conditions: dict[str, Any] = {}
        for cond in CONDITIONS:
            conditions[cond] = {}
            taxes[cond][arm] = {}
            for m in condition_metrics(cond):
                found = metric_cell(m, by, arm, seeds, cond)
                if found is not None:
                    conditions[cond][m.key], taxes[cond][arm][m.key] = found
        variants = ("video", *CONDITIONS)
        first = {v: by.get((arm, v, seeds[0])) for v in variants}
        arms[arm] = {
            "runs": {
                v: [str(by[(arm, v, s)].run_dir) for s in seeds if (arm, v, s) in by]
                for v in variants
            },
            "train_flops": {
                v: (r.summary.get("train_flops") if r else None) for v, r in first.items()
            },
            "conditions": conditions,
        }
    base = study.arms[0]
    comparisons: dict[str, Any] = {}
    for cond in CONDITIONS:
        comparisons[cond] = {}
        for arm in study.arms[1:]:
            heads = {m.key for m in condition_metrics(cond) if m.headline}
            tests: dict[str, Paired] = {
                key: paired(vals, taxes[cond][base][key])
                for key, vals in taxes[cond][arm].items()
                if key in taxes[cond][base] and key in heads
            }
            comparisons[cond][arm] = {k: p.to_dict() for k, p in with_holm(tests).items()}
    metrics = {m.key: m for c in CONDITIONS for m in condition_metrics(c)}
    body = {
        "mix": dict(study.video_mix),
        "metrics": {k: m.to_dict() for k, m in metrics.items()},
        "conditions": {
            c: {
                "label": label,
                "parts": list(mods),
                "metrics": [m.key for m in condition_metrics(c)],
            }
            for c, (label, mods) in CONDITIONS.items()
        },
        "arms": arms,
        "comparisons": comparisons,
        "fairness": video_fairness(study, by),
        "note": PAPER_NOTE,
    }
    body["tax_table"] = format_video_table(body)
    return body


# ----------------------------------------------------------------------------- terminal


def format_video_table(video: Mapping[str, Any]) -> str:
    """One line per (arm, condition, metric): unimodal, joint, Δ and tax with 95 % intervals."""
    head = (
        f"{'arm':<20} {'condition':<14} {'metric':<36} {'unimodal':>8} {'joint':>8} "
        f"{'Δ joint − unimodal':>27} {'tax':>25}"
    )
    lines = [head, "-" * len(head)]
    for arm, a in video["arms"].items():
        for cond, cells in a["conditions"].items():
            label = video["conditions"][cond]["label"]
            for c in cells.values():
                uni, joint = (c[v]["mean"] if c[v] else None for v in ("unimodal", "joint"))
                lines.append(
                    f"{arm:<20} {label:<14} {c['label']:<36} {_num(uni):>8} {_num(joint):>8} "
                    f"{_cell(c['delta'], 4, signed=True):>27} {_cell(c['tax'], 2, '%', True):>25}"
                )
    lines.append(
        "unimodal: the run of the metric's own modality alone; joint: the condition's run "
        "(its batches stack both unimodal runs' batches); > 0 = competition"
    )
    return "\n".join(lines)


def video_console(video: Mapping[str, Any]) -> str:
    """What `moesaic compete` prints for the video conditions."""
    out = ["\nvideo conditions (text + video, image + video):", video["tax_table"]]
    arms = list(video["arms"])
    for cond, by_arm in video.get("comparisons", {}).items():
        if not any(by_arm.values()):
            continue
        label = video["conditions"][cond]["label"]
        out.append(f"{label}: tax(arm) − tax({arms[0]}), paired by seed (percentage points):")
        for arm, tests in by_arm.items():
            cells = []
            for key, t in tests.items():
                p = t.get("p_holm")
                cells.append(
                    f"{key}: {_cell(t, 2, '', True)} (p={'—' if p is None else f'{p:.3f}'})"
                )
            out.append(f"  {arm:<24} " + "; ".join(cells))
    text_tax = {
        arm: tax_verdict((a["conditions"]["text_video"].get("text/text") or {}).get("tax"))
        for arm, a in video["arms"].items()
    }
    out.append("text tax in text + video: " + ", ".join(f"{a} {w}" for a, w in text_tax.items()))
    out.append(f"paper: {video['note']}")
    fair = video["fairness"]
    out.append(
        f"video conditions: equal optimizer steps: {fair['equal_steps']}; equal per-modality "
        f"tokens: {fair['equal_tokens']}"
    )
    return "\n".join(out)
