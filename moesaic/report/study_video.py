"""The video conditions' section of the tax study's report (summary.json's `video` block,
`experiments/video_tax.py`): text + video and image + video, each modality's tax against its own
unimodal run, arm comparisons, the fairness check, and what the paper reports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moesaic.analysis.tax import tax_verdict
from moesaic.report import plots
from moesaic.report.cells import interval, num, p_value
from moesaic.report.html import HtmlReport


def _verdicts(video: Mapping[str, Any]) -> list[str]:
    """One sentence per condition and metric: each arm's tax and its verdict."""
    lines = []
    for cond, c in video["conditions"].items():
        for key in c["metrics"]:
            parts = [
                f"{arm} {interval(cell['tax'], 2, '%', True)} ({tax_verdict(cell['tax'])})"
                for arm, a in video["arms"].items()
                if (cell := a["conditions"][cond].get(key)) and cell.get("tax")
            ]
            if parts:
                label = video["metrics"][key]["label"]
                lines.append(f"{c['label']}, {label}: " + "; ".join(parts) + ".")
    return lines


def _values(r: HtmlReport, video: Mapping[str, Any]) -> None:
    rows = []
    for arm, a in video["arms"].items():
        for cond, cells in a["conditions"].items():
            for c in cells.values():
                se = c.get("eval_se") or {}
                rows.append(
                    [
                        arm,
                        video["conditions"][cond]["label"],
                        c["label"],
                        f"{c['modality']}-only",
                        interval(c.get("unimodal")),
                        interval(c.get("joint")),
                        interval(c.get("delta"), 4, "", True),
                        interval(c.get("tax"), 2, "%", True),
                        num(c.get("eval_se_tax"), 3) if se else "",
                    ]
                )
    r.table(
        [
            "arm",
            "condition",
            "metric",
            "unimodal run",
            "unimodal",
            "joint",
            "Δ joint − unimodal",
            "tax",
            "eval noise of the tax (pp)",
        ],
        rows,
        "Mean [95 % interval] over seeds; Δ in nats (text) or flow MSE (image, video). Eval "
        "noise: standard error over eval batches of J_b − U_b, in percentage points of the tax.",
        left=4,
    )


def _comparisons(r: HtmlReport, video: Mapping[str, Any]) -> None:
    base = next(iter(video["arms"]))
    rows = [
        [
            video["conditions"][cond]["label"],
            arm,
            video["metrics"][key]["label"],
            interval(t, 2, " pp", True),
            p_value(t.get("p_t")),
            p_value(t.get("p_holm")),
            p_value(t.get("p_sign_flip")),
        ]
        for cond, by_arm in video.get("comparisons", {}).items()
        for arm, tests in by_arm.items()
        for key, t in tests.items()
    ]
    if rows:
        r.table(
            [
                "condition",
                "arm",
                "metric",
                f"tax(arm) − tax({base})",
                "p",
                "p (Holm)",
                "p (sign-flip)",
            ],
            rows,
            "Per-seed differences of the tax; Holm over the metrics of each arm and condition.",
            left=3,
        )


def _fairness(r: HtmlReport, video: Mapping[str, Any]) -> None:
    fair = video["fairness"]
    r.bullets(
        [
            "equal optimizer steps of the text, image, video, text + video and image + video runs "
            f"in every arm and seed (from the runs' logs): {fair['equal_steps']}",
            "equal document tokens per modality (each condition vs its unimodal runs): "
            f"{fair['equal_tokens']}",
        ]
    )
    rows = []
    for arm, seeds in fair["runs"].items():
        for seed, v in seeds.items():
            tps = v["tokens_per_step"]
            rows.append(
                [
                    arm,
                    seed,
                    " / ".join(str(s) for s in v["steps"].values()),
                    f"{num(tps['text']['text'], 0)} / {num(tps['text']['text_video'], 0)}",
                    f"{num(tps['image']['image'], 0)} / {num(tps['image']['image_video'], 0)}",
                    " / ".join(
                        num(tps["video"][x], 0) for x in ("video", "text_video", "image_video")
                    ),
                ]
            )
    if rows:
        r.table(
            [
                "arm",
                "seed",
                "steps text / image / video / text + video / image + video",
                "text tokens per step (text-only / text + video)",
                "image tokens per step (image-only / image + video)",
                "video tokens per step (video-only / text + video / image + video)",
            ],
            rows,
        )


def video_section(r: HtmlReport, summary: Mapping[str, Any]) -> None:
    """Append the video conditions to a tax-study report (nothing without `summary["video"]`)."""
    video = summary.get("video")
    if not video:
        return
    r.heading("Video conditions: text + video and image + video")
    r.paragraph(
        "Per arm and seed, a video-only run (data.mix = "
        f"{', '.join(f'{k}: {v:g}' for k, v in video['mix'].items())}) and two step-matched "
        "joint runs whose every batch stacks the unimodal runs' own batches: text + video "
        "(the text-only and the video-only batch) and image + video. Each modality's tax is "
        "taken against its own unimodal run, paired by seed."
    )
    r.paragraph(f"What the paper reports: {video['note']}", css="note")
    r.bullets(_verdicts(video))
    for cond, c in video["conditions"].items():
        taxes = {
            arm: {k: cell["tax"] for k, cell in a["conditions"][cond].items() if cell.get("tax")}
            for arm, a in video["arms"].items()
        }
        labels = {k: video["metrics"][k]["label"] for k in c["metrics"]}
        if any(taxes.values()):
            r.figure(
                plots.tax_bars(taxes, labels),
                f"{c['label']}: tax per arm and metric (bars: 95 % interval).",
            )
    _values(r, video)
    _comparisons(r, video)
    _fairness(r, video)
