"""The caption-shift experiment: is the text tax caused by captions rather than by vision?

Two claims are tested at equal general-text tokens. (a) Friction with general language comes
from the *caption distribution* — captions are a narrow, shifted slice of language and training
on them pulls the model away from general text — while vision itself is complementary to
language. (b) Sparse capacity (MoE) shrinks that caption-induced tax.

For every architecture arm, seed and caption register r, step-matched runs (`data.parts`: each
batch is the reference run's text batch stacked with one batch of the other part, so
general-text tokens, steps and learning-rate schedule equal the reference's):

    T        text only (the reference; one per arm and seed)
    T+I      text + bare images: vision without any caption language (`image` documents)
    T+C_r    text + captions as plain text, no images (`caption` documents: bos caption eos)
    T+IC_r   text + image→caption documents, the caption a text target (`image_caption`)
    T+CI_r   text + caption→image documents, caption loss `study.caption_loss` (optional)

Caption document g is image_caption document g's caption (the same scene, the same words), so
T+C_r and T+IC_r train on the same captions in the same order; only the pixels differ (T+C_r
packs more captions into a row, so it sees more of them per step: `dose` in the summary).

Both parts' text targets share one mean (the text loss is a mean over all text targets of the
step), so captions also take a share of the text gradient; that share (`dose.caption_share`)
is about equal across registers, so the regression across registers isolates the shift.

Caption shift per register and seed: the Jensen–Shannon divergence of token unigram and bigram
distributions of captions vs general text (`data/shift.py`, the seed's tokenizer), and the
embedding distance 1 − cos(mean h_caption, mean h_text), h the last block's output at every
non-padding position but `bos`, measured with each arm's **T model**: a ruler untouched by any
caption, the same for every register within an arm and seed, so distances differ only by the
captions (the T+C_r model would be shaped by the very captions it measures).

Data. By default the built-in world, whose caption registers are generated from the same
scenes. On real data (`study.text_source`, `study.caption_sources`, `caption_sources.py`) T's
general text comes from a text source and each register is an image–caption source; bare
images for T+I come from one of them (`study.image_source`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from moesaic.experiments import caption_sources as real
from moesaic.experiments.arms import get_arm
from moesaic.experiments.caption_study import (
    CONDITIONS,
    PRESETS,
    REFERENCE,
    CaptionShiftConfig,
    cached_distance,
    check_source,
    condition_overrides,
)
from moesaic.experiments.engine import RunResult, RunSpec, run_name
from moesaic.model.sizes import config_sizes


def planned_flops(study: CaptionShiftConfig) -> dict[str, float]:
    """Training FLOPs of every planned run (6·N_matmul + attention per token, `moesaic info`)
    times the positions it trains on (steps × rows × seq_len, both parts of a stacked batch):
    {"total", per arm, "tokens"}. Needs no tokenizer and trains nothing."""
    from moesaic.experiments.engine import run_config

    out: dict[str, float] = {"total": 0.0, "tokens": 0.0}
    for spec in EXPERIMENT.plan(study, Path("."), lambda _: None):
        cfg = run_config(study, spec, Path("."))
        rows = cfg.data.batch_size * max(1, len(cfg.data.parts))
        tokens = float(cfg.train.steps * cfg.train.grad_accum * rows * cfg.data.seq_len)
        flops = config_sizes(cfg)["flops_per_token"] * tokens
        arm = spec.tag("arm")
        out[arm] = out.get(arm, 0.0) + flops
        out["total"] += flops
        out["tokens"] += tokens
    return out


# ----------------------------------------------------------------------------- the experiment


class CaptionShift:
    name = "caption-shift"
    config_class = CaptionShiftConfig
    presets = PRESETS

    def plan(self, study: CaptionShiftConfig, study_dir: Path, log: Callable) -> list[RunSpec]:
        """Seed-major: per seed and arm the reference, then every condition (per register)."""
        check_source(study)
        specs = []
        for seed in study.seed_list():
            for arm_name in study.arms:
                arm_over = get_arm(arm_name).overrides(study.experts, study.granularity)
                if arm_name in study.lr:
                    arm_over.append(f"train.lr={study.lr[arm_name]}")
                cells: list[tuple[str, str | None]] = [(REFERENCE, None)]
                for cond in study.conditions:
                    per = CONDITIONS[cond].per_register
                    cells += [(cond, r) for r in study.registers] if per else [(cond, None)]
                for cond, register in cells:
                    over = condition_overrides(study, cond, register, seed)
                    tags = (
                        ("arm", arm_name),
                        ("condition", cond),
                        ("register", register),
                        ("seed", seed),
                    )
                    name = run_name(arm_name, cond, register, f"s{seed}")
                    specs.append(RunSpec(name, tuple([*arm_over, *over]), tags))
        return specs

    def after_run(self, study: CaptionShiftConfig, spec: RunSpec, run_dir: Path) -> dict:
        if spec.tag("condition") != REFERENCE or not study.registers:
            return {}
        sources = None
        if real.uses_real_data(study):
            sources = {r: real.caption_source(study, r, "caption") for r in study.registers}
        distance = cached_distance(run_dir, study.registers, study.distance_batches, sources)
        return {"distance": distance}

    def summarize(
        self, study: CaptionShiftConfig, study_dir: Path, results: list[RunResult], log: Callable
    ) -> dict[str, Any]:
        from moesaic.experiments.caption_shift_summary import summarize

        return summarize(study, results, log)

    def report(self, summary: dict[str, Any], study_dir: Path) -> Any:
        from moesaic.report.caption_shift import caption_shift_report

        return caption_shift_report(summary)

    def console(self, summary: dict[str, Any]) -> str:
        from moesaic.experiments.caption_shift_summary import console_text

        return console_text(summary)


EXPERIMENT = CaptionShift()
