"""The summary of a caption-shift study: text taxes per condition, register and arm; the caption
shift per register; the regression of tax on shift; paired comparisons; verdicts per claim.

Sections this adds to summary.json (schema `moesaic-study/1`, experiment "caption-shift"):

    metrics     {key: {label, ...}}           text/text and ood_text/text (held-out text CE)
    conditions  {key: {label, description, per_register}};  registers [..]
    arms        {arm: {description, params_total, params_active, flops_per_token,
                       train_flops (all runs of the arm), runs {run name: dir}}}
    taxes       {arm: {condition: {register | "-": {metric: {reference, value, tax, delta:
                 Stat, eval_se_tax}}}}}  tax = (L(cond) − L(T)) / L(T) × 100 per seed
    pooled      {arm: {condition: {metric: Stat}}}   per seed, the mean tax over registers
    shift       {register: {unigram_js, bigram_js: Stat, embedding {arm: Stat}}}
    regression  {arm: {condition: {metric: {shift key: Fit}}}}   tax (%) on shift
    comparisons {words_vs_pixels {arm: {metric: {per_register {r: Paired}, pooled: Paired}}},
                 arm_vs_base {arm: {condition: {metric: {per_register, pooled}}}},
                 captions_vs_vision {arm: {condition: {metric: Paired}}},
                 words_vs_pixels_per_share {arm: {metric: Paired}}}  tax / caption share
    dose        {condition: {register | "-": {text_targets, other_targets, caption_share}}}
    fairness    {equal_steps, equal_text_tokens, runs {arm: {seed: {run: {step, text_tokens}}}}}
    noise       {metric: {eval_se_tax, seed_sd_tax, ratio}}
    verdicts    [{claim, metric, arm, verdict, detail}];  table "..."

Fit = {slope, slope_se, slope_ci95, intercept, intercept_se, intercept_ci95, r, p, n, df,
per_seed_slope: Stat, points [[x, y, seed, register]], band {x, fit, low, high}} or
{n, reason} when it cannot be fitted. The slope's interval is slope ± t(0.975, n−2)·se from
`scipy.stats.linregress`; the band is the 95 % confidence band of the fitted mean. Because the
registers of one seed share one T run, their taxes are not independent; `per_seed_slope` (one
slope per seed across registers, t-interval over seeds) does not assume they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from scipy import stats as sps

from moesaic.analysis.stats import Paired, Stat, format_interval, paired, with_holm
from moesaic.analysis.tax import MetricSpec, tax_cell
from moesaic.evaluate.losses import eval_noise
from moesaic.experiments.arms import get_arm
from moesaic.experiments.caption_study import (
    CONDITIONS,
    REFERENCE,
    CaptionShiftConfig,
    condition_overrides,
    seed_shift,
)
from moesaic.experiments.engine import RunResult, base_config, tokenizer_for

METRICS = (
    MetricSpec("text/text", "text CE (in-distribution)", "text", headline=True),
    MetricSpec("ood_text/text", "text CE (out-of-distribution)", "text", headline=True),
)
PRIMARY_METRIC = "text/text"
SHIFT_KEYS = {
    "unigram_js": "unigram JS (bits)",
    "bigram_js": "bigram JS (bits)",
    "embedding": "embedding distance (1 − cos, T model)",
}
PRIMARY_SHIFT = "unigram_js"
NO_REGISTER = "-"
DOSE_BATCHES = 16  # batches of each part's stream replayed to count text targets per step
BAND_POINTS = 25


def _cells(study: CaptionShiftConfig) -> list[tuple[str, str]]:
    """(condition, register or "-") of every non-reference condition."""
    out = []
    for cond in study.conditions:
        regs = study.registers if CONDITIONS[cond].per_register else [NO_REGISTER]
        out += [(cond, r) for r in regs]
    return out


def _reg(register: str) -> str | None:
    return None if register == NO_REGISTER else register


# ----------------------------------------------------------------------------- regression


def fit_line(points: list[tuple[float, float, int, str]]) -> dict[str, Any]:
    """Least-squares tax-on-shift line over (x, y, seed, register) points (module doc: Fit)."""
    pts = [p for p in points if p[0] is not None and p[1] is not None]
    pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    n = len(pts)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if n < 3 or len(set(xs)) < 2:
        return {"n": n, "reason": "needs at least 3 points at 2 or more shifts"}
    lr = sps.linregress(xs, ys)
    df = n - 2
    t = float(sps.t.ppf(0.975, df))
    x_mean = sum(xs) / n
    sxx = sum((x - x_mean) ** 2 for x in xs)
    sse = sum((y - (lr.intercept + lr.slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    s = math.sqrt(sse / df)
    grid = [min(xs) + (max(xs) - min(xs)) * i / (BAND_POINTS - 1) for i in range(BAND_POINTS)]
    fit = [lr.intercept + lr.slope * x for x in grid]
    half = [t * s * math.sqrt(1 / n + (x - x_mean) ** 2 / sxx) for x in grid]
    per_seed = []
    for seed in dict.fromkeys(p[2] for p in pts):
        mine = [(p[0], p[1]) for p in pts if p[2] == seed]
        if len({x for x, _ in mine}) >= 2:
            per_seed.append(float(sps.linregress(*zip(*mine, strict=True)).slope))
    return {
        "slope": float(lr.slope),
        "slope_se": float(lr.stderr),
        "slope_ci95": [float(lr.slope - t * lr.stderr), float(lr.slope + t * lr.stderr)],
        "intercept": float(lr.intercept),
        "intercept_se": float(lr.intercept_stderr),
        "intercept_ci95": [
            float(lr.intercept - t * lr.intercept_stderr),
            float(lr.intercept + t * lr.intercept_stderr),
        ],
        "r": float(lr.rvalue),
        "p": float(lr.pvalue),
        "n": n,
        "df": df,
        "per_seed_slope": Stat.of(per_seed).to_dict(),
        "points": [list(p) for p in pts],
        "band": {
            "x": grid,
            "fit": fit,
            "low": [f - h for f, h in zip(fit, half, strict=True)],
            "high": [f + h for f, h in zip(fit, half, strict=True)],
        },
    }


# ----------------------------------------------------------------------------- measurements


def _shift(study: CaptionShiftConfig, by: Mapping, log: Callable) -> tuple[dict, dict]:
    """(shift section, x values {arm: {shift key: {register: [per seed]}}})."""
    seeds = study.seed_list()
    js: dict[str, dict[str, list]] = {
        r: {"unigram_js": [], "bigram_js": []} for r in study.registers
    }
    for seed in seeds:
        log(f"caption shift of seed {seed}")
        for r, m in seed_shift(study, seed).items():
            for key in ("unigram_js", "bigram_js"):
                js[r][key].append(m[key])
    xs: dict[str, dict[str, dict[str, list]]] = {}
    section: dict[str, Any] = {}
    for r in study.registers:
        section[r] = {k: Stat.of(v).to_dict() for k, v in js[r].items()}
        section[r]["embedding"] = {}
    for arm in study.arms:
        xs[arm] = {k: {r: js[r][k] for r in study.registers} for k in ("unigram_js", "bigram_js")}
        xs[arm]["embedding"] = {}
        for r in study.registers:
            dist = []
            for seed in seeds:
                ref = by.get((arm, REFERENCE, None, seed))
                dist.append(None if ref is None else ref.extra.get("distance", {}).get(r))
            xs[arm]["embedding"][r] = dist
            section[r]["embedding"][arm] = Stat.of(dist).to_dict()
    return section, xs


def _dose(study: CaptionShiftConfig) -> dict[str, Any]:
    """Text targets per step of each part (first seed, `DOSE_BATCHES` batches replayed)."""
    from moesaic.data import build_stream

    seed = study.first_seed
    out: dict[str, Any] = {}
    for cond, register in _cells(study):
        cfg = base_config(study, condition_overrides(study, cond, _reg(register), seed))
        stream = build_stream(cfg.data, tokenizer_for(cfg))
        rows = cfg.data.batch_size
        text = other = 0
        for _ in range(DOSE_BATCHES):
            has_target = next(stream).targets >= 0
            text += int(has_target[:rows].sum())
            other += int(has_target[rows:].sum())
        share = other / (text + other) if text + other else None
        out.setdefault(cond, {})[register] = {
            "text_targets": text / DOSE_BATCHES,
            "other_targets": other / DOSE_BATCHES,
            "caption_share": share,
        }
    return out


def _fairness(study: CaptionShiftConfig, by: Mapping) -> dict[str, Any]:
    """Steps and general-text document tokens of every run, from its own summary.json."""
    equal_steps = equal_text = True
    runs: dict[str, Any] = {}
    for arm in study.arms:
        runs[arm] = {}
        for seed in study.seed_list():
            ref = by.get((arm, REFERENCE, None, seed))
            if ref is None:
                continue
            mine = {}
            for cond, register in [(REFERENCE, NO_REGISTER), *_cells(study)]:
                r = by.get((arm, cond, _reg(register), seed))
                if r is None:
                    continue
                step = r.summary.get("step")
                text = r.summary.get("data_produced", {}).get("text")
                mine[r.spec.name] = {"step": step, "text_tokens": text}
                equal_steps &= step == ref.summary.get("step") == study.steps
                equal_text &= text == ref.summary.get("data_produced", {}).get("text")
            runs[arm][str(seed)] = mine
    return {"equal_steps": equal_steps, "equal_text_tokens": equal_text, "runs": runs}


def _eval_se_delta(ref: RunResult | None, run: RunResult | None, key: str) -> float | None:
    """Standard error over eval batches of mean(L_b(cond) − L_b(T)): both runs are scored on
    the same batches, so this is the evaluation noise of one seed's Δ."""
    if ref is None or run is None:
        return None
    a = ref.summary.get("eval_batches", {}).get(key, [])
    b = run.summary.get("eval_batches", {}).get(key, [])
    if len(a) != len(b):
        return None
    diffs = [y - x for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    return eval_noise({key: diffs}).get(key)


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


# ----------------------------------------------------------------------------- summary


def summarize(study: CaptionShiftConfig, results: list[RunResult], log: Callable) -> dict[str, Any]:
    seeds = study.seed_list()
    by = {
        (r.spec.tag("arm"), r.spec.tag("condition"), r.spec.tag("register"), r.spec.tag("seed")): r
        for r in results
    }

    def values(arm: str, cond: str, register: str | None, key: str) -> list[float | None]:
        out = []
        for s in seeds:
            r = by.get((arm, cond, register, s))
            out.append(None if r is None else r.summary.get("eval", {}).get(key))
        return out

    taxes: dict[str, Any] = {}
    per_seed_tax: dict[tuple, list] = {}
    for arm in study.arms:
        taxes[arm] = {}
        for cond, register in _cells(study):
            entry = {}
            for m in METRICS:
                ref = values(arm, REFERENCE, None, m.key)
                cell = tax_cell(m, ref, values(arm, cond, _reg(register), m.key))
                per_seed_tax[(arm, cond, register, m.key)] = list(cell.tax.values)
                se = _mean(
                    [
                        _eval_se_delta(
                            by.get((arm, REFERENCE, None, s)),
                            by.get((arm, cond, _reg(register), s)),
                            m.key,
                        )
                        for s in seeds
                    ]
                )
                entry[m.key] = {
                    "reference": cell.unimodal.to_dict(),
                    "value": cell.joint.to_dict(),
                    "tax": cell.tax.to_dict(),
                    "delta": cell.delta.to_dict(),
                    "eval_se_tax": None if se is None else 100 * se / cell.unimodal.mean,
                }
            taxes[arm].setdefault(cond, {})[register] = entry

    def pooled_values(arm: str, cond: str, key: str) -> list[float]:
        regs = study.registers if CONDITIONS[cond].per_register else [NO_REGISTER]
        rows = [per_seed_tax[(arm, cond, r, key)] for r in regs]
        return [_nan_mean(col) for col in zip(*rows, strict=True)]

    pooled = {
        arm: {
            cond: {m.key: Stat.of(pooled_values(arm, cond, m.key)).to_dict() for m in METRICS}
            for cond in study.conditions
        }
        for arm in study.arms
    }

    shift, xs = _shift(study, by, log) if study.registers else ({}, {})
    regression: dict[str, Any] = {}
    for arm in study.arms:
        regression[arm] = {}
        for cond in study.conditions:
            if not CONDITIONS[cond].per_register:
                continue
            regression[arm][cond] = {}
            for m in METRICS:
                fits = {}
                for key in SHIFT_KEYS:
                    points = [
                        (xs[arm][key][r][i], per_seed_tax[(arm, cond, r, m.key)][i], s, r)
                        for r in study.registers
                        for i, s in enumerate(seeds)
                    ]
                    fits[key] = fit_line(points)
                regression[arm][cond][m.key] = fits

    dose = _dose(study)
    comparisons = _comparisons(study, per_seed_tax, pooled_values)
    comparisons["words_vs_pixels_per_share"] = _per_share(study, per_seed_tax, dose)
    arms = _arms(study, results, by)
    noise = {}
    for m in METRICS:
        cells = [taxes[a][c][r][m.key] for a in taxes for c in taxes[a] for r in taxes[a][c]]
        eval_se = _mean([c["eval_se_tax"] for c in cells])
        seed_sd = _mean([c["tax"]["std"] for c in cells])
        ratio = eval_se / seed_sd if eval_se is not None and seed_sd else None
        noise[m.key] = {"eval_se_tax": eval_se, "seed_sd_tax": seed_sd, "ratio": ratio}
    body: dict[str, Any] = {
        "metrics": {m.key: m.to_dict() for m in METRICS},
        "primary_metric": PRIMARY_METRIC,
        "shift_labels": dict(SHIFT_KEYS),
        "conditions": {
            k: {"label": c.label, "description": c.description, "per_register": c.per_register}
            for k, c in CONDITIONS.items()
            if k in study.conditions
        },
        "registers": list(study.registers),
        "caption_loss": study.caption_loss,
        "margin": study.margin,
        "arms": arms,
        "taxes": taxes,
        "pooled": pooled,
        "shift": shift,
        "regression": regression,
        "comparisons": comparisons,
        "dose": dose,
        "fairness": _fairness(study, by),
        "noise": noise,
    }
    from moesaic.experiments.caption_shift_verdicts import verdicts

    body["verdicts"] = verdicts(body, study)
    body["table"] = format_table(body)
    return body


def _nan_mean(values: tuple) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if len(v) == len(values) and v else float("nan")


def _comparisons(
    study: CaptionShiftConfig, per_seed_tax: Mapping, pooled_values: Callable
) -> dict[str, Any]:
    def family(a: str, b: str, cond_a: str, cond_b: str, key: str) -> dict[str, Any]:
        """Per register (Holm over registers) and pooled over registers, a − b per seed."""
        tests: dict[str, Paired] = {
            r: paired(per_seed_tax[(a, cond_a, r, key)], per_seed_tax[(b, cond_b, r, key)])
            for r in study.registers
        }
        pooled = paired(pooled_values(a, cond_a, key), pooled_values(b, cond_b, key))
        return {
            "per_register": {r: p.to_dict() for r, p in with_holm(tests).items()},
            "pooled": pooled.to_dict(),
        }

    out: dict[str, Any] = {"words_vs_pixels": {}, "arm_vs_base": {}, "captions_vs_vision": {}}
    conds = set(study.conditions)
    for arm in study.arms:
        if {"caption", "image_caption"} <= conds and study.registers:
            out["words_vs_pixels"][arm] = {
                m.key: family(arm, arm, "caption", "image_caption", m.key) for m in METRICS
            }
        if "image" in conds:
            out["captions_vs_vision"][arm] = {
                cond: {
                    m.key: paired(
                        pooled_values(arm, cond, m.key), pooled_values(arm, "image", m.key)
                    ).to_dict()
                    for m in METRICS
                }
                for cond in study.conditions
                if CONDITIONS[cond].per_register and study.registers
            }
    base = study.arms[0]
    for arm in study.arms[1:]:
        out["arm_vs_base"][arm] = {}
        for cond in study.conditions:
            out["arm_vs_base"][arm][cond] = {}
            for m in METRICS:
                if CONDITIONS[cond].per_register and study.registers:
                    entry = family(arm, base, cond, cond, m.key)
                else:
                    entry = {
                        "pooled": paired(
                            pooled_values(arm, cond, m.key), pooled_values(base, cond, m.key)
                        ).to_dict()
                    }
                out["arm_vs_base"][arm][cond][m.key] = entry
    return out


def _per_share(study: CaptionShiftConfig, per_seed_tax: Mapping, dose: Mapping) -> dict:
    """Descriptive: tax / caption share of the text targets, T+C_r − T+IC_r per seed (mean
    over registers). T+C_r packs more captions per step than T+IC_r; if the tax grew in
    proportion to that share, this compares the two at an equal share."""
    if not ({"caption", "image_caption"} <= set(study.conditions) and study.registers):
        return {}

    def scaled(arm: str, cond: str, key: str) -> list[float]:
        rows = []
        for r in study.registers:
            share = dose[cond][r]["caption_share"] or float("nan")
            rows.append([t / share for t in per_seed_tax[(arm, cond, r, key)]])
        return [_nan_mean(col) for col in zip(*rows, strict=True)]

    return {
        arm: {
            m.key: paired(
                scaled(arm, "caption", m.key), scaled(arm, "image_caption", m.key)
            ).to_dict()
            for m in METRICS
        }
        for arm in study.arms
    }


def _arms(study: CaptionShiftConfig, results: list[RunResult], by: Mapping) -> dict[str, Any]:
    out = {}
    for arm in study.arms:
        mine = [r for r in results if r.spec.tag("arm") == arm]
        ref = by.get((arm, REFERENCE, None, study.first_seed)) or mine[0]
        out[arm] = {
            "description": get_arm(arm).description,
            "overrides": [o for o in ref.spec.overrides if o.startswith("model.")],
            "lr": study.lr.get(arm),
            "params_total": ref.summary.get("params_total"),
            "params_active": ref.summary.get("params_active"),
            "flops_per_token": ref.summary.get("flops_per_token"),
            "train_flops": sum(r.summary.get("train_flops") or 0 for r in mine),
            "runs": {r.spec.name: str(r.run_dir) for r in mine},
        }
    return out


# ----------------------------------------------------------------------------- terminal


def _stat(s: Mapping[str, Any] | None, digits: int = 2, unit: str = "", signed=True) -> str:
    if not s:
        return "—"
    low, high = s.get("ci95") or (None, None)
    return format_interval(s.get("mean"), low, high, digits, unit, signed)


def condition_title(summary: Mapping[str, Any], cond: str, register: str) -> str:
    label = summary["conditions"][cond]["label"]
    return label if register == NO_REGISTER else f"{label}_{register}"


def format_table(summary: Mapping[str, Any]) -> str:
    """One line per (arm, condition, register): the text taxes with 95 % intervals."""
    head = f"{'arm':<10} {'condition':<18} " + " ".join(
        f"{summary['metrics'][k]['label'] + ' tax':>36}" for k in summary["metrics"]
    )
    lines = [head, "-" * len(head)]
    for arm, conds in summary["taxes"].items():
        for cond, regs in conds.items():
            for register, cell in regs.items():
                row = f"{arm:<10} {condition_title(summary, cond, register):<18} "
                row += " ".join(f"{_stat(cell[k]['tax'], 2, '%'):>36}" for k in summary["metrics"])
                lines.append(row)
    return "\n".join(lines)


def console_text(summary: Mapping[str, Any]) -> str:
    out = [summary["table"], ""]
    if summary["shift"]:
        out.append("caption shift per register (mean [95 % interval] over seeds):")
        for r, s in summary["shift"].items():
            emb = "; ".join(f"{a} {_stat(v, 4, '', False)}" for a, v in s["embedding"].items())
            out.append(
                f"  {r:<8} unigram JS {_stat(s['unigram_js'], 4, '', False)}, bigram JS "
                f"{_stat(s['bigram_js'], 4, '', False)}; embedding distance: {emb}"
            )
        out.append(f"text tax on caption shift ({SHIFT_KEYS[PRIMARY_SHIFT]}, % per bit):")
        for arm, conds in summary["regression"].items():
            for cond, per_metric in conds.items():
                fit = per_metric[PRIMARY_METRIC][PRIMARY_SHIFT]
                title = summary["conditions"][cond]["label"]
                if "slope" not in fit:
                    out.append(f"  {arm:<10} {title:<6} {fit['reason']}")
                    continue
                low, high = fit["slope_ci95"]
                out.append(
                    f"  {arm:<10} {title:<6} slope {fit['slope']:+.2f} [{low:+.2f}, {high:+.2f}] "
                    f"(n={fit['n']}); per-seed slopes {_stat(fit['per_seed_slope'])}"
                )
    fair = summary["fairness"]
    out.append(
        f"equal optimizer steps: {fair['equal_steps']}; equal general-text tokens: "
        f"{fair['equal_text_tokens']}"
    )
    out.append(f"\nverdicts (in-distribution text; margin ±{summary['margin']:g} %):")
    for v in summary["verdicts"]:
        if v["metric"] == PRIMARY_METRIC:
            who = f" [{v['arm']}]" if v["arm"] else ""
            out.append(f"  {v['claim']}{who}: {v['verdict'].upper()} — {v['detail']}")
    return "\n".join(out)
