"""The study configuration of `moesaic compete` and its presets (smoke, quick, paper).

A study is a base training config (a preset such as `tiny`, plus dotted overrides shared by
every run), a list of arms, a number of seeds and the per-modality step budgets. A study YAML
file holds `StudyConfig` fields and may name a `preset:` whose values it overrides; dotted
overrides on the command line starting with `study.` set study fields, all others are
training-config overrides appended to `overrides`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from moesaic.config import from_dict, parse_override, read_yaml
from moesaic.errors import ConfigError, did_you_mean
from moesaic.experiments.arms import DEFAULT_ARMS, get_arm


@dataclasses.dataclass
class StudyConfig:
    name: str = "compete"
    base: str = "tiny"  # training preset or YAML path every run starts from
    overrides: list[str] = dataclasses.field(default_factory=list)  # for every run
    arms: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_ARMS))
    seeds: int = 1  # seeds first_seed, first_seed+1, ... (train.seed and data.seed)
    first_seed: int = 0
    text_steps: int = 300  # optimizer steps of the text-only run
    image_steps: int = 300  # optimizer steps of the image-only run (joint = sum)
    # image-only data: shares of document tokens of caption→image pairs and bare images
    image_mix: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"caption_image": 0.75, "image": 0.25}
    )
    experts: int = 16  # E of the MoE arms (moe-total-matched uses 2G)
    granularity: int = 4  # G: experts of width F/G, G active per token
    lr: dict[str, float] = dataclasses.field(default_factory=dict)  # per-arm train.lr
    analyze: bool = True  # specialisation + sparsity of every arm's joint run (first seed)
    analyze_tokens: str = "last"  # last | all: hidden vectors used for sparsity
    tasks: bool = False  # task scores (captioning, text-to-image, VQA) via evaluate.tasks
    task_examples: int = 200  # held-out examples per task
    jobs: int = 1  # runs trained in parallel processes (results do not depend on it)
    description: str = ""

    def validate(self) -> StudyConfig:
        if not self.name or "/" in self.name:
            raise ConfigError(f"study.name='{self.name}' must be a non-empty name without '/'")
        for key in (
            "seeds",
            "text_steps",
            "image_steps",
            "experts",
            "granularity",
            "jobs",
            "task_examples",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"study.{key}={getattr(self, key)} must be >= 1")
        if not self.arms:
            raise ConfigError("study.arms is empty; name at least one arm, e.g. [dense, moe]")
        for arm in self.arms:
            get_arm(arm)
        for arm in self.lr:
            if arm not in self.arms:
                raise ConfigError(f"study.lr names arm '{arm}', which is not in study.arms")
        bad = [k for k in self.image_mix if k not in ("caption_image", "image")]
        if bad:
            raise ConfigError(
                f"study.image_mix has '{bad[0]}'; the image-only runs use caption_image and "
                "image documents only (other kinds carry text loss)"
            )
        if sum(self.image_mix.values()) <= 0:
            raise ConfigError("study.image_mix has no positive weight")
        if self.analyze_tokens not in ("last", "all"):
            raise ConfigError(f"study.analyze_tokens='{self.analyze_tokens}' must be last or all")
        if self.experts < 2 * self.granularity and any(
            get_arm(a).experts == "E" for a in self.arms
        ):
            raise ConfigError(
                f"study.experts={self.experts} must be >= 2 x granularity ({self.granularity}) "
                "so that routing has a choice"
            )
        return self


_MICRO_MODEL = [
    "model.dim=32",
    "model.layers=2",
    "model.heads=2",
    "model.ffn.hidden=64",
    "data.seq_len=64",
    "data.batch_size=4",
    "data.vocab_size=512",
]

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds: exercises every stage end to end (used by the tests); numbers are noise.
    "smoke": {
        "name": "compete-smoke",
        "base": "tiny",
        "overrides": [
            *_MICRO_MODEL,
            "train.warmup=2",
            "train.threads=1",
            "train.checkpoint_every=0",
            "eval.every=4",
            "eval.batches=1",
            "logging.every=2",
            "logging.progress=none",
        ],
        "text_steps": 6,
        "image_steps": 6,
        "experts": 8,
        "granularity": 2,
        "description": "end-to-end check of the study machinery; losses are not meaningful",
    },
    # Minutes on 2 CPU cores (`make demo`): a 4-layer, 64-wide model, 400 + 400 steps.
    "quick": {
        "name": "compete-quick",
        "base": "tiny",
        "overrides": [
            "model.dim=64",
            "model.layers=4",
            "model.heads=2",
            "model.ffn.hidden=256",
            "model.ffn.z_loss=1e-4",
            "data.seq_len=128",
            "data.batch_size=8",
            "data.vocab_size=1024",
            "train.lr=3e-3",
            "train.warmup=30",
            "train.threads=1",
            "train.checkpoint_every=200",
            "eval.every=100",
            "eval.batches=4",
            "logging.every=10",
            "logging.progress=none",
        ],
        "text_steps": 400,
        "image_steps": 400,
        "experts": 16,
        "granularity": 4,
        "jobs": 2,
        "description": "CPU-sized study: every arm's tax on the built-in world",
    },
    # One GPU, hours (documented, not run in CI): the `small` preset (12 × 768, 32×32 images).
    "paper": {
        "name": "compete-paper",
        "base": "small",
        "overrides": ["model.ffn.z_loss=1e-4", "eval.every=1000", "logging.progress=plain"],
        "arms": ["dense", "modality", "moe", "moe-total-matched", "moe-shared-per-modality"],
        "seeds": 3,
        "text_steps": 10000,
        "image_steps": 10000,
        "experts": 64,
        "granularity": 4,
        "analyze_tokens": "all",
        "tasks": True,
        "task_examples": 500,
        "description": "GPU scale: small preset, 64 experts of width F/4, 3 seeds",
    },
}


def study_from_dict(data: dict[str, Any]) -> StudyConfig:
    return from_dict(StudyConfig, data, "study").validate()


def load_study(
    config: str | None = None, preset: str | None = None, overrides: list[str] | None = None
) -> StudyConfig:
    """Preset → study YAML (which may name `preset:`) → dotted overrides → validated config."""
    data: dict[str, Any] = {}
    file_data: dict[str, Any] = {}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"study file '{config}' does not exist")
        file_data = read_yaml(path, "study file")
        preset = preset or file_data.pop("preset", None)
        file_data.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown study preset '{preset}'{did_you_mean(preset, PRESETS)}")
        data = dict(PRESETS[preset])
    data = {**data, **file_data}
    train_overrides = list(data.get("overrides", []))
    for text in overrides or []:
        keys, value = parse_override(text)
        if keys[0] == "study":
            if len(keys) < 2:
                raise ConfigError(f"override '{text}' names no study field (study.seeds=3)")
            node = data
            for key in keys[1:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = value
        else:
            train_overrides.append(text)
    data["overrides"] = train_overrides
    return study_from_dict(data)
