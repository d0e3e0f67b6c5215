"""Plain-language verdicts of a caption-shift study, one per claim (and arm), from its numbers.

Every verdict is `supported`, `not supported` or `inconclusive` (at this scale: the 95 %
interval cannot decide), read from intervals with a margin m = `study.margin` (% of text CE)
fixed before the runs. The claims, as published, and the rule each is judged by:

1. *T+I does not hurt text* (vision is complementary to language) — non-inferiority of the
   T+I tax: supported when its interval lies below +m, not supported when it lies above 0.
2. *Caption sets farther from general text give worse text* — the slope of the T+C_r tax on
   the unigram JS shift across registers and seeds: supported when both the pooled slope's
   interval and the interval of the per-seed slopes lie above 0, not supported when both lie
   below 0.
3. *T+C_r ≈ T+IC_r* (the words, not the pixels, do the harm) — the per-seed difference of the
   two taxes (mean over registers): supported when its interval lies inside ±m and the T+C_r
   tax is above 0 (there is harm to attribute), not supported when the interval excludes 0.
4. *MoE shrinks the caption-induced tax* — tax(arm, T+C_r) − tax(first arm, T+C_r) per seed
   (mean over registers): supported when its interval lies below 0 and the first arm's T+C_r
   tax is above 0, not supported when it lies above 0.

Claims 2 and 4 use T+C_r (captions alone) when the study has it, else T+IC_r.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moesaic.analysis.stats import format_interval
from moesaic.experiments.arms import get_arm

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
CLAIMS = {
    "vision": "T+I does not hurt text",
    "shift": "farther caption sets give worse text",
    "words": "T+C_r ≈ T+IC_r (the words, not the pixels, do the harm)",
    "moe": "MoE shrinks the caption-induced tax",
}


def _ci(s: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
    low, high = (s or {}).get("ci95") or (None, None)
    return low, high


def _fmt(s: Mapping[str, Any] | None, unit: str = "%", digits: int = 2) -> str:
    if not s:
        return "—"
    low, high = _ci(s)
    return format_interval(s.get("mean"), low, high, digits, unit, signed=True)


def _verdict(claim: str, metric: str, arm: str | None, verdict: str, detail: str) -> dict:
    text = CLAIMS[claim]
    if claim == "moe" and arm is not None and get_arm(arm).kind != "moe":
        text = f"{arm} shrinks the caption-induced tax"
    return {"claim": text, "key": claim, "metric": metric, "arm": arm,
            "verdict": verdict, "detail": detail}  # fmt: skip


def _caption_condition(conditions: Mapping[str, Any]) -> str | None:
    for cond in ("caption", "image_caption", "caption_image"):
        if cond in conditions:
            return cond
    return None


def _vision(summary: Mapping, metric: str, arm: str, m: float) -> dict:
    tax = summary["taxes"][arm]["image"]["-"][metric]["tax"]
    low, high = _ci(tax)
    text = f"T+I tax {_fmt(tax)}"
    if low is None or high is None:
        return _verdict("vision", metric, arm, INCONCLUSIVE, text + " (no interval: 1 seed)")
    if high < m:
        how = "T+I helps text" if high < 0 else f"any harm is below the +{m:g} % margin"
        return _verdict("vision", metric, arm, SUPPORTED, f"{text}: {how}")
    if low > 0:
        return _verdict("vision", metric, arm, NOT_SUPPORTED, f"{text}: T+I hurts text")
    return _verdict(
        "vision", metric, arm, INCONCLUSIVE, f"{text}: the interval holds 0 and exceeds +{m:g} %"
    )


def _shift(summary: Mapping, metric: str, arm: str, cond: str) -> dict:
    fits = summary["regression"][arm][cond][metric]
    fit = fits["unigram_js"]
    label = summary["conditions"][cond]["label"]
    if "slope" not in fit:
        return _verdict("shift", metric, arm, INCONCLUSIVE, f"{label}_r: {fit['reason']}")
    per_seed = fit["per_seed_slope"]
    low, high = fit["slope_ci95"]
    s_low, s_high = _ci(per_seed)
    shift = {r: summary["shift"][r]["unigram_js"]["mean"] for r in summary["registers"]}
    by_register = ", ".join(
        f"{r} JS {shift[r]:.3f} → {_fmt(summary['taxes'][arm][cond][r][metric]['tax'])}"
        for r in sorted(shift, key=shift.get)
    )
    emb = fits["embedding"]
    emb_text = (
        f"; on embedding distance {emb['slope']:+.1f} [{emb['slope_ci95'][0]:+.1f}, "
        f"{emb['slope_ci95'][1]:+.1f}] % per unit"
        if "slope" in emb
        else ""
    )
    detail = (
        f"{label}_r tax on unigram JS: slope {fit['slope']:+.2f} [{low:+.2f}, {high:+.2f}] % per "
        f"bit (n={fit['n']}), per-seed slopes {_fmt(per_seed, '')}{emb_text}; {by_register}"
    )
    if s_low is not None and low > 0 and s_low > 0:
        return _verdict("shift", metric, arm, SUPPORTED, detail)
    if s_high is not None and high < 0 and s_high < 0:
        detail = "farther captions hurt less: " + detail
        return _verdict("shift", metric, arm, NOT_SUPPORTED, detail)
    return _verdict("shift", metric, arm, INCONCLUSIVE, detail)


def _words(summary: Mapping, metric: str, arm: str, m: float) -> dict:
    diff = summary["comparisons"]["words_vs_pixels"][arm][metric]["pooled"]
    c = summary["pooled"][arm]["caption"][metric]
    ic = summary["pooled"][arm]["image_caption"][metric]
    low, high = _ci(diff)
    dose = summary.get("dose", {})
    shares = [
        f"{label} {sum(v['caption_share'] for v in dose[k].values()) / len(dose[k]):.2f}"
        for k, label in (("caption", "T+C"), ("image_caption", "T+IC"))
        if dose.get(k)
    ]
    detail = (
        f"T+C_r {_fmt(c)}, T+IC_r {_fmt(ic)} (mean over registers); difference "
        f"{_fmt(diff, ' pp')} (t-test p {diff.get('p_t') or float('nan'):.3f})"
        + (f"; caption share of text targets per step: {', '.join(shares)}" if shares else "")
    )
    per_share = summary["comparisons"].get("words_vs_pixels_per_share", {}).get(arm, {})
    if per_share.get(metric):
        detail += (
            f"; per unit of caption share (if the tax scaled with it) "
            f"{_fmt(per_share[metric], ' pp')}"
        )
    c_low, _ = _ci(c)
    if low is None or high is None:
        return _verdict("words", metric, arm, INCONCLUSIVE, detail + " (no interval: 1 seed)")
    if -m < low and high < m and c_low is not None and c_low > 0:
        return _verdict("words", metric, arm, SUPPORTED, detail)
    if low > 0 or high < 0:
        return _verdict("words", metric, arm, NOT_SUPPORTED, detail)
    return _verdict("words", metric, arm, INCONCLUSIVE, detail)


def _moe(summary: Mapping, metric: str, arm: str, base: str, cond: str) -> dict:
    entry = summary["comparisons"]["arm_vs_base"][arm][cond][metric]["pooled"]
    mine, theirs = (summary["pooled"][a][cond][metric] for a in (arm, base))
    label = summary["conditions"][cond]["label"]
    low, high = _ci(entry)
    b_low, _ = _ci(theirs)
    detail = (
        f"{label}_r tax {arm} {_fmt(mine)} vs {base} {_fmt(theirs)}; difference "
        f"{_fmt(entry, ' pp')} (t-test p {entry.get('p_t') or float('nan'):.3f})"
    )
    if low is None or high is None:
        return _verdict("moe", metric, arm, INCONCLUSIVE, detail + " (no interval: 1 seed)")
    if high < 0 and b_low is not None and b_low > 0:
        return _verdict("moe", metric, arm, SUPPORTED, detail)
    if low > 0:
        return _verdict("moe", metric, arm, NOT_SUPPORTED, f"{arm} pays more: " + detail)
    if high < 0:
        detail += f"; but {base}'s own {label}_r tax is not detectably above 0"
    return _verdict("moe", metric, arm, INCONCLUSIVE, detail)


def verdicts(summary: Mapping[str, Any], study: Any) -> list[dict[str, Any]]:
    """Every claim the study's conditions can judge, per text metric and arm."""
    out = []
    conds = summary["conditions"]
    caption = _caption_condition(conds)
    base = study.arms[0]
    for metric in summary["metrics"]:
        for arm in study.arms:
            if "image" in conds:
                out.append(_vision(summary, metric, arm, study.margin))
            if caption and summary["registers"]:
                out.append(_shift(summary, metric, arm, caption))
            if "caption" in conds and "image_caption" in conds and summary["registers"]:
                out.append(_words(summary, metric, arm, study.margin))
        for arm in study.arms[1:]:
            if caption:
                out.append(_moe(summary, metric, arm, base, caption))
    return out
