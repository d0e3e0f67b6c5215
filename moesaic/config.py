"""Typed configuration tree: dataclasses, YAML load/save, dotted overrides, validation.

A config is loaded from a preset name (`tiny`, a file in `moesaic/configs/`) or a YAML path. A
YAML file may name a `base:` preset or path whose values it overrides. Command-line overrides
are dotted `key=value` pairs whose values are parsed as YAML (`model.ffn.experts=16`,
`train.lr=3e-3`, `data.mix.text=0.5`). Unknown keys and wrong types raise `ConfigError` with a
one-line message and a "did you mean" suggestion.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from moesaic.config_tree import (
    apply_overrides,
    deep_merge,
    from_dict,
    read_yaml,
)
from moesaic.errors import ConfigError, did_you_mean
from moesaic.primes import largest_primes, nth_prime

PRESET_DIR = Path(__file__).parent / "configs"


def _check_choice(path: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        extra = did_you_mean(value, choices, listing=False)
        raise ConfigError(f"{path}='{value}' is not one of {', '.join(choices)}{extra}")


def _check_positive(path: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path}={value} must be {bound}")


@dataclasses.dataclass
class FFNConfig:
    """The feed-forward variant: the independent variable of every study (design.md §4)."""

    kind: str = "dense"  # dense | modality | moe
    hidden: int = 512  # F: dense SwiGLU width = active FFN width per token in every kind
    experts: int = 8  # routed experts E (moe)
    granularity: int = 1  # G: each expert has width F/G
    top_k: int = 0  # experts active per token incl. shared ones; 0 means G (matched compute)
    shared: str = "none"  # none | global | per_modality: always-on experts of width F/G
    groups: str = "none"  # none | modality: MoMa-style experts partitioned per modality
    score: str = "softmax"  # softmax | sigmoid router scores
    renormalize: bool = True  # renormalise the top-k weights to sum to 1
    every: int = 1  # MoE in every n-th block (the others dense)
    aux_loss: float = 0.01  # α of the per-layer Switch load-balancing loss (0 = off)
    z_loss: float = 0.0  # β of the router z-loss (0 = off)
    bias_rate: float = 0.0  # γ of auxiliary-loss-free bias balancing (0 = off)
    dispatch: str = "auto"  # auto | native | grouped_mm | split
    # FFN weights of video-frame tokens: image (share the image modality's FFN, expert group
    # and shared expert: video frames are images) | own (a third, video-only one)
    video_ffn: str = "image"

    @property
    def modality_slots(self) -> int:
        """Modalities with their own FFN weights: text and image (+ video with video_ffn=own)."""
        return 3 if self.video_ffn == "own" else 2

    @property
    def active_experts(self) -> int:
        return self.top_k or self.granularity

    @property
    def expert_hidden(self) -> int:
        return self.hidden // self.granularity

    @property
    def routed_experts(self) -> int:
        """Routed experts per token: the active ones minus the always-on shared expert."""
        return self.active_experts - (0 if self.shared == "none" else 1)

    def validate(self, path: str = "model.ffn") -> None:
        _check_choice(f"{path}.kind", self.kind, ("dense", "modality", "moe"))
        _check_positive(f"{path}.hidden", self.hidden)
        _check_choice(f"{path}.video_ffn", self.video_ffn, ("image", "own"))
        if self.kind != "moe":
            return
        _check_choice(f"{path}.shared", self.shared, ("none", "global", "per_modality"))
        _check_choice(f"{path}.groups", self.groups, ("none", "modality"))
        _check_choice(f"{path}.score", self.score, ("softmax", "sigmoid"))
        _check_choice(f"{path}.dispatch", self.dispatch, ("auto", "native", "grouped_mm", "split"))
        for name in ("experts", "granularity", "every"):
            _check_positive(f"{path}.{name}", getattr(self, name))
        for name in ("aux_loss", "z_loss", "bias_rate"):
            _check_positive(f"{path}.{name}", getattr(self, name), allow_zero=True)
        if self.top_k < 0:
            raise ConfigError(f"{path}.top_k={self.top_k} must be >= 0 (0 means granularity)")
        if self.hidden % self.granularity:
            raise ConfigError(
                f"{path}.hidden={self.hidden} is not divisible by {path}.granularity="
                f"{self.granularity}; pick a granularity that divides the FFN width"
            )
        routed_k = self.routed_experts
        if routed_k < 1:
            raise ConfigError(
                f"{path}.top_k={self.active_experts} leaves no routed expert next to "
                f"shared='{self.shared}'; use top_k >= 2 or granularity >= 2"
            )
        n_groups = self.modality_slots if self.groups == "modality" else 1
        per_token_pool = self.experts // n_groups
        if self.experts % n_groups:
            what = "even" if n_groups == 2 else f"divisible by {n_groups}"
            names = "text and image" if n_groups == 2 else "text, image and video"
            raise ConfigError(
                f"{path}.experts={self.experts} must be {what} with groups='modality' "
                f"(experts are split equally between {names})"
            )
        if routed_k > per_token_pool:
            raise ConfigError(
                f"{path}.top_k={self.active_experts} needs {routed_k} routed experts per token "
                f"but only {per_token_pool} are available; raise {path}.experts or lower top_k"
            )


TEXT_KINDS = ("text", "caption_image", "image_caption", "vqa")


@dataclasses.dataclass
class MemoryConfig:
    """Hashed n-gram lookup memory added to the residual stream of chosen blocks
    (`model/memory.py`, docs/model-memory.md). Off while `layers` is empty."""

    layers: list[int] = dataclasses.field(default_factory=list)  # block indices (0-based)
    orders: list[int] = dataclasses.field(default_factory=lambda: [2, 3])  # n-gram orders >= 2
    heads: int = 4  # hash heads per order: one table each
    table_rows: int = 32768  # rows per table, rounded down to distinct primes (the moduli)
    dim: int = 32  # width of a table row
    conv_kernel: int = 4  # causal depthwise conv width inside the document (0 = no conv)
    lazy_adam: bool = True  # Adam updates only looked-up rows (false: dense AdamW, slow)

    @property
    def tables(self) -> int:
        """Tables per memory layer: one per (order, hash head)."""
        return len(self.orders) * self.heads

    def table_moduli(self) -> tuple[int, ...]:
        """Rows of each table, order-major (all heads of orders[0] first): the `tables`
        largest primes <= table_rows, so no two tables share a modulus."""
        return largest_primes(self.table_rows, self.tables)

    def validate(self, path: str = "model.memory", num_layers: int = 0) -> None:
        if not self.layers:
            return
        for i in self.layers:
            if not 0 <= i < num_layers:
                raise ConfigError(
                    f"{path}.layers contains {i}, but blocks are numbered 0..{num_layers - 1}; "
                    f"use indices in [0, {num_layers})"
                )
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"{path}.layers={self.layers} repeats a block; list each once")
        if not self.orders:
            raise ConfigError(f"{path}.orders is empty; give n-gram orders, e.g. [2, 3]")
        for n in self.orders:
            if n < 2:
                raise ConfigError(
                    f"{path}.orders contains {n}: an n-gram order must be >= 2 (order 1 is the "
                    "token embedding); use e.g. [2, 3]"
                )
        if len(set(self.orders)) != len(self.orders):
            raise ConfigError(f"{path}.orders={self.orders} repeats an order; list each once")
        for name, example in (("heads", 4), ("dim", 32)):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{path}.{name}={getattr(self, name)} must be >= 1; use e.g. {example}"
                )
        if self.conv_kernel < 0:
            raise ConfigError(
                f"{path}.conv_kernel={self.conv_kernel} must be >= 0; use 4, or 0 for no conv"
            )
        if len(self.table_moduli()) < self.tables:
            raise ConfigError(
                f"{path}.table_rows={self.table_rows} has fewer than {self.tables} primes below "
                f"it for {self.tables} tables ({len(self.orders)} orders x {self.heads} heads); "
                f"use table_rows >= {nth_prime(self.tables)}"
            )


@dataclasses.dataclass
class ModelConfig:
    """The unified transformer (design.md §1–3)."""

    dim: int = 128
    layers: int = 4
    heads: int = 4
    vocab_size: int = 0  # 0: taken from the tokenizer
    patch_dim: int = 0  # 0: taken from the data (patch_size² · channels)
    tie_embeddings: bool = False
    qk_norm: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    prediction: str = "velocity"  # velocity | x0: what the image head predicts
    image_loss_weight: float = 3.0  # λ in L = L_text + λ·(L_image + L_video)
    attention: str = "auto"  # auto | sdpa | flex (flex needs CUDA)
    # add an embedding of each patch's index inside its image / frame to the patch input
    patch_positions: bool = False
    ffn: FFNConfig = dataclasses.field(default_factory=FFNConfig)
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)

    def validate(self, path: str = "model") -> None:
        for name in ("dim", "layers", "heads"):
            _check_positive(f"{path}.{name}", getattr(self, name))
        if self.dim % self.heads:
            raise ConfigError(
                f"{path}.dim={self.dim} is not divisible by {path}.heads={self.heads}"
            )
        if (self.dim // self.heads) % 2:
            raise ConfigError(
                f"{path}.dim / {path}.heads = {self.dim // self.heads} must be even for RoPE"
            )
        _check_positive(f"{path}.vocab_size", self.vocab_size, allow_zero=True)
        _check_positive(f"{path}.patch_dim", self.patch_dim, allow_zero=True)
        _check_positive(f"{path}.image_loss_weight", self.image_loss_weight, allow_zero=True)
        _check_choice(f"{path}.prediction", self.prediction, ("velocity", "x0"))
        _check_choice(f"{path}.attention", self.attention, ("auto", "sdpa", "flex"))
        self.ffn.validate(f"{path}.ffn")
        self.memory.validate(f"{path}.memory", self.layers)


CAPTION_REGISTERS = ("terse", "plain", "natural", "mixed")  # "mixed": each caption picks one
MIX_KEYS = (
    "text", "caption_image", "image_caption", "vqa", "image", "caption", "video", "action_video"
)  # fmt: skip
VIDEO_KINDS = ("video", "action_video")


def _default_mix() -> dict[str, float]:
    return {"text": 0.5, "caption_image": 0.25, "image_caption": 0.1, "vqa": 0.05, "image": 0.1}


def _check_mix(path: str, mix: dict[str, float]) -> None:
    for key, value in mix.items():
        if key not in MIX_KEYS:
            raise ConfigError(f"unknown document kind '{path}.{key}'{did_you_mean(key, MIX_KEYS)}")
        _check_positive(f"{path}.{key}", value, allow_zero=True)
    if sum(mix.values()) <= 0:
        raise ConfigError(f"{path} has no positive weight; give at least one kind a weight > 0")


# Limits of the built-in world's knobs (checked here so that config stays free of data imports).
SCENE_CELLS = 9  # cells of the world's 3×3 grid: the most objects a scene can hold
KNOWLEDGE_MAX_ENTITIES = 50_000
KNOWLEDGE_ATTRIBUTES = 8  # attributes the knowledge module defines


def check_max_objects(value: int, path: str = "data.max_objects") -> None:
    if not 1 <= value <= SCENE_CELLS:
        raise ConfigError(
            f"{path}={value} must be in [1, {SCENE_CELLS}] (objects per world scene, at most "
            "one per cell of the 3×3 grid; default 3)"
        )


@dataclasses.dataclass
class KnowledgeConfig:
    """The world's synthetic knowledge base (docs/data-knowledge.md): biographies of invented
    people as a share of the text documents, a dial of capacity pressure on text."""

    entities: int = 0  # people in the knowledge base (0 = off: the world without one)
    attributes: int = 6  # facts per person: the first n of the knowledge module's list
    share: float = 0.5  # fraction of text documents that are biographies, in (0, 1]

    def validate(self, path: str = "data.knowledge") -> None:
        if not 0 <= self.entities <= KNOWLEDGE_MAX_ENTITIES:
            raise ConfigError(
                f"{path}.entities={self.entities} must be in [0, {KNOWLEDGE_MAX_ENTITIES}] "
                "(people in the knowledge base; 0 = off)"
            )
        if not 1 <= self.attributes <= KNOWLEDGE_ATTRIBUTES:
            raise ConfigError(
                f"{path}.attributes={self.attributes} must be in [1, {KNOWLEDGE_ATTRIBUTES}] "
                "(facts per person)"
            )
        if not 0.0 < self.share <= 1.0:
            raise ConfigError(
                f"{path}.share={self.share} must be in (0, 1] (the fraction of text documents "
                "that are biographies)"
            )


READERS = ("world", "folder", "text", "webdataset", "hf", "digits", "clips")
SYMLINK_READERS = ("folder", "text", "webdataset", "clips")  # readers that walk directories
SOURCE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclasses.dataclass
class SourceConfig:
    """One entry of `data.sources`: a reader, its inputs, and its share of document tokens.

    The target share of (source s, kind k) is weight_s × share_s(k), where share_s is the
    source's own `mix` or, when empty, the run's mix restricted to the kinds it provides
    (docs/data-sources.md, `moesaic/data/mixing.py`).
    """

    kind: str = ""  # the reader: world | folder | text | webdataset | hf | digits | clips
    name: str = ""  # "" = the reader's name; names key the source's documents and eval sets
    paths: list[str] = dataclasses.field(default_factory=list)
    weight: float = 1.0  # share of document tokens (normalised over the sources drawn from)
    mix: dict[str, float] = dataclasses.field(default_factory=dict)  # {} = the run's mix
    follow_symlinks: bool = False  # folder, text, webdataset (see data.follow_symlinks)
    caption_register: str = ""  # world: "" = data.caption_register
    max_objects: int = 0  # world: 0 = data.max_objects

    def validate(self, path: str) -> None:
        if not self.kind:
            raise ConfigError(
                f"{path}.kind is missing; give the reader, one of {', '.join(READERS)}"
            )
        _check_choice(f"{path}.kind", self.kind, READERS)
        if not self.name or not set(self.name) <= SOURCE_NAME_CHARS:
            raise ConfigError(
                f"{path}.name='{self.name}' must be a non-empty name of letters, digits, '_', "
                "'.' or '-' (it keys the source's documents and eval sets)"
            )
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ConfigError(
                f"{path}.weight={self.weight} must be a finite number > 0 (its share of "
                "document tokens); remove a source you do not want"
            )
        if self.mix:
            _check_mix(f"{path}.mix", self.mix)
        if self.follow_symlinks and self.kind not in SYMLINK_READERS:
            raise ConfigError(
                f"{path}.follow_symlinks=true has no effect with kind='{self.kind}' (it applies "
                "to folder, text, webdataset and clips); remove it"
            )
        if self.kind not in ("world", "digits") and not self.paths:
            raise ConfigError(f"{path} (kind '{self.kind}') needs input files: set its paths")
        if self.kind in ("world", "digits") and self.paths:
            raise ConfigError(f"{path} (kind '{self.kind}') reads no files; remove its paths")
        world_only = {"caption_register": self.caption_register, "max_objects": self.max_objects}
        for key, value in world_only.items():
            if value and self.kind != "world":
                raise ConfigError(f"{path}.{key} applies to kind 'world' only; remove it")
        if self.caption_register:
            _check_choice(f"{path}.caption_register", self.caption_register, CAPTION_REGISTERS)
        if self.max_objects:
            check_max_objects(self.max_objects, f"{path}.max_objects")
        for p in self.paths:
            if "\x00" in p:
                raise ConfigError(f"{path}.paths entry {p!r} holds a NUL character; fix the path")


@dataclasses.dataclass
class VideoConfig:
    """Clips (mix keys `video`, `action_video`; docs/video.md)."""

    min_frames: int = 4  # frames per clip, drawn uniformly from [min_frames, max_frames]
    max_frames: int = 8
    # clean: context frames clean, only the last frame of the document noised (with loss);
    # noised: every frame noised with its own flow time and carrying loss (diffusion forcing)
    context: str = "clean"

    def validate(self, path: str = "data.video") -> None:
        if self.min_frames < 2:
            raise ConfigError(f"{path}.min_frames={self.min_frames} must be >= 2")
        if self.max_frames < self.min_frames:
            raise ConfigError(
                f"{path}.max_frames={self.max_frames} must be >= "
                f"{path}.min_frames={self.min_frames}"
            )
        _check_choice(f"{path}.context", self.context, ("clean", "noised"))


@dataclasses.dataclass
class DataConfig:
    """Where batches come from and how they are packed (design.md §2, §6)."""

    source: str = "world"  # world | folder | text | webdataset | hf | digits | clips
    paths: list[str] = dataclasses.field(default_factory=list)  # files/dirs for real sources
    seq_len: int = 256
    batch_size: int = 8  # rows per micro-batch per rank
    image_size: int = 16
    patch_size: int = 4
    channels: int = 3
    # shares of document tokens per kind (normalised over the kinds the source provides)
    mix: dict[str, float] = dataclasses.field(default_factory=_default_mix)
    # stacked sub-batches: each batch is batch_size rows of every listed mix (mix then ignored)
    parts: list[dict[str, float]] = dataclasses.field(default_factory=list)
    caption_register: str = "terse"  # terse | plain | natural | mixed
    caption_loss: bool = True  # captions before images carry text loss (off: image-only arms)
    caption_dropout: float = 0.1  # on generation pairs, for classifier-free guidance
    time_shift: float = 3.0  # shift of the flow-time schedule toward noise (1 = uniform)
    understanding_noise: float = 0.0  # images before captions get t >= 1 - this (0 = clean)
    tokenizer: str = ""  # path to a tokenizer.json; "" trains one on world text
    vocab_size: int = 2048  # when training the tokenizer
    seed: int = 0
    strict: bool = False  # raise on bad records instead of skipping and counting them
    video: VideoConfig = dataclasses.field(default_factory=VideoConfig)
    max_objects: int = 3  # world scenes hold 1..max_objects objects (1..9)
    knowledge: KnowledgeConfig = dataclasses.field(default_factory=KnowledgeConfig)
    follow_symlinks: bool = False  # let symlinks inside a real-data directory point outside it
    # several sources in one run (docs/data-sources.md); replaces data.source / data.paths
    sources: list[SourceConfig] = dataclasses.field(default_factory=list)
    decode_cache: bool = True  # keep resized real images under $MOESAIC_CACHE/decoded

    @property
    def world_only(self) -> bool:
        """Whether the data is the built-in world alone (no real source anywhere)."""
        return not self.sources and self.source == "world"

    def source_list(self) -> list[SourceConfig]:
        """`data.sources` with default names filled in (the reader's name)."""
        return [dataclasses.replace(s, name=s.name or s.kind) for s in self.sources]

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self, path: str = "data") -> None:
        for name in ("seq_len", "batch_size", "image_size", "patch_size", "channels", "vocab_size"):
            _check_positive(f"{path}.{name}", getattr(self, name))
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{path}.image_size={self.image_size} is not divisible by "
                f"{path}.patch_size={self.patch_size}"
            )
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"{path}.caption_dropout={self.caption_dropout} must be in [0, 1]")
        if not 0.0 <= self.understanding_noise <= 1.0:
            raise ConfigError(
                f"{path}.understanding_noise={self.understanding_noise} must be in [0, 1]"
            )
        _check_positive(f"{path}.time_shift", self.time_shift)
        _check_choice(f"{path}.source", self.source, READERS)
        self.video.validate(f"{path}.video")
        if self.sources:
            self._validate_sources(path)
        _check_choice(
            f"{path}.caption_register",
            self.caption_register,
            CAPTION_REGISTERS,
        )
        if self.follow_symlinks and self.source not in SYMLINK_READERS:
            raise ConfigError(
                f"{path}.follow_symlinks=true has no effect with {path}.source='{self.source}' "
                "(it applies to folder, text, webdataset and clips); remove it"
            )
        if self.source not in ("world", "digits") and not self.paths:
            raise ConfigError(
                f"{path}.source='{self.source}' needs input files: set {path}.paths=[...]"
            )
        for where, mix in [(f"{path}.mix", self.mix)] + [
            (f"{path}.parts[{i}]", part) for i, part in enumerate(self.parts)
        ]:
            _check_mix(where, mix)
        check_max_objects(self.max_objects, f"{path}.max_objects")
        self.knowledge.validate(f"{path}.knowledge")
        has_world = any(s.kind == "world" for s in self.sources) or (
            not self.sources and self.source == "world"
        )
        if self.knowledge.entities and not has_world:
            raise ConfigError(
                f"{path}.knowledge.entities={self.knowledge.entities} needs the built-in world "
                f"({path}.source='{self.source}'); set {path}.knowledge.entities=0"
            )

    def _validate_sources(self, path: str) -> None:
        """`data.sources` replaces `data.source`/`data.paths`: both given is a mistake."""
        if self.source != "world" or self.paths:
            given = f"{path}.source='{self.source}'" if self.source != "world" else f"{path}.paths"
            raise ConfigError(
                f"{given} and {path}.sources are both given; list every source in "
                f"{path}.sources and drop {path}.source / {path}.paths"
            )
        if self.follow_symlinks:
            raise ConfigError(
                f"{path}.follow_symlinks=true with {path}.sources: set follow_symlinks on each "
                "source that needs it"
            )
        seen: set[str] = set()
        for i, src in enumerate(self.source_list()):
            src.validate(f"{path}.sources[{i}]")
            if src.name in seen:
                raise ConfigError(
                    f"{path}.sources[{i}].name='{src.name}' repeats an earlier source's name; "
                    "give each source a distinct name"
                )
            seen.add(src.name)


@dataclasses.dataclass
class TrainConfig:
    steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    warmup: int = 20
    weight_decay: float = 0.1
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping
    checkpoint_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 2

    def validate(self, path: str = "train") -> None:
        for name in ("steps", "lr", "grad_accum", "max_bad_steps", "keep_checkpoints"):
            _check_positive(f"{path}.{name}", getattr(self, name))
        for name in ("warmup", "weight_decay", "grad_clip", "threads", "checkpoint_every"):
            _check_positive(f"{path}.{name}", getattr(self, name), allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{path}.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{path}.betas={self.betas} must be two numbers in [0, 1)")
        _check_choice(f"{path}.precision", self.precision, ("auto", "fp32", "bf16"))


@dataclasses.dataclass
class EvalConfig:
    every: int = 100  # evaluate held-out losses every n steps (0 = only at the end)
    batches: int = 4  # held-out batches per evaluation
    seed: int = 1234  # fixes eval data, noise and flow times
    # out-of-distribution text (.txt / .jsonl files or directories); [] = the world's generator
    ood_text: list[str] = dataclasses.field(default_factory=list)

    def validate(self, path: str = "eval") -> None:
        _check_positive(f"{path}.every", self.every, allow_zero=True)
        _check_positive(f"{path}.batches", self.batches)
        for p in self.ood_text:
            if not p or "\x00" in p:
                raise ConfigError(f"{path}.ood_text entry {p!r} is not a path; fix it")


@dataclasses.dataclass
class LoggingConfig:
    every: int = 10  # write a metrics.jsonl line every n steps
    progress: str = "auto"  # auto | bar | plain | none
    tensorboard: bool = False

    def validate(self, path: str = "logging") -> None:
        _check_positive(f"{path}.every", self.every)
        _check_choice(f"{path}.progress", self.progress, ("auto", "bar", "plain", "none"))


@dataclasses.dataclass
class DistConfig:
    """Scale-out when launched with several processes (design.md §7); one process ignores it."""

    backend: str = "auto"  # auto (nccl for CUDA tensors, gloo for CPU tensors) | gloo | nccl
    reshard_after_forward: bool = True  # FSDP2: free gathered weights after forward (ZeRO-3)
    expert_parallel: int = 1  # ranks sharing one MoE layer's experts (divides world and experts)
    mixed_precision: bool = True  # bf16 on CUDA: gather bf16 weights, reduce gradients in fp32
    timeout_s: float = 600.0  # a collective waiting longer than this fails the run
    watchdog_s: float = 60.0  # a peer silent this long counts as dead (0 = no watchdog)

    def validate(self, path: str = "dist") -> None:
        _check_choice(f"{path}.backend", self.backend, ("auto", "gloo", "nccl"))
        _check_positive(f"{path}.expert_parallel", self.expert_parallel)
        _check_positive(f"{path}.timeout_s", self.timeout_s)
        _check_positive(f"{path}.watchdog_s", self.watchdog_s, allow_zero=True)


@dataclasses.dataclass
class Config:
    name: str = "run"
    out: str = "runs"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    dist: DistConfig = dataclasses.field(default_factory=DistConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                sub.validate(f.name)
        if not self.name or "/" in self.name:
            raise ConfigError(f"name='{self.name}' must be a non-empty name without '/'")
        mixes = self.data.parts or [self.data.mix]
        if self.model.memory.layers and not any(
            mix.get(k, 0) > 0 for mix in mixes for k in TEXT_KINDS
        ):
            raise ConfigError(
                f"model.memory.layers={self.model.memory.layers} needs text, but data.mix gives "
                f"weight to no document with words ({', '.join(TEXT_KINDS)}); add one "
                "(e.g. data.mix.text=0.5) or set model.memory.layers=[]"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading: presets, `base:` chains, overrides.


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A preset name (`tiny`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    names = preset_names()
    extra = did_you_mean(str(name_or_path), names)
    raise ConfigError(f"no preset or config file named '{name_or_path}'{extra}")


def load_raw(name_or_path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged mapping of a config file and its chain of `base:` presets."""
    path = resolve_config_path(name_or_path).resolve()
    if path in _seen:
        raise ConfigError(f"config '{path}' includes itself through 'base:'")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"'base' in '{path}' must be a preset name or path, got {base!r}")
    base_path = path.parent / base if (path.parent / base).is_file() else base
    return deep_merge(load_raw(base_path, (*_seen, path)), data)


def build_config(data: dict[str, Any]) -> Config:
    return from_dict(Config, data).validate()


def load_config(
    name_or_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Load a preset or YAML file (None: all defaults), apply overrides, validate.

    Overrides apply to the fully resolved tree, so `data.mix.text=0.4` edits one entry of the
    mix and keeps the others, while a mapping in YAML replaces the default mapping whole.
    """
    data = load_raw(name_or_path) if name_or_path is not None else {}
    resolved = from_dict(Config, data).to_dict()
    return build_config(apply_overrides(resolved, list(overrides)))


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(config.to_yaml())
