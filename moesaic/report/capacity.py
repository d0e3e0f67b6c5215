"""The HTML report of a capacity study: the tax against model size and tokens per parameter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from moesaic.report import plots
from moesaic.report.cells import count, interval
from moesaic.report.html import HtmlReport
from moesaic.report.study import verdicts


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g}"


def capacity_report(summary: Mapping[str, Any]) -> HtmlReport:
    study = summary["study"]
    r = HtmlReport(f"Modality tax against model size: {study['name']}")
    if study.get("description"):
        r.paragraph(study["description"], css="note")
    r.heading("Tax against tokens per active parameter")
    r.paragraph(
        "Each point is one model width (the same data at every width). Fewer tokens per "
        "parameter means more capacity; if dense layers make the modalities compete for too "
        "little capacity, the tax falls to the right of each curve's smallest model less than "
        "it rises to the left, and sparse arms pay less where capacity binds."
    )
    for key, per_arm in summary["curves"].items():
        label = summary["sizes"][str(summary["widths"][0])]["metrics"][key]["label"]
        x = [p["tokens_per_active_param"] for p in next(iter(per_arm.values()))]
        series = {arm: [p["tax"] or {} for p in pts] for arm, pts in per_arm.items()}
        if all(v is not None for v in x):
            r.figure(
                plots.series_with_intervals(
                    series,
                    x,
                    "tokens of this modality per active parameter",
                    f"{label} tax (%)",
                    logx=True,
                ),
                f"{label}: tax per arm against tokens per active parameter (95 % intervals).",
            )
        rows = [
            [
                arm,
                str(p["width"]),
                count(p["params_active"]),
                count(p["params_total"]),
                f"{p['tokens_per_active_param']:.3g}" if p["tokens_per_active_param"] else "—",
                _num(p.get("knowledge_bits_per_active_param")),
                interval(p["delta"], 4, "", True),
                interval(p["tax"], 2, "%", True),
            ]
            for arm, pts in per_arm.items()
            for p in pts
        ]
        r.table(
            [
                "arm",
                "width",
                "active params",
                "total params",
                "tokens / active param",
                "knowledge bits / active param",
                "Δ joint − unimodal",
                "tax",
            ],
            rows,
            label,
        )
    for width in summary["widths"]:
        body = summary["sizes"][str(width)]
        r.heading(f"Width {width}", level=3)
        r.bullets(verdicts({**body, "seeds": summary["seeds"]}))
    r.heading("Study configuration")
    r.code(yaml.safe_dump(dict(study), sort_keys=False))
    return r
