"""The summary of a modality-tax study: taxes with intervals, paired arm comparisons, fairness
checks from the runs' own logs, evaluation noise beside seed spread, and specialisation.

Sections this adds to summary.json (schema `moesaic-study/1`, experiment "tax"):

    metrics    {key: {label, modality: text|image|null, higher_is_better, headline}}
    match      "steps" | "tokens"
    arms       {arm: {description, overrides, lr, params_total, params_active,
                      ffn_params_total, ffn_params_active, flops_per_token,
                      train_flops {text, image, joint, study}, runs {variant: [dir per seed]},
                      metrics {key: {..metric, unimodal: Stat, joint: Stat, tax: Stat (%),
                                     delta: Stat (joint − unimodal, nats or MSE),
                                     eval_se {unimodal, joint, delta}, eval_se_tax}}}}
    comparisons {arm: {key: Paired}}   tax(arm) − tax(first arm) per seed, in percentage
                points; p_t, p_sign_flip (≥ 6 seeds), p_holm and p_sign_flip_holm (Holm over
                the headline metrics, of the t-tests and of the sign-flip tests)
    step_effect {arm: {key: Stat}}     match=tokens only: (L(half batch, 2× steps) − L(U))/L(U) %
    fairness   {match, equal_steps, equal_tokens, runs {arm: {seed: {steps {variant},
                tokens_per_step {modality: {variant}}}}}}
    noise      {key: {eval_se_tax, seed_sd_tax, ratio}}   over arms (mean)
    specialization {arm: {metric: Stat over seeds}}  MoE arms' joint runs; fraction_* beside
                null_fraction_* (modality-blind routing at the same token shares and load)
    data       {caption_loss: false, image_mix, caption_shift {unigram_js, bigram_js, register}}
    least_tax  {key: arm}
    tax_table  the plain-text table the command prints
    video      with study.video only: the video conditions (`video_tax.py`, added by
               `compete.py`)

Stat = {mean, std, se, ci95 [low, high], n, values}; Paired = Stat of the differences plus
{p_t, p_sign_flip, p_holm, p_sign_flip_holm}. Undefined numbers are null.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from moesaic.analysis.stats import Paired, Stat, format_interval, paired, with_holm
from moesaic.analysis.tax import (
    HEADLINE_KEYS,
    LOSS_METRICS,
    MetricSpec,
    modality_tax,
    tax_cell,
    time_bin_metrics,
)
from moesaic.evaluate.losses import TIME_BINS, eval_noise
from moesaic.experiments.arms import get_arm
from moesaic.experiments.engine import RunResult, base_config, tokenizer_for

LOWER_IS_BETTER_WORDS = ("loss", "mse", "error", "fid")
SPEC_KEYS = (
    "fraction_text",
    "fraction_shared",
    "fraction_image",
    "null_fraction_text",
    "null_fraction_shared",
    "null_fraction_image",
    "entropy_norm",
    "max_mean_load",
    "understanding_generation_r",
    "time_cv",
)


def task_spec(name: str) -> MetricSpec:
    """How a task score is read (names as `moesaic.evaluate.tasks.run_tasks` returns them).

    Scores are accuracies (higher is better) unless the name says loss / mse / error / fid.
    Text-to-image scores (`t2i/...`) are taxed against the image-only run, which also learns to
    generate from captions; captioning and VQA need both modalities and are joint-only.
    """
    low = name.lower()
    higher = not any(w in low for w in LOWER_IS_BETTER_WORDS)
    return MetricSpec(
        f"tasks/{name}", f"task {name}", "image" if low.startswith("t2i") else None, higher
    )


def _value(result: RunResult | None, key: str) -> float | None:
    if result is None:
        return None
    if key.startswith("tasks/"):
        return result.extra.get("tasks", {}).get(key[len("tasks/") :])
    return result.summary.get("eval", {}).get(key)


def _batches(result: RunResult | None, key: str) -> list[float | None]:
    return [] if result is None else result.summary.get("eval_batches", {}).get(key, [])


def _eval_se(result: RunResult | None, key: str) -> float | None:
    """Standard error of one run's eval mean over its eval batches."""
    return eval_noise({key: _batches(result, key)}).get(key)


def _eval_se_delta(uni: RunResult | None, joint: RunResult | None, key: str) -> float | None:
    """Standard error over eval batches of mean(J_b − U_b): the evaluation noise of Δ. Both runs
    are scored on the same batches, so this is paired, batch by batch."""
    u, j = _batches(uni, key), _batches(joint, key)
    if len(u) != len(j):
        return None
    diffs = [b - a for a, b in zip(u, j, strict=True) if a is not None and b is not None]
    return eval_noise({key: diffs}).get(key)


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def _ffn_params(run_dir: Path) -> dict[str, int]:
    """FFN parameters (total / active per token) of the model built from the run's config."""
    from moesaic.config import load_config
    from moesaic.model import Transformer
    from moesaic.model.params import param_breakdown

    cfg = load_config(run_dir / "config.yaml")
    parts = param_breakdown(Transformer(cfg.model))
    return {"ffn_params_total": parts["ffn_total"], "ffn_params_active": parts["ffn_active"]}


def _tokens_per_step(result: RunResult, kinds: set[str]) -> float:
    produced = result.summary.get("data_produced", {})
    return sum(v for k, v in produced.items() if k in kinds) / max(result.summary["step"], 1)


def _fairness(study, by: Mapping, arms: list[str]) -> dict[str, Any]:
    """Steps and per-modality document tokens per step of every run, from its own summary."""
    kinds = {"text": {"text"}, "image": set(study.image_mix)}
    runs: dict[str, Any] = {}
    equal_steps = equal_tokens = True
    for arm in arms:
        runs[arm] = {}
        for seed in study.seed_list():
            got = {v: by.get((arm, v, seed)) for v in ("text", "image", "joint")}
            if any(r is None for r in got.values()):
                continue
            steps = {v: r.summary["step"] for v, r in got.items()}
            per_step = {
                m: {v: _tokens_per_step(got[v], kinds[m]) for v in (m, "joint")} for m in kinds
            }
            equal_steps &= len(set(steps.values())) == 1
            equal_tokens &= all(
                got["joint"].summary.get("data_produced", {}).get(k)
                == got[m].summary.get("data_produced", {}).get(k)
                for m, ks in kinds.items()
                for k in ks
            )
            runs[arm][str(seed)] = {"steps": steps, "tokens_per_step": per_step}
    return {
        "match": study.match,
        "equal_steps": equal_steps,
        "equal_tokens": equal_tokens,
        "runs": runs,
    }


def _specialization(study, by: Mapping, log: Callable) -> tuple[dict, dict]:
    """(per MoE arm: overall metrics as Stat over seeds; per arm: the first seed's analysis)."""
    from moesaic.analysis.runs import analyze_run
    from moesaic.report.plots import save_analysis_figures

    stats: dict[str, Any] = {}
    first: dict[str, Any] = {}
    for arm in study.arms:
        per_seed = []
        for seed in study.seed_list():
            result = by.get((arm, "joint", seed))
            if result is None:
                continue
            path = result.run_dir / "analysis.json"
            analysis = json.loads(path.read_text()) if path.is_file() else {}
            if analysis.get("step") != result.summary.get("step") or (
                analysis.get("tokens") != study.analyze_tokens
            ):
                log(f"analysing {result.run_dir.name}")
                analysis = analyze_run(result.run_dir, tokens=study.analyze_tokens)
                save_analysis_figures(analysis, result.run_dir / "analysis", result.run_dir.name)
            per_seed.append(analysis)
            if seed == study.first_seed:
                first[arm] = analysis
        overall = [(a.get("specialization") or {}).get("overall") for a in per_seed]
        if any(overall):
            stats[arm] = {
                key: Stat.of([(o or {}).get(key) for o in overall]).to_dict() for key in SPEC_KEYS
            }
            stats[arm]["text_minus_null"] = Stat.of(
                [None if not o else o["fraction_text"] - o["null_fraction_text"] for o in overall]
            ).to_dict()
    return stats, first


def _caption_shift(study) -> dict[str, Any]:
    """Caption shift of the study's data, with the first seed's tokenizer."""
    from moesaic.data import measure_caption_shift

    cfg = base_config(study, [f"data.seed={study.first_seed}"])
    shift = measure_caption_shift(cfg.data, tokenizer_for(cfg))
    return {**shift, "register": cfg.data.caption_register}


def metric_cell(
    m: MetricSpec, by: Mapping, arm: str, seeds: list[int], joint_variant: str
) -> tuple[dict[str, Any], list[float]] | None:
    """One (arm, metric) of a joint run against its unimodal run (`m.modality` names that
    run's variant), per seed: the `TaxCell` dict plus evaluation noise, and the per-seed taxes.
    None when no seed of the joint run has the metric."""
    joint = [_value(by.get((arm, joint_variant, s)), m.key) for s in seeds]
    if all(v is None for v in joint):
        return None
    uni = [_value(by.get((arm, m.modality, s)), m.key) for s in seeds] if m.modality else []
    cell = tax_cell(m, uni, joint)
    entry = cell.to_dict()
    if m.modality and not m.key.startswith("tasks/"):
        runs = [(by.get((arm, m.modality, s)), by.get((arm, joint_variant, s))) for s in seeds]
        se_u = _mean([_eval_se(u, m.key) for u, _ in runs])
        se_j = _mean([_eval_se(j, m.key) for _, j in runs])
        se_d = _mean([_eval_se_delta(u, j, m.key) for u, j in runs])
        entry["eval_se"] = {"unimodal": se_u, "joint": se_j, "delta": se_d}
        if se_d is not None and cell.unimodal.mean:
            entry["eval_se_tax"] = 100 * se_d / cell.unimodal.mean
    return entry, list(cell.tax.values)


def summarize(study, study_dir: Path, results: list[RunResult], log: Callable) -> dict[str, Any]:
    seeds = study.seed_list()
    by = {(r.spec.tag("arm"), r.spec.tag("variant"), r.spec.tag("seed")): r for r in results}
    task_names = sorted({k for r in results for k in r.extra.get("tasks", {})})
    metrics = [*LOSS_METRICS, *time_bin_metrics(TIME_BINS), *(task_spec(n) for n in task_names)]

    def values(arm: str, variant: str, key: str) -> list[float | None]:
        return [_value(by.get((arm, variant, s)), key) for s in seeds]

    arms: dict[str, Any] = {}
    taxes: dict[str, dict[str, list]] = {}
    for arm in study.arms:
        first = {v: by.get((arm, v, seeds[0])) for v in ("text", "image", "joint")}
        cells: dict[str, Any] = {}
        taxes[arm] = {}
        for m in metrics:
            found = metric_cell(m, by, arm, seeds, "joint")
            if found is None:
                continue
            cells[m.key], taxes[arm][m.key] = found
        flops = {v: (r.summary.get("train_flops") if r else None) for v, r in first.items()}
        flops["study"] = sum(f for f in flops.values() if f)
        joint0 = first["joint"]
        arms[arm] = {
            "description": get_arm(arm).description,
            "overrides": [o for o in joint0.spec.overrides if o.startswith("model.")],
            "lr": study.lr.get(arm),
            "params_total": joint0.summary.get("params_total"),
            "params_active": joint0.summary.get("params_active"),
            **_ffn_params(joint0.run_dir),
            "flops_per_token": joint0.summary.get("flops_per_token"),
            "train_flops": flops,
            "runs": {
                v: [str(by[(arm, v, s)].run_dir) for s in seeds if (arm, v, s) in by]
                for v in dict.fromkeys(r.spec.tag("variant") for r in results)
            },
            "metrics": cells,
        }

    base = study.arms[0]
    comparisons: dict[str, Any] = {}
    for arm in study.arms[1:]:
        tests: dict[str, Paired] = {
            key: paired(taxes[arm][key], taxes[base][key])
            for key in taxes[arm]
            if key in taxes[base] and key in HEADLINE_KEYS
        }
        comparisons[arm] = {k: p.to_dict() for k, p in with_holm(tests).items()}

    step_effect: dict[str, Any] = {}
    if study.match == "tokens":
        for arm in study.arms:
            step_effect[arm] = {}
            for m in LOSS_METRICS:
                if m.modality is None:
                    continue
                half = values(arm, f"{m.modality}_half", m.key)
                full = values(arm, m.modality, m.key)
                effect = [
                    modality_tax(h, f) if h is not None and f is not None else None
                    for h, f in zip(half, full, strict=True)
                ]
                step_effect[arm][m.key] = Stat.of(effect).to_dict()

    noise: dict[str, Any] = {}
    for key in HEADLINE_KEYS:
        eval_se = _mean([a["metrics"].get(key, {}).get("eval_se_tax") for a in arms.values()])
        seed_sd = _mean(
            [(a["metrics"].get(key, {}).get("tax") or {}).get("std") for a in arms.values()]
        )
        if eval_se is not None or seed_sd is not None:
            ratio = eval_se / seed_sd if eval_se is not None and seed_sd else None
            noise[key] = {"eval_se_tax": eval_se, "seed_sd_tax": seed_sd, "ratio": ratio}

    specialization, analyses = _specialization(study, by, log) if study.analyze else ({}, {})
    least = {}
    for key in HEADLINE_KEYS:
        means = {
            a: (arms[a]["metrics"].get(key, {}).get("tax") or {}).get("mean") for a in study.arms
        }
        finite = {a: v for a, v in means.items() if v is not None}
        if finite:
            least[key] = min(finite, key=finite.get)
    body = {
        "metrics": {m.key: m.to_dict() for m in metrics},
        "match": study.match,
        "arms": arms,
        "comparisons": comparisons,
        "step_effect": step_effect,
        "fairness": _fairness(study, by, study.arms),
        "noise": noise,
        "specialization": specialization,
        "analysis_first_seed": {a: str(by[(a, "joint", seeds[0])].run_dir) for a in analyses},
        "data": {
            "caption_loss": False,
            "image_mix": dict(study.image_mix),
            "caption_shift": _caption_shift(study),
        },
        "least_tax": least,
    }
    body["tax_table"] = format_tax_table(body)
    return body


# ----------------------------------------------------------------------------- terminal


def _cell(stat: Mapping[str, Any] | None, digits: int, unit: str = "", signed=False) -> str:
    if not stat:
        return "—"
    low, high = stat.get("ci95") or (None, None)
    return format_interval(stat.get("mean"), low, high, digits, unit, signed)


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def format_tax_table(summary: Mapping[str, Any]) -> str:
    """One line per (arm, headline metric): unimodal, joint, Δ and tax with 95 % intervals."""
    n = len(summary.get("seeds", [])) or max(
        (c["joint"]["n"] for a in summary["arms"].values() for c in a["metrics"].values()),
        default=0,
    )
    head = (
        f"{'arm':<20} {'metric':<32} {'unimodal':>8} {'joint':>8} {'Δ joint − unimodal':>27} "
        f"{'tax':>25}"
    )
    lines = [head, "-" * len(head)]
    for arm, a in summary["arms"].items():
        for key in HEADLINE_KEYS:
            c = a["metrics"].get(key)
            if c is None:
                continue
            uni, joint = (c[v]["mean"] for v in ("unimodal", "joint"))
            lines.append(
                f"{arm:<20} {c['label']:<32} {_num(uni):>8} {_num(joint):>8} "
                f"{_cell(c['delta'], 4, signed=True):>27} {_cell(c['tax'], 2, '%', True):>25}"
            )
    lines.append(
        f"means over {n} seed(s) with 95 % t-intervals; tax = (joint − unimodal)/unimodal, "
        "> 0 = competition"
    )
    return "\n".join(lines)


def console_text(summary: Mapping[str, Any]) -> str:
    """What `moesaic compete` prints at the end of a tax study."""
    out = [summary["tax_table"]]
    arms = list(summary["arms"])
    if summary.get("comparisons"):
        out.append(f"\ntax(arm) − tax({arms[0]}), paired by seed (percentage points):")
        for arm, tests in summary["comparisons"].items():
            cells = []
            for key, t in tests.items():
                p = t.get("p_holm")
                ptxt = "p=—" if p is None else f"p={p:.3f}"
                cells.append(f"{key}: {_cell(t, 2, '', True)} ({ptxt})")
            out.append(f"  {arm:<24} " + "; ".join(cells))
        out.append("  p: t-test, Holm-corrected over the metrics of each arm")
    fair = summary.get("fairness", {})
    if fair:
        out.append(
            f"\nmatch: {fair['match']}; equal optimizer steps: {fair['equal_steps']}; "
            f"equal per-modality tokens: {fair['equal_tokens']}"
        )
    for key, v in summary.get("noise", {}).items():
        if v.get("ratio") is not None:
            out.append(
                f"noise {key}: eval ±{v['eval_se_tax']:.3f} pp vs seed sd {v['seed_sd_tax']:.3f}"
                f" pp (ratio {v['ratio']:.2f})"
            )
    shift = summary["data"]["caption_shift"]
    out.append(
        f"caption shift (JS, bits): unigram {shift['unigram_js']:.4f}, "
        f"bigram {shift['bigram_js']:.4f}"
    )
    return "\n".join(out)
