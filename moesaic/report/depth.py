"""The HTML report and terminal text of a depth-width study (`experiments/depth.py`): the shapes
and how close each gets to the parameter target, loss against depth per modality and arm with
intervals, and a verdict per arm and modality."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from moesaic.report import plots
from moesaic.report.cells import count, interval, p_value
from moesaic.report.html import HtmlReport

VARIANT_LABELS = {"text": "text-only runs", "image": "image-only runs"}
SHAPE_HEADER = [
    "arm",
    "layers",
    "width",
    "heads × head width",
    "FFN width",
    "non-embedding total",
    "non-embedding active",
    "vs target",
    "all params (total / active)",
    "FLOPs / token",
]


def _shape_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    return [
        [
            arm,
            str(s["depth"]),
            str(s["width"]),
            f"{s['heads']} × {s['head_dim']}",
            str(s["ffn_hidden"]),
            f"{s['nonembedding_total']:,}",
            f"{s['nonembedding_active']:,}",
            f"{100 * s['deviation']:+.2f} %",
            f"{count(s['params_total'])} / {count(s['params_active'])}",
            count(s["flops_per_token"]),
        ]
        for arm, shapes in summary["shapes"].items()
        for s in shapes
    ]


def verdict_lines(summary: Mapping[str, Any]) -> list[str]:
    """One line per arm and modality, on the primary metric of the modality."""
    lines = []
    for arm, variants in summary["curves"].items():
        for variant, cells in variants.items():
            key = summary["primary"][variant]
            cell = cells.get(key)
            if not cell:
                continue
            slope = interval(cell["slope"], 4, "", True)
            lines.append(
                f"{arm}, {VARIANT_LABELS[variant]} ({summary['labels'][key]}): "
                f"{cell['verdict']['text']} (slope per doubling of depth {slope})."
            )
    return lines


def depth_report(summary: Mapping[str, Any]) -> HtmlReport:
    study = summary["study"]
    target = summary["target"]
    r = HtmlReport(f"Depth against width at fixed parameters: {study['name']}")
    if study.get("description"):
        r.paragraph(study["description"], css="note")
    r.paragraph(
        f"Every shape holds its arm's non-embedding {target['count']} parameters at "
        f"{target['params']:,} (tolerance ±{100 * target['tolerance']:.1f} %): the blocks and the "
        "final norm; the token embedding, text head and image input/output are not counted. "
        f"Every number is over {len(summary['seeds'])} seed(s) with 95 % t-intervals."
    )
    r.heading("Shapes")
    r.table(SHAPE_HEADER, _shape_rows(summary), "All params and FLOPs from the runs' summaries.")
    r.heading("Loss against depth")
    for variant in ("text", "image"):
        keys = dict.fromkeys(k for a in summary["curves"].values() for k in a.get(variant, {}))
        for key in keys:
            series = {
                arm: (
                    [p["depth"] for p in v[variant][key]["points"]],
                    [p["loss"] for p in v[variant][key]["points"]],
                )
                for arm, v in summary["curves"].items()
                if key in v.get(variant, {})
            }
            label = summary["labels"][key]
            r.figure(
                plots.curves_with_intervals(series, "layers (log scale)", label, logx=True),
                f"{label}, {VARIANT_LABELS[variant]}: loss per arm against depth at fixed "
                "non-embedding parameters (95 % intervals).",
            )
    r.heading("Verdicts", level=3)
    r.bullets(verdict_lines(summary))
    r.paragraph(
        "Trend: the 95 % t-interval over seeds of each seed's least-squares slope of loss "
        "against log2(layers); below 0 = deeper is better. The best depth is the one with the "
        "lowest mean; it is 'better than every other depth' when each paired difference has a "
        "Holm-corrected p (over the other depths) below 0.05.",
        css="note",
    )
    rows = []
    for arm, variants in summary["curves"].items():
        for variant, cells in variants.items():
            for key, cell in cells.items():
                for p in cell["points"]:
                    d = cell["vs_best"].get(str(p["depth"]))
                    rows.append(
                        [
                            arm,
                            VARIANT_LABELS[variant],
                            summary["labels"][key],
                            str(p["depth"]),
                            interval(p["loss"], 4),
                            interval(d, 4, "", True) if d else "best",
                            p_value((d or {}).get("p_holm")),
                        ]
                    )
    r.table(
        ["arm", "runs", "metric", "layers", "loss", "L − L(best), paired", "Holm p"],
        rows,
        left=3,
    )
    r.heading("Study configuration")
    r.code(yaml.safe_dump(dict(study), sort_keys=False))
    return r


def depth_console(summary: Mapping[str, Any]) -> str:
    """What `moesaic compete --experiment depth-width` prints at the end."""
    target = summary["target"]
    out = [
        f"shapes (non-embedding {target['count']} parameters, target {target['params']:,} "
        f"± {100 * target['tolerance']:.1f} %):"
    ]
    for arm, shapes in summary["shapes"].items():
        cells = [
            f"{s['depth']}×{s['width']} ({s['heads']}×{s['head_dim']}) {s['held']:,} "
            f"({100 * s['deviation']:+.1f} %)"
            for s in shapes
        ]
        out.append(f"  {arm:<8} " + "; ".join(cells))
    for arm, variants in summary["curves"].items():
        for variant, cells in variants.items():
            out.append(
                f"\n{arm}, {VARIANT_LABELS[variant]} (loss by layers, mean [95 % interval]):"
            )
            for key, cell in cells.items():
                pts = "; ".join(f"{p['depth']}: {interval(p['loss'], 4)}" for p in cell["points"])
                out.append(f"  {summary['labels'][key]}: {pts}")
    out.append("\nverdicts:")
    out += [f"  {line}" for line in verdict_lines(summary)]
    return "\n".join(out)
