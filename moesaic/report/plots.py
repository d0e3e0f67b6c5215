"""Figures of a study (matplotlib, Agg backend; each function returns a Figure).

Inputs are plain data (lists / dicts / arrays as written to summary.json, analysis.json and
metrics.jsonl), never models, so a report can be rebuilt from a study directory alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullLocator  # noqa: E402

from moesaic.jsonsafe import as_float  # noqa: E402

VARIANT_STYLE = {"text": "--", "image": ":", "joint": "-"}
COLORS = plt.get_cmap("tab10").colors


def _arm_color(i: int) -> Any:
    return COLORS[i % len(COLORS)]


def _train_series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(r["step"], as_float(r.get(key))) for r in records if r.get("kind") == "train"]
    if not rows:
        return np.zeros(0), np.zeros(0)
    steps, vals = (np.array(v, dtype=float) for v in zip(*rows, strict=True))
    return steps, vals


def _eval_series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [
        (r["step"], as_float(r.get("losses", {}).get(key)))
        for r in records
        if r.get("kind") == "eval" and key in r.get("losses", {})
    ]
    if not rows:
        return np.zeros(0), np.zeros(0)
    steps, vals = (np.array(v, dtype=float) for v in zip(*rows, strict=True))
    return steps, vals


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or y.size < window:
        return y
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(padded, kernel, mode="valid")


def loss_curves(
    curves: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    modalities: Sequence[tuple[str, str, str]] = (
        ("text", "text_loss", "text/text"),
        ("image", "image_loss", "image/image"),
    ),
) -> Figure:
    """Rows = arms, columns = modality. Each panel: the unimodal run (dashed) against the joint
    run (solid) — training loss (smoothed line) and held-out loss (markers) — against the
    fraction of the run completed. Both runs see the same m-data in the same order, so equal
    fractions mean equal m-data seen."""
    arms = list(curves)
    fig, axes = plt.subplots(
        max(len(arms), 1),
        len(modalities),
        figsize=(5.2 * len(modalities), 2.6 * len(arms) + 0.4),
        squeeze=False,
    )
    for row, arm in enumerate(arms):
        for col, (modality, train_key, eval_key) in enumerate(modalities):
            ax = axes[row][col]
            for variant in (modality, "joint"):
                records = curves[arm].get(variant) or []
                steps, vals = _train_series(records, train_key)
                if steps.size == 0:
                    continue
                total = max(steps.max(), 1.0)
                label = "unimodal" if variant != "joint" else "joint"
                color = "tab:gray" if variant != "joint" else _arm_color(row)
                ax.plot(
                    steps / total,
                    _smooth(vals, 5),
                    VARIANT_STYLE[variant],
                    color=color,
                    lw=1.3,
                    label=f"{label} (train)",
                )
                es, ev = _eval_series(records, eval_key)
                if es.size:
                    ax.plot(es / total, ev, "o", color=color, ms=4, label=f"{label} (held-out)")
            ax.set_title(f"{arm}: {modality} loss", fontsize=10)
            ax.set_xlabel("fraction of run (= fraction of its data seen)", fontsize=8)
            ax.tick_params(labelsize=8)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _ci_errors(stats: Sequence[Mapping[str, Any]]) -> tuple[list[float], np.ndarray]:
    """Means and the [2, n] error-bar lengths of their 95 % intervals (0 where undefined)."""
    means, err = [], np.zeros((2, len(stats)))
    for i, st in enumerate(stats):
        mean = as_float(st.get("mean"))
        low, high = (as_float(v) for v in (st.get("ci95") or (None, None)))
        means.append(mean)
        if math.isfinite(mean) and math.isfinite(low) and math.isfinite(high):
            err[:, i] = (mean - low, high - mean)
    return means, err


def tax_bars(
    taxes: Mapping[str, Mapping[str, Mapping[str, Any]]], labels: Mapping[str, str]
) -> Figure:
    """Grouped bars: metric groups on x, one bar per arm (mean tax %), error bar = 95 % interval.

    `taxes[arm][metric]` is a summary.json Stat ({"mean", "ci95", ...})."""
    arms = list(taxes)
    metrics = [m for m in labels if any(m in taxes[a] for a in arms)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(metrics) + 2), 3.8))
    width = 0.8 / max(len(arms), 1)
    x = np.arange(len(metrics))
    for i, arm in enumerate(arms):
        means, err = _ci_errors([taxes[arm].get(m, {}) for m in metrics])
        ax.bar(
            x + (i - (len(arms) - 1) / 2) * width,
            means,
            width,
            yerr=err,
            capsize=3,
            label=arm,
            color=_arm_color(i),
        )
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(x, [labels[m] for m in metrics], fontsize=8)
    ax.set_ylabel("modality tax (%)\n> 0 competition, < 0 synergy", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def series_with_intervals(
    series: Mapping[str, Sequence[Mapping[str, Any]]],
    x: Sequence[float],
    xlabel: str,
    ylabel: str,
    logx: bool = False,
) -> Figure:
    """One line per key (e.g. arm) through Stats at positions `x`, with 95 % interval bars."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, (name, stats) in enumerate(series.items()):
        means, err = _ci_errors(stats)
        ax.errorbar(
            np.asarray(x, dtype=float) + 0.01 * i * (0 if logx else 1),
            means,
            yerr=err,
            marker="o",
            ms=4,
            capsize=3,
            label=name,
            color=_arm_color(i),
        )
    ax.axhline(0.0, color="black", lw=0.8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def curves_with_intervals(
    series: Mapping[str, tuple[Sequence[float], Sequence[Mapping[str, Any]]]],
    xlabel: str,
    ylabel: str,
    fits: Mapping[str, Mapping[str, Any]] | None = None,
    logx: bool = False,
) -> Figure:
    """One line per key through Stats at its own x positions, with 95 % interval bars and no
    zero line (for losses). `series[name] = (x, stats)`. `fits[name]`, when given, is a
    `ParabolaFit.to_dict()`: its parabola is drawn dashed over the series' x range and the
    bootstrap interval of its lowest point shaded."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, (name, (x, stats)) in enumerate(series.items()):
        means, err = _ci_errors(stats)
        color = _arm_color(i)
        ax.errorbar(
            np.asarray(x, dtype=float), means, yerr=err, marker="o", ms=4, capsize=3,
            label=name, color=color,
        )  # fmt: skip
        fit = (fits or {}).get(name) or {}
        coef = [as_float(c) for c in fit.get("coef") or ()]
        if len(coef) == 3 and all(math.isfinite(c) for c in coef) and len(x):
            xs = np.linspace(min(x), max(x), 100)
            ax.plot(xs, np.polyval(coef, xs), ls="--", lw=1, color=color)
            low, high = (as_float(v) for v in fit.get("argmin_ci95") or (None, None))
            if math.isfinite(low) and math.isfinite(high):
                ax.axvspan(low, high, color=color, alpha=0.12)
    if logx:  # ticks at the data's x, written plainly (2, 4, 8, 16)
        ax.set_xscale("log")
        ticks = sorted({float(v) for _, (x, _) in series.items() for v in x})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def specialization_heatmap(layers: Sequence[int], s_LE: np.ndarray, title: str) -> Figure:
    """Layer × expert coloured by S_i (red = text, blue = image, grey = unused)."""
    s = np.ma.masked_invalid(np.asarray(s_LE, dtype=float))
    fig, ax = plt.subplots(figsize=(min(2.0 + 0.28 * s.shape[1], 14), 1.0 + 0.45 * s.shape[0]))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#cccccc")
    im = ax.imshow(s, cmap=cmap, vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers], fontsize=8)
    ax.set_xlabel("expert", fontsize=9)
    ax.set_title(title, fontsize=10)
    cbar = fig.colorbar(im, ax=ax, fraction=0.04)
    cbar.set_label("S  (+1 text, −1 image)", fontsize=8)
    fig.tight_layout()
    return fig


def class_fractions(spec: Mapping[str, Any], title: str) -> Figure:
    """Stacked bars per layer: fraction of text / shared / image experts."""
    layers = sorted(spec["layers"], key=int)
    fr = {
        c: [as_float(spec["layers"][i]["classes"]["fractions"][c]) for i in layers]
        for c in ("text", "shared", "image")
    }
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(layers), 3.0))
    bottom = np.zeros(len(layers))
    for c, color in (("text", "tab:red"), ("shared", "tab:gray"), ("image", "tab:blue")):
        vals = np.nan_to_num(np.array(fr[c]))
        ax.bar(range(len(layers)), vals, bottom=bottom, color=color, label=c)
        bottom += vals
    ax.set_xticks(range(len(layers)), layers, fontsize=8)
    ax.set_xlabel("layer", fontsize=9)
    ax.set_ylabel("fraction of experts", fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def load_plot(spec: Mapping[str, Any], title: str) -> Figure:
    """Left: expert load × E per layer (1 = even share). Right: max/mean load per layer."""
    layers = sorted(spec["layers"], key=int)
    loads = [np.array([as_float(v) for v in spec["layers"][i]["load"]]) for i in layers]
    e_max = max((len(v) for v in loads), default=1)
    mat = np.full((len(layers), e_max), np.nan)
    for r, v in enumerate(loads):
        mat[r, : len(v)] = v * len(v)
    fig, (a1, a2) = plt.subplots(
        1, 2, figsize=(10, 1.2 + 0.45 * len(layers)), gridspec_kw={"width_ratios": [3, 1]}
    )
    im = a1.imshow(mat, cmap="viridis", aspect="auto", vmin=0, interpolation="nearest")
    a1.set_yticks(range(len(layers)), [f"layer {i}" for i in layers], fontsize=8)
    a1.set_xlabel("expert", fontsize=9)
    a1.set_title(f"{title}: load × E (1 = balanced)", fontsize=10)
    fig.colorbar(im, ax=a1, fraction=0.04)
    ratios = [as_float(spec["layers"][i]["max_mean_load"]) for i in layers]
    a2.barh(range(len(layers)), ratios, color="tab:purple")
    a2.set_yticks(range(len(layers)), layers, fontsize=8)
    a2.invert_yaxis()
    a2.axvline(1.0, color="black", lw=0.8)
    a2.set_title("max / mean load", fontsize=10)
    fig.tight_layout()
    return fig


SPARSITY_PANELS = (
    ("top1_mass", "top-1% mass"),
    ("gini", "Gini of |h|"),
    ("l0_fraction", "L0 fraction"),
    ("eff_rank_ratio", "effective-rank ratio"),
)


def sparsity_plot(
    per_arm: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    sets: Sequence[tuple[str, str]] = (("text", "ID text"), ("ood_text", "OOD text")),
) -> Figure:
    """One panel per metric; x = layer; colour = arm; line style = eval set."""
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(SPARSITY_PANELS), figsize=(4.0 * len(SPARSITY_PANELS), 3.2))
    for ax, (metric, label) in zip(axes, SPARSITY_PANELS, strict=True):
        for i, (arm, by_set) in enumerate(per_arm.items()):
            for j, (set_name, set_label) in enumerate(sets):
                rows = by_set.get(set_name)
                if not rows:
                    continue
                y = [as_float(r.get(metric)) for r in rows]
                ax.plot(
                    range(len(y)),
                    y,
                    styles[j % len(styles)],
                    marker="o",
                    ms=3,
                    color=_arm_color(i),
                    label=f"{arm} · {set_label}",
                )
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("layer", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
    if axes[0].lines:
        axes[0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def save_analysis_figures(analysis: Mapping[str, Any], out_dir: Any, title: str) -> list[Any]:
    """The figures of one run's analysis.json as PNG files in `out_dir` (returns the paths)."""
    from pathlib import Path

    from moesaic.analysis.specialization import specialization_matrix

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Figure] = {}
    spec = analysis.get("specialization")
    if spec and spec.get("layers"):
        layers, mat = specialization_matrix(spec)
        figures["specialization"] = specialization_heatmap(layers, mat, f"{title}: S per expert")
        figures["classes"] = class_fractions(spec, f"{title}: expert classes by depth")
        figures["load"] = load_plot(spec, title)
    sets = analysis.get("sparsity", {}).get("sets") or {}
    if sets:
        figures["sparsity"] = sparsity_plot(
            {title: sets}, (("text", "ID text"), ("ood_text", "OOD text"), ("image", "image"))
        )
    paths = []
    for name, fig in figures.items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
