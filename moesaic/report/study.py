"""The HTML report of a competition study, built from summary.json, metrics and analyses only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import yaml

from moesaic.analysis.specialization import specialization_matrix
from moesaic.jsonsafe import as_float
from moesaic.report import plots
from moesaic.report.html import HtmlReport

MAIN_METRICS = ("text/text", "ood_text/text", "image/image")


def _num(v: Any, digits: int = 4) -> str:
    x = as_float(v)
    return f"{x:.{digits}f}" if math.isfinite(x) else "—"


def _count(v: Any) -> str:
    x = as_float(v)
    if not math.isfinite(x):
        return "—"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _stat(s: Mapping[str, Any] | None, digits: int = 4, pct: bool = False) -> str:
    if not s:
        return "—"
    mean, std = as_float(s.get("mean")), as_float(s.get("std"))
    if not math.isfinite(mean):
        return "—"
    text = f"{mean:+.{digits}f}" if pct else f"{mean:.{digits}f}"
    if math.isfinite(std):
        text += f" ± {std:.{digits}f}"
    return text + ("%" if pct else "")


def _diff(s: Mapping[str, Any] | None) -> str:
    """A paired difference in percentage points, starred when |mean| > 2 standard errors."""
    if not s:
        return "—"
    mean, std, n = as_float(s.get("mean")), as_float(s.get("std")), int(s.get("n") or 0)
    if not math.isfinite(mean):
        return "—"
    text = f"{mean:+.2f}"
    if math.isfinite(std) and n > 1:
        text += f" ± {std:.2f}"
        if abs(mean) > 2 * std / math.sqrt(n):
            text += " *"
    return text + " pp"


def _joint_steps(steps: Any) -> str:
    """Joint steps per seed ({seed: steps}) as "768" or "766–768"."""
    if not isinstance(steps, Mapping):
        return str(steps)
    values = sorted(set(steps.values()))
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def _tax(arm: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    cell = arm["metrics"].get(key)
    return cell.get("tax") if cell else None


def plain_summary(summary: Mapping[str, Any]) -> list[str]:
    """One sentence per headline metric: which arm pays the least tax, and how large."""
    lines = []
    n = len(summary.get("seeds", []))
    for key in MAIN_METRICS:
        meta = summary["metrics"].get(key)
        best = summary.get("least_tax", {}).get(key)
        if not meta or best is None:
            continue
        tax = _tax(summary["arms"][best], key)
        means = {
            a: as_float((_tax(arm, key) or {}).get("mean")) for a, arm in summary["arms"].items()
        }
        worst = max((a for a in means if math.isfinite(means[a])), key=means.get)
        mean = as_float(tax.get("mean"))
        word = "competition" if mean > 0 else "synergy"
        lines.append(
            f"{meta['label']}: '{best}' pays the least tax ({_stat(tax, 2, True)}, {word}); "
            f"'{worst}' the most ({_stat(_tax(summary['arms'][worst], key), 2, True)})."
        )
    lines.append(
        f"Mean ± sample standard deviation over {n} seed(s); tax = (joint − unimodal) / "
        "unimodal × 100 on held-out data, positive = the joint run is worse (competition)."
    )
    return lines


def study_report(
    summary: Mapping[str, Any],
    curves: Mapping[str, Mapping[str, list]],
    analyses: Mapping[str, Mapping[str, Any]],
) -> HtmlReport:
    study = summary["study"]
    arms = summary["arms"]
    r = HtmlReport(f"Modality competition: {study['name']}")
    if study.get("description"):
        r.paragraph(study["description"], css="note")
    r.heading("Summary")
    r.bullets(plain_summary(summary))
    header = [
        "arm",
        "params total",
        "params active",
        "FFN total / active",
        "FLOPs / token",
        "train FLOPs (3 runs)",
    ] + [summary["metrics"][k]["label"] + " tax" for k in MAIN_METRICS if k in summary["metrics"]]
    rows = []
    for name, a in arms.items():
        row = [
            name,
            _count(a.get("params_total")),
            _count(a.get("params_active")),
            f"{_count(a.get('ffn_params_total'))} / {_count(a.get('ffn_params_active'))}",
            _count(a.get("flops_per_token")),
            _count(a.get("train_flops", {}).get("study")),
        ]
        row += [_stat(_tax(a, k), 2, True) for k in MAIN_METRICS if k in summary["metrics"]]
        rows.append(row)
    r.table(header, rows, "Active FFN compute per token is matched across arms.")

    taxes = {a: {k: c["tax"] for k, c in arms[a]["metrics"].items() if c.get("tax")} for a in arms}
    labels = {k: m["label"] for k, m in summary["metrics"].items() if m.get("modality")}
    if any(taxes.values()):
        r.heading("Modality tax")
        r.figure(plots.tax_bars(taxes, labels), "Tax per arm and metric (error bar: std).")
    base = next(iter(arms), None)
    rows = []
    for name, a in arms.items():
        if name == base:
            continue
        diffs = a.get("tax_minus_baseline", {})
        rows.append([name] + [_diff(diffs.get(k)) for k in MAIN_METRICS if k in summary["metrics"]])
    if rows:
        r.heading(f"Tax relative to {base} (paired by seed)", level=3)
        r.table(
            ["arm"]
            + [summary["metrics"][k]["label"] for k in MAIN_METRICS if k in summary["metrics"]],
            rows,
            "tax(arm) − tax(baseline) in percentage points, mean ± std over seeds; '*' marks "
            "|mean| > 2 standard errors (the difference clearly exceeds seed noise).",
        )
    r.heading("Held-out values", level=3)
    rows = []
    for name, a in arms.items():
        for c in a["metrics"].values():
            rows.append(
                [
                    name,
                    c["label"],
                    _stat(c.get("unimodal")),
                    _stat(c.get("joint")),
                    _stat(c.get("tax"), 2, True) if c.get("tax") else "joint only",
                ]
            )
    r.table(["arm", "metric", "unimodal", "joint", "tax"], rows, left=2)

    if curves:
        r.heading("Loss curves")
        r.figure(
            plots.loss_curves(curves), "Training (lines) and held-out (dots) loss, first seed."
        )

    moe = {a: an for a, an in analyses.items() if an.get("specialization")}
    if moe:
        r.heading("Expert specialisation (joint runs)")
        rows = []
        for a, an in moe.items():
            o = an["specialization"]["overall"]
            rows.append(
                [a]
                + [
                    _num(o.get(k), 3)
                    for k in (
                        "fraction_text",
                        "fraction_shared",
                        "fraction_image",
                        "entropy_norm",
                        "max_mean_load",
                        "understanding_generation_r",
                        "time_cv",
                    )
                ]
            )
        r.table(
            [
                "arm",
                "text experts",
                "shared",
                "image experts",
                "entropy / log E",
                "max/mean load",
                "r(understanding, generation)",
                "flow-time CV",
            ],
            rows,
            "Means over MoE layers. S = (R_text − R_image)/(R_text + R_image); text S > 0.5, "
            "image S < −0.5.",
        )
        for a, an in moe.items():
            spec = an["specialization"]
            layers, mat = specialization_matrix(spec)
            r.figure(
                plots.specialization_heatmap(layers, mat, f"{a}: S per expert"),
                f"{a}: specialisation S (red text, blue image, grey unused).",
            )
            r.figure(
                plots.class_fractions(spec, f"{a}: expert classes by depth"),
                f"{a}: fraction of text / shared / image experts per layer.",
            )
            r.figure(plots.load_plot(spec, a), f"{a}: expert load per layer.")

    sparse = {
        a: an["sparsity"]["sets"]
        for a, an in analyses.items()
        if an.get("sparsity", {}).get("sets")
    }
    if sparse:
        r.heading("Activation sparsity: in-distribution vs out-of-distribution text")
        r.figure(plots.sparsity_plot(sparse), "Residual stream after each block (joint runs).")
        rows = []
        for a, an in analyses.items():
            diff = an.get("sparsity", {}).get("ood_minus_id")
            if diff:
                rows.append(
                    [a]
                    + [
                        _num(sum(as_float(d[m]) for d in diff) / len(diff), 4)
                        for m in ("top1_mass", "gini", "l0_fraction", "eff_rank_ratio")
                    ]
                )
        if rows:
            r.table(
                ["arm", "Δ top-1% mass", "Δ Gini", "Δ L0", "Δ eff. rank"],
                rows,
                "OOD minus ID, mean over layers; > 0 top-1%/Gini = sparser on OOD.",
            )

    data = summary["data"]
    r.heading("Data")
    steps = data["steps"]
    r.bullets(
        [
            f"text-only run: {steps['text']} steps of text documents",
            f"image-only run: {steps['image']} steps of {', '.join(data['mix']['image'])} "
            "documents; captions are conditioning only (data.caption_loss=false)",
            f"joint run: {_joint_steps(steps['joint'])} steps; its mix is the unimodal runs' "
            "token counts and it stops once it has produced as many tokens, so it sees the same "
            "documents as both unimodal runs together",
        ]
    )
    shift = data.get("caption_shift") or {}
    r.paragraph(
        f"Caption shift ({shift.get('register', '?')} captions vs general text): "
        f"Jensen–Shannon divergence unigram {_num(shift.get('unigram_js'))}, "
        f"bigram {_num(shift.get('bigram_js'))} (bits; 0 = same distribution)."
    )
    cov_rows = []
    for seed, cov in (data.get("coverage") or {}).items():
        if cov:
            cov_rows.append([seed] + [f"{k}: {_num(v, 3)}" for k, v in cov["ratio"].items()])
    if cov_rows:
        r.table(
            ["seed", "joint / unimodal document tokens per kind"],
            [[row[0], ", ".join(row[1:])] for row in cov_rows],
        )
    r.heading("Study configuration")
    r.code(yaml.safe_dump(dict(study), sort_keys=False))
    return r
