"""The modality-tax study (`moesaic compete`): per arm, a text-only, an image-only and a joint run.

Same data. With seed s every run uses `data.seed = train.seed = s`; a document of a given kind
and index is a pure function of the data seed (`data/packing.py`), whatever the mix, so the
joint run draws the same text documents as the text-only run and the same image documents as
the image-only run. `data.caption_loss = false` everywhere: captions condition images and carry
no text loss, so every loss-bearing token of the joint run is one a unimodal run also trains on.
All arms of a seed see identical data at the same active FFN compute per token.

Fair comparison (`study.match`, design.md §5):

* `steps` (default) — the joint run takes exactly the unimodal runs' optimizer steps and
  learning-rate schedule, and each of its batches stacks one text-only batch and one image-only
  batch (`data.parts`, `data/stacked.py`): per-modality tokens, per-modality batch per step,
  steps and schedule are all equal; the only difference is the other modality's gradient in
  the same update.
* `tokens` — the joint run mixes both kinds in rows of one batch (`data.mix` = the unimodal
  runs' document tokens per kind, measured by replaying their streams) and takes as many steps
  as its stream needs to produce them (≈ twice the unimodal steps, each with about half of
  each modality's batch). Its **half-batch controls** — unimodal runs at half the batch and
  twice the steps — measure what more, smaller steps alone do to a unimodal run (the step
  effect), so it is reported rather than argued.

Video conditions (`study.video`, step-matched only): a video-only run (`data.mix =
study.video_mix`) and two joint runs whose batches stack the unimodal runs' own batches, text +
video (`data.parts = [text, video]`) and image + video (`[image mix, video]`). Part 0 of text +
video is the text-only run's batch and part 1 the video-only run's, bit for bit, so each
modality's tax in these conditions is paired exactly like the text + image joint run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from moesaic.config import Config
from moesaic.errors import ConfigError
from moesaic.experiments.arms import DEFAULT_ARMS, check_arms, check_routing_choice, get_arm
from moesaic.experiments.compete_presets import PRESETS
from moesaic.experiments.engine import (
    RunResult,
    RunSpec,
    base_config,
    run_name,
    tokenizer_for,
)
from moesaic.experiments.study import StudyConfig
from moesaic.files import atomic_write_text

MATCHES = ("steps", "tokens")
# variant -> which unimodal reference (None: the joint run)
VARIANTS = ("text", "image", "joint")
HALF_VARIANTS = ("text_half", "image_half")
# study.video: the video-only run and the two step-matched joint runs with video
VIDEO_VARIANTS = ("video", "text_video", "image_video")
VIDEO_KINDS = ("video", "action_video")


@dataclasses.dataclass
class CompeteConfig(StudyConfig):
    name: str = "compete"
    arms: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_ARMS))
    match: str = "steps"  # steps | tokens (see the module doc)
    steps: int = 300  # optimizer steps of each unimodal run (and of the joint run with steps)
    # image-only data: shares of document tokens of caption→image pairs and bare images
    image_mix: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"caption_image": 0.75, "image": 0.25}
    )
    experts: int = 16  # E of the MoE arms (moe-total-matched uses 2G)
    granularity: int = 4  # G: experts of width F/G, G active per token
    lr: dict[str, float] = dataclasses.field(default_factory=dict)  # per-arm train.lr
    analyze: bool = True  # specialisation + sparsity of every MoE arm's joint runs
    analyze_tokens: str = "last"  # last | all: hidden vectors used for sparsity
    tasks: bool = False  # task scores (captioning, text-to-image, VQA) via evaluate.tasks
    task_examples: int = 200  # held-out examples per task
    video: bool = False  # add the video-only run and the text + video, image + video runs
    # video-only data: shares of document tokens of bare clips and action-conditioned clips
    video_mix: dict[str, float] = dataclasses.field(default_factory=lambda: {"video": 1.0})
    # experiments built on this one that do not plan or report the video conditions say so
    has_video_conditions: ClassVar[bool] = True

    def validate(self) -> CompeteConfig:
        super().validate()
        if self.match not in MATCHES:
            raise ConfigError(
                f"study.match='{self.match}' is not one of {', '.join(MATCHES)}; steps gives "
                "the joint run the unimodal runs' steps, tokens their tokens"
            )
        for key in ("steps", "experts", "granularity", "task_examples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"study.{key}={getattr(self, key)} must be >= 1")
        check_arms(self.arms, self.lr)
        bad = [k for k in self.image_mix if k not in ("caption_image", "image")]
        if bad:
            raise ConfigError(
                f"study.image_mix has '{bad[0]}'; the image-only runs use caption_image and "
                "image documents only (other kinds carry text loss)"
            )
        if sum(self.image_mix.values()) <= 0:
            raise ConfigError("study.image_mix has no positive weight")
        bad = [k for k in self.video_mix if k not in VIDEO_KINDS]
        if bad:
            raise ConfigError(
                f"study.video_mix has '{bad[0]}'; the video-only runs use video and "
                "action_video documents only"
            )
        if sum(self.video_mix.values()) <= 0:
            raise ConfigError("study.video_mix has no positive weight")
        if self.video and not self.has_video_conditions:
            raise ConfigError(
                "study.video=true: this experiment has no video conditions; they belong to the "
                "tax experiment (moesaic compete --experiment tax)"
            )
        if self.video and self.match != "steps":
            raise ConfigError(
                f"study.video=true needs study.match=steps (got '{self.match}'): the video "
                "conditions stack the unimodal runs' batches"
            )
        if self.analyze_tokens not in ("last", "all"):
            raise ConfigError(f"study.analyze_tokens='{self.analyze_tokens}' must be last or all")
        check_routing_choice(self.experts, self.granularity, self.arms)
        return self


def _mix(mix: dict[str, float]) -> str:
    return json.dumps(mix, sort_keys=True)


def variant_overrides(
    study: CompeteConfig, variant: str, seed: int, plan: dict[str, Any] | None = None
) -> list[str]:
    """Data and step overrides of one variant (the arm's model overrides come separately).

    `plan` is the seed's token plan (`plan_tokens`), needed for the joint run of
    `match: tokens`.
    """
    common = ["data.caption_loss=false", f"train.seed={seed}", f"data.seed={seed}"]
    text, image = {"text": 1.0}, dict(study.image_mix)
    steps = f"train.steps={study.steps}"
    if variant == "text":
        return [*common, f"data.mix={_mix(text)}", steps]
    if variant == "image":
        return [*common, f"data.mix={_mix(image)}", steps]
    if variant == "video":  # the video variants exist only in studies with `video_mix`
        return [*common, f"data.mix={_mix(study.video_mix)}", steps]
    if variant in ("text_video", "image_video"):
        first = text if variant == "text_video" else image
        return [*common, f"data.parts=[{_mix(first)}, {_mix(study.video_mix)}]", steps]
    if variant in HALF_VARIANTS:
        cfg = base_config(study)
        half = cfg.data.batch_size // 2
        mix = text if variant == "text_half" else image
        return [
            *common,
            f"data.mix={_mix(mix)}",
            f"data.batch_size={half}",
            f"train.steps={2 * study.steps}",
        ]
    if study.match == "steps":
        return [*common, f"data.parts=[{_mix(text)}, {_mix(image)}]", steps]
    if plan is None:
        raise ValueError("the token-matched joint run needs the token plan's mix and steps")
    return [*common, f"data.mix={_mix(plan['mix'])}", f"train.steps={plan['steps']}"]


# ----------------------------------------------------------------------------- match: tokens

PLAN_VERSION = 3


def _key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _replay(cfg: Config, tok: Any, steps: int | None = None, tokens: int | None = None) -> dict:
    """Replay a run's training stream without a model: document tokens per kind after `steps`
    optimizer steps, or the steps after which it has produced `tokens` document tokens."""
    from moesaic.data import build_stream

    stream = build_stream(cfg.data, tok, split="train")
    batches = 0
    while (steps is not None and batches < steps * cfg.train.grad_accum) or (
        tokens is not None and sum(stream.produced.values()) < tokens
    ):
        next(stream)
        batches += 1
    return {"produced": dict(stream.produced), "steps": max(1, -(-batches // cfg.train.grad_accum))}


def plan_tokens(study: CompeteConfig, study_dir: Path, log: Callable) -> dict[str, Any]:
    """Per seed, the token-matched joint run: its mix (the unimodal runs' document tokens per
    kind) and its steps (the fewest after which its stream has produced as many document
    tokens as both unimodal streams together). Cached in `token-plan.json`."""
    path = study_dir / "token-plan.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    plan: dict[str, Any] = {}
    for seed in study.seed_list():
        tok = tokenizer_for(base_config(study, variant_overrides(study, "text", seed)))
        produced: dict[str, int] = {}
        for variant in ("text", "image"):
            cfg = base_config(study, variant_overrides(study, variant, seed))
            produced |= _replay(cfg, tok, steps=cfg.train.steps)["produced"]
        mix = {k: float(v) for k, v in sorted(produced.items())}
        cfg = base_config(study, variant_overrides(study, "joint", seed, {"mix": mix, "steps": 1}))
        key = _key(PLAN_VERSION, cfg.data.__dict__, cfg.train.grad_accum, produced)
        entry = cached.get(str(seed), {})
        if entry.get("key") != key:
            log(f"planning the token-matched joint run of seed {seed}")
            steps = _replay(cfg, tok, tokens=sum(produced.values()))["steps"]
            entry = {"key": key, "mix": mix, "steps": steps, "unimodal_tokens": produced}
        plan[str(seed)] = entry
    atomic_write_text(path, json.dumps({**cached, **plan}, indent=1))
    return plan


# ----------------------------------------------------------------------------- the experiment

# Tasks with a meaning for each variant: the image-only run also learns to generate from
# captions (the reference for text-to-image); captioning and VQA need both modalities.
VARIANT_TASKS = {"text": (), "image": ("t2i",), "joint": ("caption", "t2i", "vqa")}
# The video conditions have no task of their own (their frames have no captions).


def task_metrics(run_dir: Path, variant: str, n: int) -> dict[str, float]:
    """Task scores of a finished run (`moesaic.evaluate.tasks`), cached in its tasks.json."""
    from moesaic.evaluate.tasks import run_tasks
    from moesaic.train.runs import load_run

    tasks = VARIANT_TASKS.get(variant, ())
    if not tasks:
        return {}
    path = run_dir / "tasks.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("n") == n and cached.get("tasks") == list(tasks):
            return cached["metrics"]
    metrics = {k: float(v) for k, v in run_tasks(load_run(run_dir), tasks=tasks, n=n).items()}
    atomic_write_text(
        path, json.dumps({"n": n, "tasks": list(tasks), "metrics": metrics}, indent=1)
    )
    return metrics


class Compete:
    name = "tax"
    config_class = CompeteConfig

    presets = PRESETS

    def variants(self, study: CompeteConfig) -> tuple[str, ...]:
        half = HALF_VARIANTS if study.match == "tokens" else ()
        return VARIANTS + half + (VIDEO_VARIANTS if study.video else ())

    def plan(self, study: CompeteConfig, study_dir: Path, log: Callable) -> list[RunSpec]:
        """Every run, seed-major (a complete first seed comes first)."""
        if study.match == "tokens" and base_config(study).data.batch_size % 2:
            raise ConfigError(
                f"study.match=tokens runs half-batch controls: data.batch_size="
                f"{base_config(study).data.batch_size} must be even"
            )
        tokens = plan_tokens(study, study_dir, log) if study.match == "tokens" else {}
        specs = []
        for seed in study.seed_list():
            for arm_name in study.arms:
                arm = get_arm(arm_name)
                arm_over = arm.overrides(study.experts, study.granularity)
                if arm_name in study.lr:
                    arm_over.append(f"train.lr={study.lr[arm_name]}")
                for variant in self.variants(study):
                    over = variant_overrides(study, variant, seed, tokens.get(str(seed)))
                    tags = (("arm", arm_name), ("variant", variant), ("seed", seed))
                    name = run_name(arm_name, variant, f"s{seed}")
                    specs.append(RunSpec(name, tuple([*arm_over, *over]), tags))
        return specs

    def after_run(self, study: CompeteConfig, spec: RunSpec, run_dir: Path) -> dict[str, Any]:
        if not study.tasks:
            return {}
        return {"tasks": task_metrics(run_dir, spec.tag("variant"), study.task_examples)}

    def summarize(
        self, study: CompeteConfig, study_dir: Path, results: list[RunResult], log: Callable
    ) -> dict[str, Any]:
        from moesaic.experiments.tax_summary import summarize
        from moesaic.experiments.video_tax import summarize_video

        body = summarize(study, study_dir, results, log)
        if study.video:
            body["video"] = summarize_video(study, results)
        return body

    def report(self, summary: dict[str, Any], study_dir: Path) -> Any:
        from moesaic.report.study import study_report

        return study_report(summary, study_dir)

    def console(self, summary: dict[str, Any]) -> str:
        from moesaic.experiments.tax_summary import console_text
        from moesaic.experiments.video_tax import video_console

        text = console_text(summary)
        return f"{text}\n{video_console(summary['video'])}" if summary.get("video") else text


EXPERIMENT = Compete()
