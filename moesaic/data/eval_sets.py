"""Fixed held-out evaluation sets, independent of `data.mix` (the same for every arm of a study).

    text      in-distribution general text (val split of the sources that have text)
    ood_text  out-of-distribution text: the files of `eval.ood_text` (every record), else the
              world's held-out out-of-distribution generator
    image     caption → image: flow loss on the image at a fixed grid of flow times
              (`EVAL_TIME_GRID` midpoints of (0, 1), cycled over images) with fixed noise;
              the caption is context only (no text loss, never dropped)
    image_uncond  the same images, noise and flow times with the caption dropped (the
              unconditional generation classifier-free guidance uses)
    caption   image → caption: clean image, text loss on the caption (and boi / eos)
    video     bare clips: next-frame flow loss — frames 1..k−1 clean, frame k noised at a fixed
              grid time with fixed noise (k drawn per clip, as in training with
              `data.video.context: clean`, whatever the run's context mode); with a source that
              has clips (the world always) and a `data.seq_len` that holds a two-frame clip
    action_video  the same with the actions between the frames (world modelling)
    knowledge with the world's knowledge base on (`data.knowledge.entities > 0`): biographies
              of people of the base in the held-out phrasings (never in training data), text
              loss on the attribute values only, so `knowledge/text` measures stored facts

Several sources (`data.sources`). Each set draws from every source that contributes its kind
(a source whose own mix gives the kind no weight does not), mixed by the sources' weights; the
study reads these all-source sets. Where two or more sources contribute a kind, each of them
also gets its own sets, named `SET@SOURCE` (`text@corpus`, `image@photos`, …; the loss keys
then read `text@corpus/text`).

Loss keys (`evaluate.losses`): `text/text`, `ood_text/text`, `image/image`, `caption/text`,
`knowledge/text`, `video/video` and `action_video/video` (flow MSE of video-frame positions).

Provenance. `EvalSets.sources` says, per set, which source, reader, paths and split it came
from, how many held-out records that split holds (documents for text, images for image sets;
`null` for the generated world and for WebDataset shards not yet read through) and how many
documents the eval batches hold. A split with fewer than `MIN_EVAL_RECORDS` records prints one
warning: its loss repeats a handful of documents and says little about held-out data.

Everything — documents, noise, flow times — derives from the `seed` argument (the config's
`eval.seed`), not from `data.seed`, so runs that differ only in training data are scored on
identical batches. Captions use the run's `data.caption_register`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

from moesaic.batch import Batch, DocKind
from moesaic.config import DataConfig
from moesaic.data.documents import eval_time_grid, video_doc_len
from moesaic.data.mixing import Member, SourceSet, open_sources
from moesaic.data.packing import VIDEO_KINDS, DocOptions, Source, Stream
from moesaic.data.reading import DataWarning
from moesaic.data.world import knowledge
from moesaic.data.world.generators import Record, WorldSource

EVAL_TIME_GRID = 8
MIN_EVAL_RECORDS = 20  # a held-out split with fewer records than this warns
# set name -> (mix key, salt)
EVAL_SETS = {
    "text": ("text", 1),
    "ood_text": ("ood_text", 2),
    "image": ("caption_image", 3),
    "image_uncond": ("caption_image", 3),  # the same documents as "image", captions dropped
    "caption": ("image_caption", 4),
    "knowledge": ("text", 5),  # only with a knowledge base, from `KnowledgeProbes`
    "video": ("video", 6),
    "action_video": ("action_video", 7),
}
FLOW_KINDS = ("caption_image", *VIDEO_KINDS)  # sets scored at the fixed flow-time grid
PER_SOURCE_SETS = ("text", "image", "image_uncond", "caption", "video", "action_video")


class KnowledgeProbes:
    """A text source of knowledge probes: biographies of a uniformly drawn person of the base
    as pieces whose attribute values alone carry loss. The eval set uses the held-out
    phrasings; `phrasing="train"` (training phrasings) separates recall from rephrasing."""

    kinds = ("text",)

    def __init__(self, base: knowledge.KnowledgeBase, phrasing: str = "eval"):
        self.base, self.phrasing = base, phrasing
        self.skipped: Counter = Counter()

    def record(self, kind: str, index: int, rng) -> Record:
        pieces = self.base.biography(rng, self.phrasing)
        return Record(text="".join(text for text, _ in pieces), pieces=pieces)


class EvalSets(dict):
    """{set name: [Batch, ...]}, with `sources`: where each set came from (module doc)."""

    def __init__(self, sets: dict[str, list[Batch]], sources: dict[str, dict]):
        super().__init__(sets)
        self.sources = sources


def _contributors(sources: SourceSet, kind: str) -> list[Member]:
    return [
        m
        for m in sources.members
        if kind in m.source.kinds and (not m.mix or m.mix.get(kind, 0) > 0)
    ]


def _origin(member: Member, split: str) -> dict:
    records = getattr(member.source, "split_records", None)
    return {
        "source": member.name or member.label,
        "reader": member.reader,
        "paths": list(member.paths),
        "split": split,
        "records": records,
    }


def _ood_member(cfg: DataConfig, paths: Sequence[str]) -> Member:
    from moesaic.data.sources import open_ood_text

    source = open_ood_text(cfg, list(paths))
    return Member("", source, label="eval.ood_text", reader="text", paths=tuple(paths))


def build_eval_sets(
    cfg: DataConfig,
    tok,
    seed: int,
    n_batches: int,
    split: str = "val",
    source_factory: Callable[[DataConfig, str], Source] | None = None,
    ood_text: Sequence[str] = (),
) -> EvalSets:
    """{"text", "ood_text", "image", "image_uncond", "caption", "knowledge", "video",
    "action_video", "SET@SOURCE"} → `n_batches` Batches each ("text" only when a source has
    text, the image sets only when one has images, "knowledge" only with the world's knowledge
    base on, the video sets only when one has clips and a two-frame clip fits `data.seq_len`,
    per-source sets only for kinds two or more sources contribute). `ood_text`: files for the
    OOD set (the config's `eval.ood_text`)."""
    if source_factory is not None:
        sources = SourceSet.single(source_factory(cfg, split), "eval source", cfg.source)
    else:
        sources = open_sources(cfg, split)
    if ood_text:
        ood = _ood_member(cfg, ood_text)
    else:
        world = WorldSource(split, cfg.caption_register, max(cfg.image_size, 15))
        ood = Member("", world, label="the world's OOD generator", reader="world")
    plan: dict[str, list[Member]] = {}
    for name in ("text", "ood_text", "image", "image_uncond", "caption"):
        members = [ood] if name == "ood_text" else _contributors(sources, EVAL_SETS[name][0])
        if members:
            plan[name] = members
    kb = cfg.knowledge
    if kb.entities and any(m.reader == "world" for m in sources.members):
        probes = KnowledgeProbes(knowledge.knowledge_base(kb.entities, kb.attributes))
        plan["knowledge"] = [Member("", probes, label="knowledge probes", reader="world")]
    if cfg.seq_len >= video_doc_len(2, cfg.patches_per_image):
        for name in VIDEO_KINDS:
            members = _contributors(sources, EVAL_SETS[name][0])
            if members:
                plan[name] = members
    for name in PER_SOURCE_SETS:
        if len(plan.get(name, ())) > 1:
            plan |= {f"{name}@{m.name}": [m] for m in plan[name]}
    out: dict[str, list[Batch]] = {}
    origins: dict[str, dict] = {}
    for name, members in plan.items():
        base = name.partition("@")[0]
        kind, salt = EVAL_SETS[base]
        opts = DocOptions(
            caption_loss=False,
            caption_dropout=1.0 if base == "image_uncond" else 0.0,
            time_shift=cfg.time_shift,
            understanding_noise=0.0,
            t_grid=tuple(eval_time_grid(EVAL_TIME_GRID)) if kind in FLOW_KINDS else (),
            salt=salt,
            video_context="clean",
        )
        stream = Stream(
            dataclasses.replace(cfg, mix={}), tok, SourceSet(members), split, mix={kind: 1.0},
            opts=opts, seed=seed,
        )  # fmt: skip
        out[name] = [next(stream) for _ in range(n_batches)]
        which = "all" if members[0] is ood and ood_text else split
        origins[name] = {
            "from": [_origin(m, which) for m in members],
            "documents": sum(_documents(b) for b in out[name]),
        }
    _warn_small(origins)
    return EvalSets(out, origins)


def _documents(batch: Batch) -> int:
    """Documents placed in a batch (padding excluded)."""
    real = batch.doc_kind != int(DocKind.PAD)
    return sum(int(batch.doc_id[r][real[r]].unique().numel()) for r in range(real.shape[0]))


def _warn_small(origins: dict[str, dict]) -> None:
    """One warning per source whose held-out split is too small to mean anything."""
    small: dict[tuple, list[str]] = {}
    for name, origin in origins.items():
        for o in origin["from"]:
            if o["records"] is not None and o["records"] < MIN_EVAL_RECORDS:
                key = (o["source"], o["reader"], o["split"], o["records"])
                small.setdefault(key, []).append(name)
    for (source, reader, split, n), names in small.items():
        what = "eval.ood_text" if split == "all" else f"source '{source}' ({reader})"
        sets = f"eval set '{names[0]}'" if len(names) == 1 else f"eval sets {', '.join(names)}"
        warnings.warn(
            f"{sets}: only {n} '{split}' record(s) of {what}, fewer than {MIN_EVAL_RECORDS}; "
            "the loss repeats them and says little about held-out data; add data (5% of a "
            "source's records are held out)",
            DataWarning,
            stacklevel=3,
        )
