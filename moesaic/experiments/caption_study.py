"""The caption-shift study's definitions: its conditions, presets and fields, each
condition's run overrides, and the caption shift of its registers (JS divergence and the
T model's embedding distance). The experiment (`caption_shift.py`) plans runs from them and the
summary (`caption_shift_summary.py`) reads them; see `caption_shift.py` for the design.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

from moesaic.config import CAPTION_REGISTERS, SourceConfig
from moesaic.errors import ConfigError, did_you_mean
from moesaic.experiments import caption_sources as real
from moesaic.experiments.arms import check_arms, check_routing_choice
from moesaic.experiments.compete_presets import MICRO_MODEL
from moesaic.experiments.compete_presets import PRESETS as TAX_PRESETS
from moesaic.experiments.engine import base_config, tokenizer_for
from moesaic.experiments.study import StudyConfig
from moesaic.files import atomic_write_text

REFERENCE = "text"


@dataclasses.dataclass(frozen=True)
class Condition:
    """One kind of second part stacked onto the reference run's text batch."""

    key: str  # the mix key of the second part (also the run-name component)
    label: str
    per_register: bool
    description: str

    def title(self, register: str | None = None) -> str:
        return f"{self.label}_{register}" if register else self.label


CONDITIONS: dict[str, Condition] = {
    c.key: c
    for c in (
        Condition("image", "T+I", False, "text + bare images (vision without caption language)"),
        Condition("caption", "T+C", True, "text + captions as plain text, no images"),
        Condition(
            "image_caption", "T+IC", True, "text + image→caption documents, caption as target"
        ),
        Condition(
            "caption_image", "T+CI", True, "text + caption→image documents (study.caption_loss)"
        ),
    )
}
CAPTION_CONDITIONS = tuple(k for k, c in CONDITIONS.items() if c.per_register)
DISTANCE_SALT = 7  # separates the embedding-distance documents from the eval sets
DISTANCE_FILE = "caption_distance.json"

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds: exercises every stage end to end (used by the tests); numbers are noise.
    "smoke": {
        "name": "caption-shift-smoke",
        "base": "tiny",
        "overrides": [
            *MICRO_MODEL,
            "train.warmup=2",
            "train.threads=1",
            "train.checkpoint_every=0",
            "eval.every=0",
            "eval.batches=2",
            "logging.every=2",
            "logging.progress=none",
        ],
        "arms": ["dense", "moe"],
        "registers": ["terse", "natural"],
        "conditions": ["image", "caption", "image_caption", "caption_image"],
        "steps": 6,
        "experts": 8,
        "granularity": 2,
        "shift_docs": 50,
        "distance_batches": 1,
        "description": "end-to-end check of the caption-shift machinery; numbers are noise",
    },
    # CPU: 80 runs, 2 parallel jobs (timed in docs/study-caption-shift.md). The model and the
    # world are the tax study's `quick` (a knowledge base, busier scenes), so the two compare.
    "quick": {
        "name": "caption-shift-quick",
        "base": "tiny",
        "overrides": list(TAX_PRESETS["quick"]["overrides"]),
        "arms": ["dense", "moe"],
        "registers": ["terse", "plain", "natural"],
        "conditions": ["image", "caption", "image_caption"],
        "seeds": 5,
        "steps": 250,
        "experts": 16,
        "granularity": 4,
        "jobs": 2,
        "description": "CPU-sized caption-shift study on the built-in world",
    },
    # One GPU (documented with its cost, not run in CI): the `small` preset, every register
    # and condition.
    "paper": {
        "name": "caption-shift-paper",
        "base": "small",
        "overrides": ["model.ffn.z_loss=1e-4", "eval.every=0", "logging.progress=plain"],
        "arms": ["dense", "moe"],
        "registers": ["terse", "plain", "natural"],
        "conditions": ["image", "caption", "image_caption", "caption_image"],
        "seeds": 5,
        "steps": 5000,
        "experts": 64,
        "granularity": 4,
        "distance_batches": 16,
        "description": "GPU scale: small preset, 64 experts of width F/4, every condition, 5 seeds",
    },
}


@dataclasses.dataclass
class CaptionShiftConfig(StudyConfig):
    name: str = "caption-shift"
    arms: list[str] = dataclasses.field(default_factory=lambda: ["dense", "moe"])
    registers: list[str] = dataclasses.field(default_factory=lambda: ["terse", "plain", "natural"])
    conditions: list[str] = dataclasses.field(
        default_factory=lambda: ["image", "caption", "image_caption"]
    )
    steps: int = 300  # optimizer steps of every run
    experts: int = 16  # E of the MoE arms
    granularity: int = 4  # G: experts of width F/G, G active per token
    lr: dict[str, float] = dataclasses.field(default_factory=dict)  # per-arm train.lr
    caption_loss: bool = True  # captions of caption→image documents (T+CI_r) are text targets
    margin: float = 0.5  # % of text CE: "no harm" / "about equal" means within this margin
    shift_docs: int = 500  # captions and general-text documents per register for the JS shift
    distance_batches: int = 4  # batches of captions / general text for the embedding distance
    # real data (caption_sources.py); all unset: the built-in world
    text_source: SourceConfig = dataclasses.field(default_factory=SourceConfig)  # T's text
    caption_sources: dict[str, SourceConfig] = dataclasses.field(default_factory=dict)  # r: src
    image_source: str = ""  # the caption source of T+I's bare images ("" = the first)

    def validate(self) -> CaptionShiftConfig:
        super().validate()
        if real.uses_real_data(self):
            self.registers = real.real_registers(self)
        elif self.image_source:
            raise ConfigError(
                f"study.image_source='{self.image_source}' names a caption source, but "
                "study.caption_sources is empty; set both or neither"
            )
        for key in ("steps", "experts", "granularity", "shift_docs", "distance_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"study.{key}={getattr(self, key)} must be >= 1")
        if not self.margin > 0:
            raise ConfigError(f"study.margin={self.margin} must be > 0 (percent of text CE)")
        check_arms(self.arms, self.lr)
        for field, items, choices in (
            ("arms", self.arms, None),
            ("registers", self.registers, None if real.uses_real_data(self) else CAPTION_REGISTERS),
            ("conditions", self.conditions, tuple(CONDITIONS)),
        ):
            for item in items:
                if choices is not None and item not in choices:
                    raise ConfigError(
                        f"study.{field} has '{item}', which is not one of {', '.join(choices)}"
                        f"{did_you_mean(item, choices, listing=False)}"
                    )
            if len(set(items)) != len(items):
                raise ConfigError(f"study.{field}={items} repeats an entry")
        if not self.conditions:
            raise ConfigError("study.conditions is empty; e.g. [image, caption, image_caption]")
        if not self.registers and any(CONDITIONS[c].per_register for c in self.conditions):
            raise ConfigError("study.registers is empty; name the caption registers to compare")
        check_routing_choice(self.experts, self.granularity, self.arms)
        return self


def _mix(mix: dict[str, float]) -> str:
    return json.dumps(mix, sort_keys=True)


def condition_overrides(
    study: CaptionShiftConfig, condition: str, register: str | None, seed: int
) -> list[str]:
    """Data and step overrides of one run (the arm's model overrides come separately)."""
    common = [f"train.seed={seed}", f"data.seed={seed}", f"train.steps={study.steps}"]
    text = {"text": 1.0}
    cond = None if condition == REFERENCE else CONDITIONS[condition]
    if real.uses_real_data(study):
        kind = source = None
        if cond is not None:
            kind = cond.key
            source = register if cond.per_register else real.image_source_name(study)
        common += real.run_data_overrides(study, base_config(study), kind, source)
    if cond is None:
        return [*common, "data.caption_loss=false", f"data.mix={_mix(text)}", "data.parts=[]"]
    caption_loss = study.caption_loss if condition == "caption_image" else False
    out = [
        *common,
        f"data.caption_loss={str(caption_loss).lower()}",
        f"data.parts=[{_mix(text)}, {_mix({cond.key: 1.0})}]",
    ]
    if cond.per_register and not real.uses_real_data(study):
        out.append(f"data.caption_register={register}")
    return out


def check_source(study: CaptionShiftConfig) -> None:
    """The study chooses every run's data: the base config must leave it at the world default.
    On real data, every source is opened once to check it gives what its role needs."""
    data = base_config(study).data
    if not data.world_only:
        given = f"data.source='{data.source}'" if not data.sources else "data.sources"
        raise ConfigError(
            f"{given}: a caption-shift study sets each run's data itself; give real data as "
            "study.text_source={kind: text, paths: [...]} and study.caption_sources="
            "{REGISTER: {kind: folder, paths: [...]}} (docs/study-caption-shift.md)"
        )
    if real.uses_real_data(study):
        real.check_sources(study, base_config(study))


# ----------------------------------------------------------------------------- caption shift


def js_shift(cfg: Any, tok: Any, registers: list[str], n_docs: int, seed: int) -> dict:
    """{register: {unigram_js, bigram_js}}: captions of the same `n_docs` training scenes in
    each register against the same `n_docs` general-text documents (seed-determined)."""
    from moesaic.data.shift import caption_shift
    from moesaic.data.world import captions, scenes, text

    rng = random.Random(f"caption-shift-study:{seed}:text")
    docs = [tok.encode(text.general_document(rng)) for _ in range(n_docs)]
    out = {}
    for register in registers:
        rng = random.Random(f"caption-shift-study:{seed}:captions")
        caps = []
        for _ in range(n_docs):
            scene = scenes.sample_scene(rng, "train")
            caps.append(tok.encode(captions.caption(scene, register, rng)))
        out[register] = caption_shift(caps, docs)
    return out


def seed_shift(study: CaptionShiftConfig, seed: int) -> dict:
    """{register: {unigram_js, bigram_js}} of one seed: the world's (`js_shift`, the seed's
    tokenizer), or on real data the sources' (the study's one tokenizer; the same every seed)."""
    if real.uses_real_data(study):
        cfg = base_config(study, condition_overrides(study, REFERENCE, None, seed))
        return real.real_js_shift(study, base_config(study), tokenizer_for(cfg), study.shift_docs)
    cfg = base_config(study, [f"data.seed={seed}"])
    return js_shift(cfg.data, tokenizer_for(cfg), study.registers, study.shift_docs, seed)


def _mean_hidden(model: Any, batches: list, bos_id: int, device: Any) -> Any:
    """Mean of the last block's output [D] over every non-padding position except bos."""
    import torch

    from moesaic.batch import DocKind

    total, count = None, 0
    for batch in batches:
        batch = batch.to(device)
        h_BLD = model(batch, output_hidden_states=True).hidden_states[-1].float()
        keep_BL = (batch.doc_kind != DocKind.PAD) & (batch.tokens != bos_id)
        part_D = h_BLD[keep_BL].sum(0)
        total = part_D if total is None else total + part_D
        count += int(keep_BL.sum())
    return (total / max(count, 1)).cpu() if total is not None else torch.zeros(0)


def embedding_distance(
    run_dir: Path,
    registers: list[str],
    n_batches: int,
    sources: dict[str, SourceConfig] | None = None,
) -> dict[str, float]:
    """1 − cos(mean h over captions of `register`, mean h over general text) per register,
    with the run's model (validation split). The general text is the run's own (a T run
    draws only general text); the captions are the world's in that register (the same scenes
    in every register) or, with `sources` ({register: caption source}), that source's."""
    import dataclasses as dc

    import torch

    from moesaic.data import Stream, WorldSource, open_sources
    from moesaic.data.packing import DocOptions
    from moesaic.train.runs import load_run

    run = load_run(run_dir, "auto")
    cfg, tok = run.cfg, run.tokenizer
    opts = DocOptions(caption_loss=True, caption_dropout=0.0, salt=DISTANCE_SALT)
    data = dc.replace(cfg.data, parts=[])

    def batches(source: Any, kind: str) -> list:
        stream = Stream(data, tok, source, "val", mix={kind: 1.0}, opts=opts, seed=cfg.eval.seed)
        return [next(stream) for _ in range(n_batches)]

    def captions(register: str) -> Any:
        if sources is None:
            return WorldSource("val", register, cfg.data.image_size)
        return open_sources(dc.replace(data, sources=[sources[register]]), "val")

    out = {}
    with torch.no_grad(), run.autocast():
        text_D = _mean_hidden(run.model, batches(open_sources(data, "val"), "text"),
                              tok.bos_id, run.device)  # fmt: skip
        for register in registers:
            cap_batches = batches(captions(register), "caption")
            cap_D = _mean_hidden(run.model, cap_batches, tok.bos_id, run.device)
            cos = torch.nn.functional.cosine_similarity(cap_D, text_D, dim=0)
            out[register] = float(1.0 - cos)
    return out


def cached_distance(
    run_dir: Path,
    registers: list[str],
    n_batches: int,
    sources: dict[str, SourceConfig] | None = None,
) -> dict[str, float]:
    """`embedding_distance`, cached in the run's caption_distance.json (per step and size, and
    per register the caption source it was measured on)."""
    path = Path(run_dir) / DISTANCE_FILE
    step = json.loads((Path(run_dir) / "summary.json").read_text()).get("step")
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("step") != step or cached.get("batches") != n_batches:
        cached = {"step": step, "batches": n_batches, "distance": {}}
    measured_on = {r: dataclasses.asdict(s) for r, s in (sources or {}).items()}
    on = cached.get("sources", {})
    missing = [
        r for r in registers if r not in cached["distance"] or on.get(r) != measured_on.get(r)
    ]
    if missing:
        cached["distance"] |= embedding_distance(run_dir, missing, n_batches, sources)
        if measured_on:
            cached["sources"] = on | {r: measured_on[r] for r in missing}
        atomic_write_text(path, json.dumps(cached, indent=1))
    return {r: cached["distance"][r] for r in registers}
