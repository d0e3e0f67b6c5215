"""IsoFLOP scaling per modality and architecture: N_opt ∝ C^a and D_opt ∝ C^b.

The claim tested (Tong et al. 2026): at a fixed compute budget C the compute-optimal model
size grows with C faster for language than for vision (dense: a = 0.47 vs 0.37 — "language is
parameter-hungry, vision data-hungry"), and with MoE the gap halves (0.41 vs 0.36).

Runs are unimodal: `text` trains on text documents only, `image` on caption→image pairs and
bare images with `data.caption_loss = false` (the tax study's image-only data), so each loss
belongs to one modality. For every arm (`experiments/arms.py`: MoE at the dense arm's active
compute), modality, budget C in `study.budgets` and model size in `study.sizes` one run trains
to exactly its budget:

    steps = round(C / (FLOPs per token · tokens per step))

with moesaic's own FLOP count (`Transformer.flops_per_token`, forward + backward, attention
and output heads included) of the model the run builds, computed on the meta device from the
run's own config. The cosine schedule spans each run's steps; warmup is `warmup_fraction` of
them. Sizes are `WIDTHxLAYERS`: `model.dim = WIDTH`, `model.layers = LAYERS`, `model.heads =
WIDTH / head_dim`, `model.ffn.hidden = ffn_ratio · WIDTH`.

N is the active non-embedding parameter count: the parameters of the transformer blocks and
the final norm a token uses (routed experts it does not run excluded), without the token
embedding, the text head and the image input / output projections. At micro scale the
embeddings are a large share of all parameters, and each modality's run carries the other
modality's unused input and output maps; leaving them out keeps N the same model-size
measure for both modalities and all arms. D is the tokens a run trains on (every position of
its batches). Fits and their bootstrap: `analysis/scaling.py`.

A run's name and config depend only on its own arm, modality, budget, size and seed, so adding
a budget, a size or a seed reuses every finished run.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moesaic.analysis import scaling
from moesaic.analysis.stats import Stat, format_range
from moesaic.config import Config, load_config
from moesaic.errors import ConfigError
from moesaic.experiments.arms import get_arm
from moesaic.experiments.engine import RunResult, RunSpec, base_config, run_name, tokenizer_for
from moesaic.experiments.study import StudyConfig
from moesaic.model.sizes import config_sizes

MODALITIES = ("text", "image")
LOSS_KEYS = {"text": "text/text", "image": "image/image"}
LOSS_LABELS = {"text": "text CE (nats)", "image": "image flow MSE (caption→image)"}
# Tong et al. 2026 (arXiv 2603.03276): (a, b) per (modality, FFN kind)
PAPER = {
    ("text", "dense"): (0.47, 0.53),
    ("image", "dense"): (0.37, 0.63),
    ("text", "moe"): (0.41, 0.59),
    ("image", "moe"): (0.36, 0.64),
}
SIZE = re.compile(r"^(\d+)x(\d+)$")

_MICRO = [
    "data.seq_len=64",
    "data.batch_size=4",
    "data.vocab_size=512",
    "train.threads=1",
    "train.checkpoint_every=0",
    "eval.every=0",
    "logging.progress=none",
]

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds: exercises the machinery (used by the tests); the fits are noise.
    "smoke": {
        "name": "isoflop-smoke",
        "base": "tiny",
        "overrides": [*_MICRO, "eval.batches=2", "logging.every=5"],
        "budgets": [5e8, 1e9],
        "sizes": ["16x1", "32x1", "48x1"],
        "experts": 4,
        "granularity": 2,
        "bootstrap": 200,
        "description": "end-to-end check of the IsoFLOP machinery; the fits are not meaningful",
    },
    # CPU, 2 jobs: micro models; 2x2 patches (12 values) so that no width is narrower than a
    # patch, which would cap the image loss of the small models by their output projection.
    # lr 1e-2 for every size and 16-row batches: the best of a pilot over lr 3e-3 / 1e-2 / 3e-2
    # and 4 / 8 / 16 rows (docs/study-isoflop.md); budgets chosen so that both modalities'
    # optimum lies inside the sizes at every budget.
    "quick": {
        "name": "isoflop-quick",
        "base": "tiny",
        "overrides": [
            *_MICRO,
            "data.seq_len=96",
            "data.batch_size=16",
            "data.patch_size=2",
            "train.lr=1e-2",
            "eval.batches=16",
            "logging.every=50",
        ],
        "budgets": [1.5e11, 3e11, 6e11],
        "sizes": ["16x1", "16x2", "24x2", "32x2", "48x2", "64x2"],
        "head_dim": 8,
        "experts": 8,
        "granularity": 2,
        "seeds": 2,
        "jobs": 2,
        "description": "CPU-sized IsoFLOP study: micro models, 3 budgets x 6 sizes, 2 seeds",
    },
    # One GPU (documented, not run here): the `small` preset's data (seq 1024 x 32 rows,
    # 32x32 images), sizes from 4M to 113M active non-embedding parameters, 2 seeds.
    "gpu": {
        "name": "isoflop-gpu",
        "base": "small",
        "overrides": [
            "train.checkpoint_every=2000",
            "eval.every=0",
            "eval.batches=16",
            "logging.every=50",
            "logging.progress=plain",
        ],
        "budgets": [3e16, 1e17, 3e17],
        "sizes": ["256x4", "384x6", "512x8", "640x10", "768x12"],
        "head_dim": 64,
        "experts": 16,
        "granularity": 4,
        "seeds": 2,
        "description": "GPU scale: 3 budgets x 5 sizes (4M-113M N), dense and MoE, 2 seeds",
    },
}


@dataclasses.dataclass
class IsoFlopConfig(StudyConfig):
    name: str = "isoflop"
    arms: list[str] = dataclasses.field(default_factory=lambda: ["dense", "moe"])
    modalities: list[str] = dataclasses.field(default_factory=lambda: list(MODALITIES))
    budgets: list[float] = dataclasses.field(default_factory=lambda: [3e10, 1e11, 3e11])
    sizes: list[str] = dataclasses.field(
        default_factory=lambda: ["16x2", "24x2", "32x2", "48x2", "64x2"]
    )
    head_dim: int = 16  # model.heads = width / head_dim
    ffn_ratio: int = 4  # model.ffn.hidden = ffn_ratio · width
    experts: int = 8  # E of the MoE arms
    granularity: int = 2  # G: experts of width F/G, G active per token
    image_mix: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"caption_image": 0.75, "image": 0.25}
    )
    warmup_fraction: float = 0.05  # train.warmup = round(fraction · steps)
    bootstrap: int = 1000  # bootstrap resamples of the fits
    bootstrap_seed: int = 0

    def validate(self) -> IsoFlopConfig:
        super().validate()
        _check_budgets(self.budgets)
        self.parsed_sizes()
        if not self.arms:
            raise ConfigError("study.arms is empty; name at least one arm, e.g. [dense, moe]")
        if len(set(self.arms)) != len(self.arms):
            raise ConfigError(f"study.arms={self.arms} repeats an arm")
        for arm in self.arms:
            get_arm(arm)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(
                f"study.modalities={self.modalities} must name text and/or image, once each"
            )
        for m in self.modalities:
            if m not in MODALITIES:
                raise ConfigError(f"study.modalities has '{m}'; use text and/or image")
        for key in ("head_dim", "ffn_ratio", "experts", "granularity", "bootstrap"):
            if getattr(self, key) < 1:
                raise ConfigError(f"study.{key}={getattr(self, key)} must be >= 1")
        if self.head_dim % 2:
            raise ConfigError(f"study.head_dim={self.head_dim} must be even (RoPE)")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"study.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        bad = [k for k in self.image_mix if k not in ("caption_image", "image")]
        if bad or sum(self.image_mix.values()) <= 0:
            raise ConfigError(
                f"study.image_mix={self.image_mix} must weight caption_image and/or image "
                "documents only (other kinds carry text loss)"
            )
        if any(get_arm(a).kind == "moe" for a in self.arms):
            if self.experts < 2 * self.granularity:
                raise ConfigError(
                    f"study.experts={self.experts} must be >= 2 x granularity "
                    f"({self.granularity}) so that routing has a choice"
                )
            for width, _ in self.parsed_sizes().values():
                if (self.ffn_ratio * width) % self.granularity:
                    raise ConfigError(
                        f"study.sizes width {width}: FFN width {self.ffn_ratio * width} is not "
                        f"divisible by study.granularity={self.granularity}"
                    )
        return self

    def parsed_sizes(self) -> dict[str, tuple[int, int]]:
        """size name → (width, layers), checked."""
        if len(self.sizes) < scaling.MIN_SIZES:
            raise ConfigError(
                f"study.sizes={self.sizes} has {len(self.sizes)} size(s); a parabola per "
                f"budget needs at least {scaling.MIN_SIZES} (4-5 recommended), e.g. "
                "[16x2, 32x2, 64x2]"
            )
        out = {}
        for text in self.sizes:
            m = SIZE.match(str(text))
            if not m or int(m[1]) < 1 or int(m[2]) < 1:
                raise ConfigError(
                    f"study.sizes has '{text}'; write each size as WIDTHxLAYERS, e.g. 32x2"
                )
            width, layers = int(m[1]), int(m[2])
            if width % self.head_dim:
                raise ConfigError(
                    f"study.sizes has '{text}': width {width} is not a multiple of "
                    f"study.head_dim={self.head_dim}"
                )
            if text in out:
                raise ConfigError(f"study.sizes repeats '{text}'")
            out[text] = (width, layers)
        return out

    def size_overrides(self, size: str) -> list[str]:
        width, layers = self.parsed_sizes()[size]
        return [
            f"model.dim={width}",
            f"model.layers={layers}",
            f"model.heads={width // self.head_dim}",
            f"model.ffn.hidden={self.ffn_ratio * width}",
        ]


def _check_budgets(budgets: list[float]) -> None:
    if not budgets:
        raise ConfigError(
            "study.budgets is empty; give the compute budgets in training FLOPs, e.g. "
            "[3e10, 1e11, 3e11]"
        )
    if len(budgets) < 2:
        raise ConfigError(
            f"study.budgets={budgets} has one budget; the exponents need at least 2 "
            "(3 or more recommended)"
        )
    labels = [budget_label(b) for b in budgets if b > 0]
    for b in budgets:
        if not b > 0:
            raise ConfigError(f"study.budgets has {b}; every budget must be > 0 FLOPs")
    if len(set(labels)) != len(labels):
        raise ConfigError(
            f"study.budgets={budgets} repeats a budget (to 3 significant digits); "
            "give distinct budgets"
        )


def budget_label(budget: float) -> str:
    """`1e+11` → `1e11`, `3.16e+10` → `3.16e10` (3 significant digits, for run names)."""
    mantissa, _, exponent = f"{budget:.3g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


# ----------------------------------------------------------------------------- model sizes


def model_sizes(cfg: Config) -> dict[str, float]:
    """`model.sizes.config_sizes` with the vocabulary of the run's tokenizer."""
    return config_sizes(cfg, tokenizer_for(cfg).vocab_size)


def steps_for(budget: float, sizes: dict[str, float]) -> int:
    """Optimizer steps that spend `budget` training FLOPs (to within half a step)."""
    return round(budget / (sizes["flops_per_token"] * sizes["tokens_per_step"]))


def _mix(mix: dict[str, float]) -> str:
    return json.dumps(mix, sort_keys=True)


def run_overrides(study: IsoFlopConfig, arm: str, modality: str, size: str, seed: int) -> list[str]:
    """Everything of a run but its steps and warmup (which follow from its FLOPs)."""
    mix = {"text": 1.0} if modality == "text" else dict(study.image_mix)
    return [
        *get_arm(arm).overrides(study.experts, study.granularity),
        *study.size_overrides(size),
        f"data.mix={_mix(mix)}",
        "data.caption_loss=false",
        f"train.seed={seed}",
        f"data.seed={seed}",
    ]


# ----------------------------------------------------------------------------- the experiment


class IsoFlop:
    name = "isoflop"
    config_class = IsoFlopConfig
    presets = PRESETS

    def plan(self, study: IsoFlopConfig, study_dir: Path, log: Callable) -> list[RunSpec]:
        """Every run; the largest budgets first, so the longest runs start early."""
        specs = []
        for seed in study.seed_list():
            for budget in sorted(study.budgets, reverse=True):
                for arm in study.arms:
                    for modality in study.modalities:
                        for size in study.sizes:
                            specs.append(self._spec(study, arm, modality, budget, size, seed))
        return specs

    def _spec(
        self, study: IsoFlopConfig, arm: str, modality: str, budget: float, size: str, seed: int
    ) -> RunSpec:
        over = run_overrides(study, arm, modality, size, seed)
        sizes = model_sizes(base_config(study, over))
        per_step = sizes["flops_per_token"] * sizes["tokens_per_step"]
        if budget < per_step:
            raise ConfigError(
                f"study.budgets has {budget:.3g} FLOPs, less than one training step of size "
                f"{size} ({arm}, {modality}: {per_step:.3g} FLOPs = FLOPs/token x tokens/step); "
                f"raise the budget to at least {per_step:.3g} or use smaller study.sizes"
            )
        steps = steps_for(budget, sizes)
        warmup = round(study.warmup_fraction * steps)
        tags = (
            ("arm", arm),
            ("modality", modality),
            ("budget", budget),
            ("size", size),
            ("seed", seed),
        )
        name = run_name(arm, modality, f"c{budget_label(budget)}", size, f"s{seed}")
        return RunSpec(name, (*over, f"train.steps={steps}", f"train.warmup={warmup}"), tags)

    def after_run(self, study: IsoFlopConfig, spec: RunSpec, run_dir: Path) -> dict[str, Any]:
        return {}

    def summarize(
        self, study: IsoFlopConfig, study_dir: Path, results: list[RunResult], log: Callable
    ) -> dict[str, Any]:
        return summarize(study, results)

    def report(self, summary: dict[str, Any], study_dir: Path) -> Any:
        from moesaic.report.isoflop import isoflop_report

        return isoflop_report(summary)

    def console(self, summary: dict[str, Any]) -> str:
        return console_text(summary)


# ----------------------------------------------------------------------------- the summary


def _points(study: IsoFlopConfig, results: list[RunResult]) -> dict[str, dict[str, list]]:
    """modality → arm → one entry per (budget, size), budgets ascending, sizes by N: the
    sizes, steps, tokens and FLOPs read from the runs' own summaries, the loss over seeds."""
    by = {tuple(r.spec.tag(k) for k in ("arm", "modality", "budget", "size", "seed")): r
          for r in results}  # fmt: skip
    seeds = study.seed_list()
    out: dict[str, dict[str, list]] = {}
    for modality in study.modalities:
        out[modality] = {}
        for arm in study.arms:
            rows = []
            for budget in sorted(study.budgets):
                for size in study.sizes:
                    runs = [by[(arm, modality, budget, size, s)] for s in seeds]
                    first = runs[0]
                    n = model_sizes(load_config(first.run_dir / "config.yaml"))["params_n"]
                    rows.append(
                        {
                            "budget": budget,
                            "size": size,
                            "params_n": n,
                            "params_active": first.summary["params_active"],
                            "params_total": first.summary["params_total"],
                            "flops_per_token": first.summary["flops_per_token"],
                            "steps": [r.summary["step"] for r in runs],
                            "tokens": [r.summary["tokens"] for r in runs],
                            "train_flops": [r.summary["train_flops"] for r in runs],
                            "loss": Stat.of(
                                [r.summary["eval"][LOSS_KEYS[modality]] for r in runs]
                            ).to_dict(),
                            "runs": [r.spec.name for r in runs],
                        }
                    )
            rows.sort(key=lambda p: (p["budget"], p["params_n"]))
            out[modality][arm] = rows
    return out


def _as_points(rows: list[dict[str, Any]], budgets: list[float]) -> scaling.IsoFlopPoints:
    grid = [[p for p in rows if p["budget"] == b] for b in budgets]
    return scaling.IsoFlopPoints.of(
        budgets,
        [[p["params_n"] for p in g] for g in grid],
        [[float(np.mean(p["tokens"])) for p in g] for g in grid],
        [[p["loss"]["values"] for p in g] for g in grid],
    )


def frontier(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The loss-vs-compute frontier: runs (seed-mean loss at their mean training FLOPs) that
    reach a lower loss than every run with less or equal compute — the cheapest way found to
    reach each loss."""
    ranked = sorted(rows, key=lambda p: (float(np.mean(p["train_flops"])), p["loss"]["mean"]))
    out, best = [], float("inf")
    for p in ranked:
        if p["loss"]["mean"] < best:
            best = p["loss"]["mean"]
            out.append(
                {
                    "flops": float(np.mean(p["train_flops"])),
                    "loss": best,
                    "size": p["size"],
                    "budget": p["budget"],
                    "params_n": p["params_n"],
                }
            )
    return out


def _paper(modality: str, arm: str) -> tuple[float, float] | None:
    kind = get_arm(arm).kind
    return PAPER.get((modality, kind)) if kind in ("dense", "moe") else None


def verdict(
    stat: dict[str, Any], paper: float | None, bracketed: bool, claim: str
) -> dict[str, str]:
    """Plain verdict on a claim "difference > 0" from its 95 % bootstrap interval.

    `matches`: the interval lies above 0. `differs`: it lies below 0, or it contains 0 but
    excludes the paper's value (no difference as large as the paper's). `inconclusive`: the
    interval contains both 0 and the paper's value, it has no spread (one seed and three sizes
    leave nothing to resample), or some optimum is not bracketed by the sizes."""
    low, high = stat["ci95"]
    if not bracketed:
        return {"verdict": "inconclusive", "why": f"{claim}: an optimum is not bracketed by the "
                "sizes at some budget, so the exponents are extrapolated"}  # fmt: skip
    if not high > low:
        return {"verdict": "inconclusive", "why": f"{claim}: the bootstrap has no spread (one "
                "seed and three sizes leave nothing to resample); add seeds or sizes"}  # fmt: skip
    paper_in = paper is not None and low <= paper <= high
    paper_txt = "" if paper is None else (
        f"; the paper's {paper:+.2f} is {'inside' if paper_in else 'outside'} the interval"
    )  # fmt: skip
    if low > 0:
        return {"verdict": "matches", "why": f"{claim}: the 95 % interval is above 0{paper_txt}"}
    if high < 0:
        return {"verdict": "differs", "why": f"{claim}: the 95 % interval is below 0{paper_txt}"}
    if paper is not None and not paper_in:
        return {"verdict": "differs", "why": f"{claim}: the 95 % interval contains 0 and "
                f"excludes a difference as large as the paper's {paper:+.2f}"}  # fmt: skip
    return {"verdict": "inconclusive", "why": f"{claim}: the 95 % interval contains 0{paper_txt}"}


def summarize(study: IsoFlopConfig, results: list[RunResult]) -> dict[str, Any]:
    budgets = sorted(study.budgets)
    points = _points(study, results)
    groups = {
        (m, arm): _as_points(points[m][arm], budgets)
        for m in study.modalities
        for arm in study.arms
    }
    boot = scaling.bootstrap_isoflop(groups, study.bootstrap, study.bootstrap_seed)
    fits: dict[str, dict[str, Any]] = {m: {} for m in study.modalities}
    for (m, arm), pts in groups.items():
        fit = scaling.isoflop_fit(pts)
        samples = boot[(m, arm)]
        for k, per_budget in enumerate(fit["budgets"]):
            for key, log_key in (("n_opt", "log_n_opt"), ("d_opt", "log_d_opt")):
                low, high = scaling.percentile_interval(np.exp(samples[log_key][:, k]))
                per_budget[f"{key}_ci95"] = [low, high]
        paper = _paper(m, arm)
        fits[m][arm] = {
            **fit,
            "a": scaling.bootstrap_stat(fit["a"], samples["a"]),
            "b": scaling.bootstrap_stat(fit["b"], samples["b"]),
            "paper": None if paper is None else {"a": paper[0], "b": paper[1]},
            "edge_share": float(1.0 - samples["interior_n"].all(axis=1).mean()),
        }
        names = [p["size"] for p in points[m][arm] if p["budget"] == budgets[0]]  # by N
        refits = scaling.leave_one_size_out(pts)  # [] with too few sizes to leave one out
        without = dict(zip(names, refits, strict=True)) if refits else {}
        fits[m][arm]["one_size_out"] = {
            "without": without,
            "a_range": _range([v["a"] for v in without.values()]),
            "b_range": _range([v["b"] for v in without.values()]),
        }
    gaps: dict[str, Any] = {}
    if set(MODALITIES) <= set(study.modalities):
        for arm in study.arms:
            entry = {}
            for key in ("a", "b"):
                est = fits["text"][arm][key]["estimate"] - fits["image"][arm][key]["estimate"]
                entry[key] = scaling.bootstrap_stat(
                    est, boot[("text", arm)][key] - boot[("image", arm)][key]
                )
            pt, pi = _paper("text", arm), _paper("image", arm)
            entry["paper_a"] = None if pt is None or pi is None else round(pt[0] - pi[0], 4)
            entry["bracketed"] = fits["text"][arm]["bracketed"] and fits["image"][arm]["bracketed"]
            entry["one_size_out_a"] = _range(list(_gap_without(fits, arm).values()))
            entry["verdict"] = verdict(
                entry["a"], entry["paper_a"], entry["bracketed"],
                f"a_text − a_image ({arm})",
            )  # fmt: skip
            gaps[arm] = entry
    gap_differences: dict[str, Any] = {}
    base = study.arms[0]
    for arm in study.arms[1:] if gaps else []:

        def gap(a: str) -> np.ndarray:
            return boot[("text", a)]["a"] - boot[("image", a)]["a"]

        est = gaps[base]["a"]["estimate"] - gaps[arm]["a"]["estimate"]
        stat = scaling.bootstrap_stat(est, gap(base) - gap(arm))
        pb, pa = gaps[base]["paper_a"], gaps[arm]["paper_a"]
        paper = None if pb is None or pa is None else round(pb - pa, 4)
        bracketed = gaps[base]["bracketed"] and gaps[arm]["bracketed"]
        claim = f"gap({base}) − gap({arm})"
        base_gaps, arm_gaps = _gap_without(fits, base), _gap_without(fits, arm)
        gap_differences[arm] = {
            "a": stat,
            "one_size_out_a": _range([g - arm_gaps[s] for s, g in base_gaps.items()]),
            "paper": paper,
            "verdict": verdict(stat, paper, bracketed, claim),
        }
    return {
        "metrics": {m: {"key": LOSS_KEYS[m], "label": LOSS_LABELS[m]} for m in study.modalities},
        "budgets": budgets,
        "sizes": {
            s: dict(zip(("width", "layers"), wl, strict=True))
            for s, wl in study.parsed_sizes().items()
        },  # fmt: skip
        "params": "active non-embedding (blocks + final norm)",
        "points": points,
        "fits": fits,
        "gaps": gaps,
        "gap_differences": gap_differences,
        "frontier": {m: {arm: frontier(points[m][arm]) for arm in study.arms} for m in points},
        "budget_error_steps": _budget_error(points),
        "total_flops": sum(
            sum(p["train_flops"]) for m in points.values() for rows in m.values() for p in rows
        ),  # fmt: skip
        "bootstrap": {
            "resamples": study.bootstrap,
            "seed": study.bootstrap_seed,
            "method": "seeds (jointly over groups) + residuals of the fit points",
        },
        "verdict": overall_verdict(gaps, gap_differences),
    }


def _range(values: list[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


def _gap_without(fits: dict[str, dict[str, Any]], arm: str) -> dict[str, float]:
    """size → a_text − a_image of `arm` with that size left out of both modalities' fits."""
    text, image = (fits[m][arm]["one_size_out"]["without"] for m in MODALITIES)
    return {size: text[size]["a"] - image[size]["a"] for size in text}


def _budget_error(points: dict[str, dict[str, list]]) -> float:
    """Largest |steps − budget / FLOPs per step| over all runs (≤ 0.5 by construction)."""
    worst = 0.0
    for rows in (r for m in points.values() for r in m.values()):
        for p in rows:
            for steps, tokens in zip(p["steps"], p["tokens"], strict=True):
                per_step = p["flops_per_token"] * tokens / steps
                worst = max(worst, abs(steps - p["budget"] / per_step))
    return worst


def overall_verdict(gaps: dict[str, Any], gap_differences: dict[str, Any]) -> str:
    """One line: the asymmetry of the first arm and the change of it in the other arms."""
    if not gaps:
        return "inconclusive: the asymmetry needs both modalities"
    parts = [f"{arm}: {g['verdict']['verdict']}" for arm, g in gaps.items()]
    parts += [f"gap difference {arm}: {d['verdict']['verdict']}"
              for arm, d in gap_differences.items()]  # fmt: skip
    return "; ".join(parts)


def console_text(summary: dict[str, Any]) -> str:
    n = summary["bootstrap"]["resamples"]
    lines = [f"exponents N_opt ∝ C^a, D_opt ∝ C^b (95 % bootstrap intervals, {n} resamples):"]
    lines.append(f"  {'modality':<8} {'arm':<10} {'a':<24} {'b':<24} {'paper a / b':<13} "
                 "a, one size left out")  # fmt: skip
    for m, per_arm in summary["fits"].items():
        for arm, fit in per_arm.items():
            cells = [_fmt(fit[k]) for k in ("a", "b")]
            paper = fit["paper"]
            ref = "—" if paper is None else f"{paper['a']:.2f} / {paper['b']:.2f}"
            edge = "" if fit["bracketed"] else "  (optimum not bracketed)"
            grid = format_range(fit["one_size_out"]["a_range"])
            lines.append(f"  {m:<8} {arm:<10} {cells[0]:<24} {cells[1]:<24} {ref:<13} {grid}{edge}")
    for arm, g in summary["gaps"].items():
        paper = "—" if g["paper_a"] is None else f"{g['paper_a']:+.2f}"
        lines.append(f"a_text − a_image ({arm}): {_fmt(g['a'], True)}  paper {paper}  "
                     f"one size left out {format_range(g['one_size_out_a'], signed=True)}  "
                     f"→ {g['verdict']['verdict']}")  # fmt: skip
    for arm, d in summary["gap_differences"].items():
        paper = "—" if d["paper"] is None else f"{d['paper']:+.2f}"
        lines.append(f"gap difference ({arm}): {_fmt(d['a'], True)}  paper {paper}  "
                     f"one size left out {format_range(d['one_size_out_a'], signed=True)}  "
                     f"→ {d['verdict']['verdict']}")  # fmt: skip
    lines.append(f"verdict: {summary['verdict']}")
    return "\n".join(lines)


def _fmt(stat: dict[str, Any], signed: bool = False) -> str:
    from moesaic.analysis.stats import format_interval

    return format_interval(stat["estimate"], *stat["ci95"], digits=3, signed=signed)


EXPERIMENT = IsoFlop()
