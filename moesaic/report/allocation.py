"""The HTML report and terminal text of a memory-allocation study (`experiments/allocation.py`):
parameters per ρ, the loss curves against ρ with their parabola fits and verdicts, and the
modality tax at each ρ against pure MoE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from moesaic.report import plots
from moesaic.report.cells import count, interval, p_value
from moesaic.report.html import HtmlReport

VARIANT_LABELS = {"text": "text-only runs", "image": "image-only runs", "joint": "joint runs"}


def _labels(summary: Mapping[str, Any]) -> dict[str, str]:
    first = next(iter(summary["per_rho"].values()))
    return {k: m["label"] for k, m in first["metrics"].items()}


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:+.2f} %"


def _split_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for key, s in summary["splits"].items():
        rows.append(
            [
                key,
                f"{s['realized_rho']:.3f}",
                str(s["experts"]),
                f"{s['table_rows']:,}" if s["table_rows"] else "—",
                count(s["memory_params"]),
                f"{s['leftover']:,}",
                f"{s['params_total']:,}",
                _pct(s["total_vs_pure"]),
                f"{s['params_active']:,}",
                _pct(s["active_vs_pure"]),
                f"{s['memory_active']:,}",
                count(s["flops_per_token"]),
            ]
        )
    return rows


SPLIT_HEADER = [
    "ρ asked",
    "ρ realized",
    "experts",
    "table rows",
    "memory params",
    "leftover",
    "total params",
    "vs ρ = 1",
    "active params",
    "vs ρ = 1",
    "memory active",
    "FLOPs / token",
]


def curve_sentence(label: str, cell: Mapping[str, Any]) -> str:
    """One line: best ρ, its paired difference to ρ = 1, the parabola's minimum, the verdict."""
    best = cell["best_rho"]
    if best is None:
        return f"{label}: no finite loss."
    realized = {p["rho"]: p["realized_rho"] for p in cell["points"]}
    parts = [f"{label}: best ρ {best:g} (realized {realized[best]:.3f})"]
    diff = cell["vs_pure"].get(f"{best:g}") if best not in (None, 1.0) else None
    if diff:
        parts.append(
            f"L(best) − L(1) = {interval(diff, 4, '', True)} (Holm p across ρ "
            f"{p_value(diff.get('p_holm'))})"
        )
    fit = cell.get("fit") or {}
    if fit.get("argmin") is not None:
        low, high = fit.get("argmin_ci95") or (None, None)
        ci = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
        parts.append(
            f"parabola lowest at ρ = {fit['argmin']:.3f}{ci} (convex in "
            f"{100 * (fit.get('boot_convex') or 0):.0f} % of resamples)"
        )
    return "; ".join(parts) + f" → {cell['verdict']['text']}."


def allocation_report(summary: Mapping[str, Any]) -> HtmlReport:
    study = summary["study"]
    labels = _labels(summary)
    r = HtmlReport(f"Experts vs lookup memory at fixed parameters: {study['name']}")
    if study.get("description"):
        r.paragraph(study["description"], css="note")
    r.paragraph(
        f"Arm {summary['arm']}: a sparse budget of {summary['sparse_params']:,} parameters "
        f"({summary['sparse_params'] // summary['expert_unit_params']} experts of "
        f"{summary['expert_unit_params']:,} parameters each, over all MoE blocks) is split "
        "between routed experts (share ρ) and a hashed n-gram memory (1 − ρ). ρ = 1 is the pure "
        "MoE. Every number is over "
        f"{len(summary['seeds'])} seed(s) with 95 % t-intervals."
    )
    r.heading("Parameters per ρ")
    r.table(
        SPLIT_HEADER,
        _split_rows(summary),
        "From the joint run of the first seed. Total + leftover equals ρ = 1's total; active "
        "parameters differ by the routers and, at ρ = 1, by the memory's active part (absent). "
        f"Tolerances: total {summary['tolerance']['total']:.1%}, active "
        f"{summary['tolerance']['active']:.1%}.",
    )
    r.heading("Loss against ρ")
    r.paragraph(
        "Held-out loss against the realized share ρ of sparse parameters in routed experts "
        "(right = pure MoE). Dashed: the least-squares parabola through the seed means; shaded: "
        "the bootstrap 95 % interval (over seeds) of its lowest point on the studied range."
    )
    keys = dict.fromkeys(k for v in summary["curves"].values() for k in v)
    for key in keys:
        series, fits = {}, {}
        for variant, cells in summary["curves"].items():
            cell = cells.get(key)
            if cell:
                name = VARIANT_LABELS[variant]
                series[name] = (
                    [p["realized_rho"] for p in cell["points"]],
                    [p["loss"] for p in cell["points"]],
                )
                fits[name] = cell.get("fit") or {}
        r.figure(
            plots.curves_with_intervals(series, "ρ (share of sparse parameters in experts)",
                                        labels.get(key, key), fits),
            f"{labels.get(key, key)} against ρ (95 % intervals).",
        )  # fmt: skip
    rows, lines = [], []
    for variant, cells in summary["curves"].items():
        for key, cell in cells.items():
            label = f"{VARIANT_LABELS[variant]}, {labels.get(key, key)}"
            lines.append(curve_sentence(label, cell))
            for p in cell["points"]:
                d = cell["vs_pure"].get(f"{p['rho']:g}")
                rows.append(
                    [
                        VARIANT_LABELS[variant],
                        labels.get(key, key),
                        f"{p['rho']:g}",
                        interval(p["loss"], 4),
                        interval(d, 4, "", True) if d else "—",
                        p_value((d or {}).get("p_holm")),
                    ]
                )
    r.heading("Verdicts", level=3)
    r.bullets(lines)
    r.paragraph(
        "Memory beats pure MoE when the best ρ < 1 has a Holm-corrected p (over the ρ compared "
        "with ρ = 1) below 0.05; a U needs, in addition, the bootstrap interval of the "
        "parabola's lowest point strictly inside the studied range. With few seeds the "
        "bootstrap has few distinct resamples (10 for 3 seeds): read its interval as rough.",
        css="note",
    )
    r.table(
        ["runs", "metric", "ρ", "loss", "L(ρ) − L(1), paired", "Holm p (across ρ)"],
        rows,
        "Per ρ: mean loss; paired difference to ρ = 1 by seed.",
        left=2,
    )
    _tax_section(r, summary, labels)
    r.heading("Study configuration")
    r.code(yaml.safe_dump(dict(study), sort_keys=False))
    return r


def _tax_section(r: HtmlReport, summary: Mapping[str, Any], labels: Mapping[str, str]) -> None:
    r.heading("The modality tax at each ρ")
    r.paragraph(
        "Tax = (joint − unimodal) / unimodal × 100 on held-out data, per seed (> 0: the other "
        "modality's data made this one worse). If the memory took over the part of language "
        "that captions share with text, the text tax would change with ρ."
    )
    series = {
        labels.get(k, k): [p["tax"] or {} for p in pts] for k, pts in summary["taxes"].items()
    }
    x = [p["realized_rho"] for p in next(iter(summary["taxes"].values()), [])]
    if series and x:
        r.figure(
            plots.series_with_intervals(series, x, "ρ (share of sparse parameters in experts)",
                                        "modality tax (%)"),
            "Tax per headline metric against ρ (95 % intervals).",
        )  # fmt: skip
    rows = [
        [labels.get(k, k), f"{p['rho']:g}", interval(p["delta"], 4, "", True),
         interval(p["tax"], 2, "%", True)]
        for k, pts in summary["taxes"].items()
        for p in pts
    ]  # fmt: skip
    r.table(["metric", "ρ", "Δ joint − unimodal", "tax"], rows)
    best = summary["primary"]["best_rho"]
    rows = []
    for rho, tests in summary["tax_vs_pure"].items():
        for key, t in tests.items():
            mark = " (best)" if best is not None and rho == f"{best:g}" else ""
            rows.append(
                [f"{rho}{mark}", labels.get(key, key), interval(t, 2, " pp", True),
                 p_value(t.get("p_t")), p_value(t.get("p_holm"))]
            )  # fmt: skip
    r.heading("Tax at ρ against pure MoE", level=3)
    r.table(
        ["ρ", "metric", "tax(ρ) − tax(1)", "p (t)", "Holm p"],
        rows,
        "Paired by seed; Holm over the headline metrics of each ρ. The best ρ is the one with "
        f"the lowest {summary['primary']['metric']} loss of the "
        f"{VARIANT_LABELS[summary['primary']['variant']]}.",
        left=2,
    )


def allocation_console(summary: Mapping[str, Any]) -> str:
    """What `moesaic compete --experiment memory-allocation` prints at the end."""
    labels = _labels(summary)
    out = ["parameters per ρ (joint run of the first seed):"]
    head = f"  {'ρ':>5} {'realized':>8} {'experts':>7} {'table rows':>10} {'total':>11} "
    head += f"{'vs ρ=1':>9} {'active':>9} {'vs ρ=1':>9}"
    out.append(head)
    for key, s in summary["splits"].items():
        rows = f"{s['table_rows']:,}" if s["table_rows"] else "—"
        out.append(
            f"  {key:>5} {s['realized_rho']:>8.3f} {s['experts']:>7} {rows:>10} "
            f"{s['params_total']:>11,} {_pct(s['total_vs_pure']):>9} "
            f"{s['params_active']:>9,} {_pct(s['active_vs_pure']):>9}"
        )
    for variant, cells in summary["curves"].items():
        out.append(f"\nloss against ρ, {VARIANT_LABELS[variant]} (mean [95 % interval]):")
        for key, cell in cells.items():
            pts = "; ".join(f"{p['rho']:g}: {interval(p['loss'], 4)}" for p in cell["points"])
            out.append(f"  {labels.get(key, key)}: {pts}")
            out.append(f"    {curve_sentence('', cell)[2:]}")
    out.append("\nmodality tax at each ρ (%, mean [95 % interval]):")
    for key, pts in summary["taxes"].items():
        cells = "; ".join(f"{p['rho']:g}: {interval(p['tax'], 2, '', True)}" for p in pts)
        out.append(f"  {labels.get(key, key)}: {cells}")
    best = summary["primary"]["best_rho"]
    tests = summary["tax_vs_pure"].get(f"{best:g}") if best not in (None, 1.0) else None
    if tests:
        out.append(f"tax(ρ={best:g}, the best) − tax(1), paired by seed (pp):")
        for key, t in tests.items():
            out.append(
                f"  {labels.get(key, key)}: {interval(t, 2, '', True)} "
                f"(Holm p {p_value(t.get('p_holm'))})"
            )
    elif best is not None:
        out.append(f"best ρ by {summary['primary']['metric']}: {best:g} (no tax comparison)")
    return "\n".join(out)
