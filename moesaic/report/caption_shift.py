"""The HTML report of a caption-shift study, built from its summary.json alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from moesaic.jsonsafe import as_float
from moesaic.report import plots
from moesaic.report.cells import count, interval, num, p_value
from moesaic.report.html import HtmlReport

NO_REGISTER = "-"


def _title(summary: Mapping[str, Any], cond: str, register: str) -> str:
    label = summary["conditions"][cond]["label"]
    return label if register == NO_REGISTER else f"{label}_{register}"


def shift_scatter(summary: Mapping[str, Any], shift_key: str, xlabel: str, metric: str) -> Any:
    """One panel per arm: per-seed text tax (%) of every caption condition against the
    register's shift, with the least-squares line and its 95 % confidence band."""
    import matplotlib.pyplot as plt

    arms = list(summary["regression"])
    fig, axes = plt.subplots(1, len(arms), figsize=(5.0 * len(arms), 3.8), squeeze=False)
    for ax, arm in zip(axes[0], arms, strict=True):
        for i, (cond, per_metric) in enumerate(summary["regression"][arm].items()):
            fit = per_metric[metric][shift_key]
            color = plots.COLORS[i % len(plots.COLORS)]
            label = summary["conditions"][cond]["label"]
            pts = fit.get("points") or []
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=color, label=label)
            if "slope" in fit:
                band = fit["band"]
                ax.plot(band["x"], band["fit"], color=color, lw=1.2)
                ax.fill_between(band["x"], band["low"], band["high"], color=color, alpha=0.15)
        if "image" in summary["conditions"]:
            vision = summary["taxes"][arm]["image"][NO_REGISTER][metric]["tax"]
            mean = as_float(vision.get("mean"))
            ax.axhline(mean, color="grey", ls="--", lw=1.0, label="T+I (mean)")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(arm, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(f"{summary['metrics'][metric]['label']} tax (%)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _verdicts(r: HtmlReport, summary: Mapping[str, Any]) -> None:
    r.heading("Verdicts")
    for metric, meta in summary["metrics"].items():
        lines = []
        for v in summary["verdicts"]:
            if v["metric"] != metric:
                continue
            who = f" [{v['arm']}]" if v["arm"] else ""
            lines.append(f"{v['claim']}{who}: {v['verdict'].upper()}. {v['detail']}.")
        if lines:
            r.paragraph(meta["label"] + ":")
            r.bullets(lines)
    n = len(summary.get("seeds", []))
    r.paragraph(
        f"{n} seed(s); 95 % t-intervals over seeds, paired by seed. Tax = (L(condition) − "
        "L(T)) / L(T) × 100 on held-out text; > 0 = the condition made text worse. "
        f"Margin ±{summary['margin']:g} % of text CE (fixed before the runs). Inconclusive "
        "means the intervals cannot decide at this scale — not that there is no effect.",
        css="note",
    )


def _tax_table(r: HtmlReport, summary: Mapping[str, Any]) -> None:
    metrics = list(summary["metrics"])
    header = ["arm", "condition"]
    for k in metrics:
        label = summary["metrics"][k]["label"]
        header += [f"{label}: T", "condition", "Δ (nats)", "tax"]
    rows = []
    for arm, conds in summary["taxes"].items():
        for cond, regs in conds.items():
            for register, cells in regs.items():
                row = [arm, _title(summary, cond, register)]
                for k in metrics:
                    c = cells[k]
                    row += [
                        interval(c["reference"], 4),
                        interval(c["value"], 4),
                        interval(c["delta"], 4, "", True),
                        interval(c["tax"], 2, "%", True),
                    ]
                rows.append(row)
    r.table(header, rows, "Held-out text CE of T and of each condition, mean [95 % interval] "
            "over seeds; Δ and tax per seed against the same seed's T run.", left=2)  # fmt: skip
    pooled = []
    for arm, conds in summary["pooled"].items():
        for cond, per_metric in conds.items():
            label = summary["conditions"][cond]["label"]
            pooled.append([arm, label] + [interval(per_metric[k], 2, "%", True) for k in metrics])
    r.table(
        ["arm", "condition"] + [summary["metrics"][k]["label"] + " tax" for k in metrics],
        pooled,
        "Tax per condition, the mean over registers taken per seed.",
        left=2,
    )
    for k in metrics:
        bars = {
            arm: {
                _title(summary, c, reg): cells[k]["tax"]
                for c, regs in conds.items()
                for reg, cells in regs.items()
            }
            for arm, conds in summary["taxes"].items()
        }
        labels = {t: t for a in bars.values() for t in a}
        r.figure(
            plots.tax_bars(bars, labels),
            f"{summary['metrics'][k]['label']}: tax per condition and arm (95 % intervals).",
        )


def _shift(r: HtmlReport, summary: Mapping[str, Any]) -> None:
    if not summary["shift"]:
        return
    primary, shift_labels = summary["primary_metric"], summary["shift_labels"]
    r.heading("Caption shift and the text tax")
    arms = list(summary["arms"])
    rows = [
        [reg, interval(s["unigram_js"], 4), interval(s["bigram_js"], 4)]
        + [interval(s["embedding"].get(a), 4) for a in arms]
        for reg, s in summary["shift"].items()
    ]
    r.table(
        ["register", "unigram JS (bits)", "bigram JS (bits)"]
        + [f"embedding distance ({a} T model)" for a in arms],
        rows,
        "JS: captions vs general text, token distributions (the seed's tokenizer). Embedding "
        "distance: 1 − cos between the mean last-block output over caption documents and over "
        "general-text documents, measured with each arm's text-only model (untouched by "
        "captions, the same ruler for every register).",
    )
    for key in ("unigram_js", "embedding"):
        for metric in summary["metrics"]:
            if key == "embedding" and metric != primary:
                continue
            r.figure(
                shift_scatter(summary, key, shift_labels[key], metric),
                f"{summary['metrics'][metric]['label']} tax against {shift_labels[key]}: one point "
                "per register and seed, the least-squares line with its 95 % confidence band.",
            )
    rows = []
    for arm, conds in summary["regression"].items():
        for cond, per_metric in conds.items():
            for metric, fits in per_metric.items():
                for key, fit in fits.items():
                    head = [arm, summary["conditions"][cond]["label"],
                            summary["metrics"][metric]["label"], shift_labels[key]]  # fmt: skip
                    if "slope" not in fit:
                        rows.append(head + [fit["reason"], "", "", "", str(fit["n"]), ""])
                        continue
                    low, high = fit["slope_ci95"]
                    rows.append(
                        head
                        + [
                            f"{fit['slope']:+.3f} [{low:+.3f}, {high:+.3f}]",
                            f"{fit['intercept']:+.3f} ± {fit['intercept_se']:.3f}",
                            f"{fit['r']:+.2f}",
                            p_value(fit["p"]),
                            str(fit["n"]),
                            interval(fit["per_seed_slope"], 3, "", True),
                        ]
                    )
    r.table(
        ["arm", "condition", "metric", "shift", "slope [95 %] (% per unit)", "intercept ± se",
         "r", "p", "n", "per-seed slope [95 %]"],
        rows,
        "scipy.stats.linregress over every (register, seed) point; slope interval slope ± "
        "t(0.975, n−2)·se. The registers of a seed share one T run, so its points are not "
        "independent; the per-seed slope (one fit per seed across registers, t-interval over "
        "seeds) does not assume they are.",
        left=4,
    )  # fmt: skip


def _paired_rows(name: str, entry: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for reg, t in entry.get("per_register", {}).items():
        rows.append([name, reg, interval(t, 2, " pp", True), p_value(t.get("p_t")),
                     p_value(t.get("p_sign_flip")), p_value(t.get("p_holm"))])  # fmt: skip
    t = entry["pooled"]
    rows.append([name, "mean over registers", interval(t, 2, " pp", True), p_value(t.get("p_t")),
                 p_value(t.get("p_sign_flip")), "—"])  # fmt: skip
    return rows


def _comparisons(r: HtmlReport, summary: Mapping[str, Any]) -> None:
    comp = summary["comparisons"]
    header = ["comparison", "register", "difference", "p (t)", "p (sign-flip)", "p (Holm)"]
    for metric, meta in summary["metrics"].items():
        rows = []
        for arm, per in comp["words_vs_pixels"].items():
            rows += _paired_rows(f"{arm}: T+C − T+IC", per[metric])
        for arm, per in comp.get("words_vs_pixels_per_share", {}).items():
            name = f"{arm}: (T+C − T+IC) per unit of caption share"
            rows += _paired_rows(name, {"pooled": per[metric]})
        for arm, per_cond in comp["arm_vs_base"].items():
            base = next(iter(summary["arms"]))
            for cond, per in per_cond.items():
                label = summary["conditions"][cond]["label"]
                rows += _paired_rows(f"{label}: {arm} − {base}", per[metric])
        for arm, per_cond in comp["captions_vs_vision"].items():
            for cond, per in per_cond.items():
                label = summary["conditions"][cond]["label"]
                rows += _paired_rows(f"{arm}: {label} − T+I", {"pooled": per[metric]})
        note = (
            f"{meta['label']}: paired differences of taxes (percentage points) per seed; Holm "
            "across the registers of one comparison. Per unit of caption share: each tax "
            "divided by its condition's caption share of the text targets (descriptive; it "
            "assumes the tax scales with that share)."
        )
        if rows:
            r.table(header, rows, note, left=2)


def _dose_and_fairness(r: HtmlReport, summary: Mapping[str, Any]) -> None:
    r.heading("What each step trains on")
    rows = [
        [
            _title(summary, cond, reg),
            num(d["text_targets"], 1),
            num(d["other_targets"], 1),
            num(d["caption_share"], 3),
        ]  # fmt: skip
        for cond, regs in summary["dose"].items()
        for reg, d in regs.items()
    ]
    r.table(
        ["condition", "general-text targets / step", "other part's text targets / step",
         "caption share of text targets"],
        rows,
        "Replayed from the first seed's streams. The text loss is one mean over all text "
        "targets of a step, so captions take this share of it.",
    )  # fmt: skip
    fair = summary["fairness"]
    r.paragraph(
        f"Equal optimizer steps in every run: {fair['equal_steps']}; equal general-text "
        f"document tokens as T in every run: {fair['equal_text_tokens']} (read from each run's "
        "own summary.json: step and data_produced)."
    )
    rows = [
        [arm, seed, name, str(v["step"]), str(v["text_tokens"])]
        for arm, seeds in fair["runs"].items()
        for seed, runs in seeds.items()
        for name, v in runs.items()
    ]
    r.table(["arm", "seed", "run", "steps", "general-text tokens"], rows, left=3)
    rows = [
        [
            summary["metrics"][k]["label"],
            num(v["eval_se_tax"], 3),
            num(v["seed_sd_tax"], 3),
            num(v["ratio"], 2),
        ]  # fmt: skip
        for k, v in summary["noise"].items()
    ]
    r.table(
        ["metric", "eval noise of the tax (pp)", "seed sd of the tax (pp)", "ratio"],
        rows,
        "Evaluation noise: standard error over eval batches of the per-batch Δ, in "
        "percentage points of T's loss, mean over cells; beside the seed-to-seed sd.",
    )


def caption_shift_report(summary: Mapping[str, Any]) -> HtmlReport:
    study = summary["study"]
    r = HtmlReport(f"Caption shift and the text tax: {study['name']}")
    if study.get("description"):
        r.paragraph(study["description"], css="note")
    r.paragraph(
        "Is the text tax caused by captions rather than by vision? Every condition stacks the "
        "text-only run's batch (T) with one batch of other data at every step — bare images "
        "(T+I), captions as plain text (T+C_r), image→caption documents (T+IC_r), "
        "caption→image documents (T+CI_r) — so general-text tokens, steps and schedule equal "
        "T's. r is the caption register."
    )
    _verdicts(r, summary)
    r.heading("Text tax per condition, register and arm")
    _tax_table(r, summary)
    _shift(r, summary)
    r.heading("Paired comparisons")
    _comparisons(r, summary)
    _dose_and_fairness(r, summary)
    r.heading("Arms")
    r.table(
        ["arm", "params total", "params active", "FLOPs / token", "train FLOPs (all runs)"],
        [
            [
                a,
                count(v["params_total"]),
                count(v["params_active"]),
                count(v["flops_per_token"]),
                count(v["train_flops"]),
            ]  # fmt: skip
            for a, v in summary["arms"].items()
        ],
    )
    r.heading("Study configuration")
    r.code(yaml.safe_dump(dict(study), sort_keys=False))
    return r
