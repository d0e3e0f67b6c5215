"""The HTML report of a modality-tax study, built from summary.json and the run directories
(metrics.jsonl for loss curves, analysis.json for specialisation) only."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from moesaic.analysis.specialization import specialization_matrix
from moesaic.analysis.tax import HEADLINE_KEYS
from moesaic.jsonsafe import as_float
from moesaic.report import plots
from moesaic.report.cells import count, interval, num, p_value
from moesaic.report.html import HtmlReport


def _tax(arm: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    cell = arm["metrics"].get(key)
    return cell.get("tax") if cell else None


def verdicts(summary: Mapping[str, Any]) -> list[str]:
    """One plain sentence per headline metric and arm: competition, synergy or no detectable
    tax (the 95 % interval contains 0), and each arm against the first, by its test."""
    lines = []
    arms = summary["arms"]
    n = len(summary.get("seeds", []))
    for key in HEADLINE_KEYS:
        meta = summary["metrics"].get(key)
        if not meta:
            continue
        parts = []
        for name, a in arms.items():
            t = _tax(a, key)
            if not t or t.get("mean") is None:
                continue
            low, high = t.get("ci95") or (None, None)
            if low is None or high is None:
                word = "one seed, no interval"
            elif low > 0:
                word = "competition"
            elif high < 0:
                word = "synergy"
            else:
                word = "no tax detectable"
            parts.append(f"{name} {interval(t, 2, '%', True)} ({word})")
        if parts:
            lines.append(f"{meta['label']}: " + "; ".join(parts) + ".")
    base = next(iter(arms), None)
    for arm, tests in summary.get("comparisons", {}).items():
        found = []
        for key, t in tests.items():
            p = as_float(t.get("p_holm"))
            verdict = "differs" if math.isfinite(p) and p < 0.05 else "not distinguishable"
            found.append(
                f"{summary['metrics'][key]['label']}: {verdict} "
                f"({interval(t, 2, ' pp', True)}, Holm p {p_value(p)})"
            )
        if found:
            lines.append(f"{arm} vs {base}: " + "; ".join(found) + ".")
    lines.append(
        f"{n} seed(s); 95 % t-intervals over seeds. Tax = (joint − unimodal) / unimodal × 100 on "
        "held-out data; > 0 = the joint run is worse (competition). A null (interval around 0, "
        "or p ≥ 0.05) means no effect was detected at this power, not that there is none."
    )
    return lines


def _curves(summary: Mapping[str, Any]) -> dict[str, dict[str, list]]:
    """arm → variant → metrics.jsonl records of the first seed's runs."""
    from moesaic.train.metrics import read_metrics

    out: dict[str, dict[str, list]] = {}
    for arm, a in summary["arms"].items():
        out[arm] = {}
        for variant in ("text", "image", "joint"):
            dirs = a["runs"].get(variant) or []
            if dirs and (Path(dirs[0]) / "metrics.jsonl").is_file():
                out[arm][variant] = read_metrics(Path(dirs[0]) / "metrics.jsonl")
    return out


def _analyses(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for arm, run_dir in summary.get("analysis_first_seed", {}).items():
        path = Path(run_dir) / "analysis.json"
        if path.is_file():
            out[arm] = json.loads(path.read_text())
    return out


def _headline_table(r: HtmlReport, summary: Mapping[str, Any]) -> None:
    keys = [k for k in HEADLINE_KEYS if k in summary["metrics"]]
    header = [
        "arm",
        "params total",
        "params active",
        "FFN total / active",
        "FLOPs / token",
        "train FLOPs (3 runs)",
    ] + [summary["metrics"][k]["label"] + " tax" for k in keys]
    rows = []
    for name, a in summary["arms"].items():
        row = [
            name,
            count(a.get("params_total")),
            count(a.get("params_active")),
            f"{count(a.get('ffn_params_total'))} / {count(a.get('ffn_params_active'))}",
            count(a.get("flops_per_token")),
            count(a.get("train_flops", {}).get("study")),
        ]
        rows.append(row + [interval(_tax(a, k), 2, "%", True) for k in keys])
    r.table(
        header,
        rows,
        "Active FFN compute per token is matched across arms; tax: mean "
        "[95 % interval] over seeds.",
    )


def _comparisons(r: HtmlReport, summary: Mapping[str, Any]) -> None:
    comps = summary.get("comparisons") or {}
    if not comps:
        return
    base = next(iter(summary["arms"]))
    r.heading(f"Each arm against {base} (paired by seed)", level=3)
    rows = []
    for arm, tests in comps.items():
        for key, t in tests.items():
            rows.append(
                [
                    arm,
                    summary["metrics"][key]["label"],
                    interval(t, 2, " pp", True),
                    p_value(t.get("p_t")),
                    p_value(t.get("p_holm")),
                    p_value(t.get("p_sign_flip")),
                    p_value(t.get("p_sign_flip_holm")),
                ]
            )
    r.table(
        [
            "arm",
            "metric",
            f"tax(arm) − tax({base})",
            "p (t-test)",
            "p (Holm)",
            "p (sign-flip)",
            "p (sign-flip, Holm)",
        ],
        rows,
        "Per-seed differences of the tax in percentage points. Holm corrects each test over the "
        "metrics of each arm; the verdict uses the t-test. The exact sign-flip test (from 6 "
        "seeds) does not assume normal differences; with m metrics its Holm p cannot fall below "
        "m·2/2^n.",
        left=2,
    )


def _values_table(r: HtmlReport, summary: Mapping[str, Any]) -> None:
    r.heading("Held-out values", level=3)
    rows = []
    for name, a in summary["arms"].items():
        for key, c in a["metrics"].items():
            if "/image_t" in key:
                continue
            se = c.get("eval_se") or {}
            rows.append(
                [
                    name,
                    c["label"],
                    interval(c.get("unimodal")),
                    interval(c.get("joint")),
                    interval(c.get("delta"), 4, "", True) if c.get("delta") else "joint only",
                    interval(c.get("tax"), 2, "%", True) if c.get("tax") else "",
                    f"{num(se.get('unimodal'))} / {num(se.get('joint'))}" if se else "",
                ]
            )
    r.table(
        [
            "arm",
            "metric",
            "unimodal",
            "joint",
            "Δ joint − unimodal",
            "tax",
            "eval s.e. (uni / joint)",
        ],
        rows,
        "Δ in nats (text) or MSE (image). Eval s.e.: standard error of a run's eval mean "
        "over its eval batches, averaged over seeds.",
        left=2,
    )


def _noise(r: HtmlReport, summary: Mapping[str, Any]) -> None:
    noise = summary.get("noise") or {}
    if not noise:
        return
    r.heading("Evaluation noise against seed spread", level=3)
    rows = [
        [
            summary["metrics"][k]["label"],
            num(v.get("eval_se_tax"), 3),
            num(v.get("seed_sd_tax"), 3),
            num(v.get("ratio"), 2),
        ]
        for k, v in noise.items()
    ]
    r.table(
        ["metric", "eval noise of the tax (pp)", "seed sd of the tax (pp)", "ratio"],
        rows,
        "Eval noise: 100·√(s.e.(U)² + s.e.(J)²)/U from the spread over eval batches (an upper "
        "bound: U and J share the eval batches). Ratios well below 1 mean the eval sets are "
        "large enough that seeds, not evaluation, limit the precision.",
    )


def _fairness(r: HtmlReport, summary: Mapping[str, Any]) -> None:
    fair = summary.get("fairness") or {}
    r.heading("The comparison")
    match = summary.get("match")
    if match == "steps":
        text = (
            "match: steps — every joint step stacks one text-only batch and one image-only "
            "batch (the unimodal runs' own batches, in the same order), over the same "
            "optimizer steps and learning-rate schedule; the only difference is the other "
            "modality's gradient in the same update."
        )
    else:
        text = (
            "match: tokens — the joint run mixes both modalities in one batch and takes "
            "about twice the unimodal steps to see the same tokens. The half-batch controls "
            "(unimodal runs at half the batch and twice the steps) measure that step effect "
            "below."
        )
    r.paragraph(text)
    r.bullets(
        [
            f"equal optimizer steps in every arm and seed (from the runs' logs): "
            f"{fair.get('equal_steps')}",
            f"equal document tokens per modality (joint vs unimodal): {fair.get('equal_tokens')}",
        ]
    )
    rows = []
    for arm, seeds in (fair.get("runs") or {}).items():
        for seed, v in seeds.items():
            tps = v["tokens_per_step"]
            rows.append(
                [
                    arm,
                    seed,
                    " / ".join(str(v["steps"][x]) for x in ("text", "image", "joint")),
                    f"{num(tps['text']['text'], 0)} / {num(tps['text']['joint'], 0)}",
                    f"{num(tps['image']['image'], 0)} / {num(tps['image']['joint'], 0)}",
                ]
            )
    if rows:
        r.table(
            [
                "arm",
                "seed",
                "steps text / image / joint",
                "text tokens per step (U / J)",
                "image tokens per step (U / J)",
            ],
            rows,
        )
    effect = summary.get("step_effect") or {}
    if effect:
        rows = [
            [arm, summary["metrics"][k]["label"], interval(s, 2, "%", True)]
            for arm, keys in effect.items()
            for k, s in keys.items()
        ]
        r.table(
            ["arm", "metric", "half batch, twice the steps vs unimodal"],
            rows,
            "The step effect alone: (L(half) − L(U))/L(U); < 0 means more, smaller steps "
            "help a unimodal run by themselves.",
            left=2,
        )


def _specialization(r: HtmlReport, summary: Mapping[str, Any], analyses: Mapping) -> None:
    spec = summary.get("specialization") or {}
    if not spec:
        return
    r.heading("Expert specialisation (joint runs, all seeds)")
    rows = []
    for arm, s in spec.items():
        rows.append(
            [arm]
            + [
                interval(s.get(k), 3)
                for k in (
                    "fraction_text",
                    "null_fraction_text",
                    "fraction_shared",
                    "fraction_image",
                    "null_fraction_image",
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
            "null",
            "shared",
            "image experts",
            "null",
            "entropy / log E",
            "max/mean load",
            "r(und., gen.)",
            "flow-time CV",
        ],
        rows,
        "Means over MoE layers, then over seeds [95 % interval]. S = (R_text − R_image)/"
        "(R_text + R_image); text S > 0.5, image S < −0.5. Null: the fractions modality-blind "
        "routing gives at the same token shares and expert load.",
    )
    for arm, an in analyses.items():
        sp = an.get("specialization")
        if not sp:
            continue
        layers, mat = specialization_matrix(sp)
        r.figure(
            plots.specialization_heatmap(layers, mat, f"{arm}: S per expert"),
            f"{arm}, first seed: specialisation S (red text, blue image, grey unused).",
        )
        r.figure(
            plots.class_fractions(sp, f"{arm}: expert classes by depth"),
            f"{arm}: fraction of text / shared / image experts per layer.",
        )
        r.figure(plots.load_plot(sp, arm), f"{arm}: expert load per layer.")


def _sparsity(r: HtmlReport, analyses: Mapping[str, Any]) -> None:
    sparse = {
        a: an["sparsity"]["sets"]
        for a, an in analyses.items()
        if an.get("sparsity", {}).get("sets")
    }
    if not sparse:
        return
    r.heading("Activation sparsity: in-distribution vs out-of-distribution text")
    r.figure(plots.sparsity_plot(sparse), "Residual stream after each block (joint runs, seed 1).")


def study_report(summary: Mapping[str, Any], study_dir: Path) -> HtmlReport:
    study = summary["study"]
    arms = summary["arms"]
    r = HtmlReport(f"Modality tax: {study['name']}")
    if study.get("description"):
        r.paragraph(study["description"], css="note")
    r.heading("Summary")
    r.bullets(verdicts(summary))
    _headline_table(r, summary)
    taxes = {a: {k: c["tax"] for k, c in arms[a]["metrics"].items() if c.get("tax")} for a in arms}
    labels = {k: summary["metrics"][k]["label"] for k in HEADLINE_KEYS if k in summary["metrics"]}
    if any(taxes.values()):
        r.heading("Modality tax")
        r.figure(plots.tax_bars(taxes, labels), "Tax per arm and metric (bars: 95 % interval).")
    bins = sorted(
        (k for k in summary["metrics"] if k.startswith("image/image_t")),
        key=lambda k: int(k.rsplit("_t", 1)[1]),
    )
    if bins:
        centres = [(i + 0.5) / len(bins) for i in range(len(bins))]
        series = {a: [taxes[a].get(k, {}) for k in bins] for a in arms}
        r.figure(
            plots.series_with_intervals(
                series, centres, "flow time t (0 noise, 1 clean)", "image tax (%)"
            ),
            "Caption→image flow-loss tax per flow-time bin (95 % intervals).",
        )
    _comparisons(r, summary)
    _values_table(r, summary)
    _noise(r, summary)
    _fairness(r, summary)
    if summary.get("video"):
        from moesaic.report.study_video import video_section

        video_section(r, summary)
    curves = _curves(summary)
    if curves:
        r.heading("Loss curves")
        r.figure(plots.loss_curves(curves), "Training (lines) and held-out (dots) loss, seed 1.")
    analyses = _analyses(summary)
    _specialization(r, summary, analyses)
    _sparsity(r, analyses)
    shift = summary["data"].get("caption_shift") or {}
    r.heading("Data")
    r.paragraph(
        f"Image-only runs: {', '.join(summary['data']['image_mix'])} documents; captions are "
        "conditioning only (data.caption_loss=false). Caption shift "
        f"({shift.get('register', '?')} captions vs general text): Jensen–Shannon divergence "
        f"unigram {num(shift.get('unigram_js'))}, bigram {num(shift.get('bigram_js'))} (bits)."
    )
    r.heading("Study configuration")
    r.code(yaml.safe_dump(dict(study), sort_keys=False))
    return r
