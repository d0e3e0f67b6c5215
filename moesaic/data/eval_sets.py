"""Fixed held-out evaluation sets, independent of `data.mix` (the same for every arm of a study).

    text      in-distribution general text (val split of the source, if it has text)
    ood_text  the world's held-out out-of-distribution generator
    image     caption → image: flow loss on the image at a fixed grid of flow times
              (`EVAL_TIME_GRID` midpoints of (0, 1), cycled over images) with fixed noise;
              the caption is context only (no text loss, never dropped)
    image_uncond  the same images, noise and flow times with the caption dropped (the
              unconditional generation classifier-free guidance uses)
    caption   image → caption: clean image, text loss on the caption (and boi / eos)
    knowledge with the world's knowledge base on (`data.knowledge.entities > 0`): biographies
              of people of the base in the held-out phrasings (never in training data), text
              loss on the attribute values only, so `knowledge/text` measures stored facts

Everything — documents, noise, flow times — derives from the `seed` argument (the config's
`eval.seed`), not from `data.seed`, so runs that differ only in training data are scored on
identical batches. Captions use the run's `data.caption_register`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

from moesaic.batch import Batch
from moesaic.config import DataConfig
from moesaic.data.documents import eval_time_grid
from moesaic.data.packing import DocOptions, Source, Stream
from moesaic.data.world import knowledge
from moesaic.data.world.generators import Record, WorldSource

EVAL_TIME_GRID = 8
# set name -> (mix key, salt)
EVAL_SETS = {
    "text": ("text", 1),
    "ood_text": ("ood_text", 2),
    "image": ("caption_image", 3),
    "image_uncond": ("caption_image", 3),  # the same documents as "image", captions dropped
    "caption": ("image_caption", 4),
    "knowledge": ("text", 5),  # only with a knowledge base, from `KnowledgeProbes`
}


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


def build_eval_sets(
    cfg: DataConfig,
    tok,
    seed: int,
    n_batches: int,
    split: str = "val",
    source_factory: Callable[[DataConfig, str], Source] | None = None,
) -> dict[str, list[Batch]]:
    """{"text", "ood_text", "image", "image_uncond", "caption", "knowledge"} → `n_batches`
    Batches each ("text" only when the source has text, the image sets only when it has images,
    "knowledge" only with the world's knowledge base on)."""
    from moesaic.data import make_source

    world = WorldSource(split, cfg.caption_register, max(cfg.image_size, 15))
    source = (source_factory or make_source)(cfg, split)
    sources: dict[str, Source] = {"text": source, "ood_text": world}
    sources |= {"image": source, "image_uncond": source, "caption": source}
    kb = cfg.knowledge
    if cfg.source == "world" and kb.entities:
        sources["knowledge"] = KnowledgeProbes(knowledge.knowledge_base(kb.entities, kb.attributes))
    out: dict[str, list[Batch]] = {}
    for name, src in sources.items():
        kind, salt = EVAL_SETS[name]
        if kind not in src.kinds:
            continue
        opts = DocOptions(
            caption_loss=False,
            caption_dropout=1.0 if name == "image_uncond" else 0.0,
            time_shift=cfg.time_shift,
            understanding_noise=0.0,
            t_grid=tuple(eval_time_grid(EVAL_TIME_GRID)) if kind == "caption_image" else (),
            salt=salt,
        )
        stream = Stream(
            dataclasses.replace(cfg, mix={}), tok, src, split, mix={kind: 1.0}, opts=opts,
            seed=seed,
        )  # fmt: skip
        out[name] = [next(stream) for _ in range(n_batches)]
    return out
