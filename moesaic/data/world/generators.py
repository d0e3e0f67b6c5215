"""The registry of world document generators: the one place new kinds of world data plug in.

A generator maps (rng, split, register, image_size, *, max_objects) to a `Record` — raw content
before tokenization. The packer lays a record out according to the mix key it was drawn for
(see `documents.py`).
`Record` already allows several images, so video clips plug in here without touching the
packer: register e.g. `"clip"` returning the frames of objects moving across the grid (scenes
re-rendered with shifted cells) and, for action-conditioned clips, the actions as text between
frames; then give the new mix key a layout in `documents.py` and a `DocKind` id (5.. reserved).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import numpy as np

from moesaic.config import DataConfig
from moesaic.data.world import captions, knowledge, scenes, text


@dataclasses.dataclass
class Record:
    """Raw content of one document: text and/or images (HWC float32 in [-1, 1])."""

    text: str = ""
    images: tuple[np.ndarray, ...] = ()
    answer: str = ""  # for question records: `text` is the question
    scene: scenes.Scene | None = None
    # text documents only: `text` cut into pieces (piece, carries text loss), e.g. the held-out
    # knowledge probes score only attribute values; empty means all of `text` carries loss
    pieces: tuple[tuple[str, bool], ...] = ()


# (rng, split, register, image_size, *, max_objects) -> Record
Generator = Callable[..., Record]
GENERATORS: dict[str, Generator] = {}


def register(name: str) -> Callable[[Generator], Generator]:
    def deco(fn: Generator) -> Generator:
        GENERATORS[name] = fn
        return fn

    return deco


@register("text")
def _general(
    rng: random.Random,
    split: str,
    register: str,
    image_size: int,
    *,
    max_objects: int = scenes.MAX_OBJECTS,
) -> Record:
    return Record(text=text.general_document(rng))


@register("ood_text")
def _ood(
    rng: random.Random,
    split: str,
    register: str,
    image_size: int,
    *,
    max_objects: int = scenes.MAX_OBJECTS,
) -> Record:
    return Record(text=text.ood_document(rng))


@register("scene")
def _scene(
    rng: random.Random,
    split: str,
    register: str,
    image_size: int,
    *,
    max_objects: int = scenes.MAX_OBJECTS,
) -> Record:
    scene = scenes.sample_scene(rng, split, max_objects)
    cap = captions.caption(scene, register, rng)
    return Record(text=cap, images=(scenes.render(scene, image_size),), scene=scene)


@register("vqa")
def _vqa(
    rng: random.Random,
    split: str,
    register: str,
    image_size: int,
    *,
    max_objects: int = scenes.MAX_OBJECTS,
) -> Record:
    scene = scenes.sample_scene(rng, split, max_objects)
    q, a = captions.question_answer(scene, rng)
    return Record(text=q, images=(scenes.render(scene, image_size),), answer=a, scene=scene)


@register("caption")
def _caption(
    rng: random.Random,
    split: str,
    register: str,
    image_size: int,
    *,
    max_objects: int = scenes.MAX_OBJECTS,
) -> Record:
    """A scene's caption without its image: the same draws as `scene`, so the same rng gives
    the same caption (caption document g is image_caption document g's caption)."""
    scene = scenes.sample_scene(rng, split, max_objects)
    return Record(text=captions.caption(scene, register, rng), scene=scene)


# Which generator feeds each mix key.
GENERATOR_FOR_KIND = {
    "text": "text",
    "caption_image": "scene",
    "image_caption": "scene",
    "image": "scene",
    "vqa": "vqa",
    "ood_text": "ood_text",
    "caption": "caption",
}


class WorldSource:
    """The built-in world as a packer source: every kind, generated on demand.

    With a knowledge base, the text documents picked by `knowledge.is_biography(index,
    knowledge_share)` are biographies in training phrasing; all other documents are exactly
    those of the world without one (same generator, same random numbers).
    """

    kinds = tuple(GENERATOR_FOR_KIND)

    def __init__(
        self,
        split: str,
        register: str,
        image_size: int,
        max_objects: int = scenes.MAX_OBJECTS,
        knowledge_base: knowledge.KnowledgeBase | None = None,
        knowledge_share: float = 1.0,
    ):
        from collections import Counter

        captions.check_register(register)
        scenes.layout(image_size)  # validates the size
        scenes.check_max_objects(max_objects)
        self.split, self.register, self.image_size = split, register, image_size
        self.max_objects = max_objects
        self.knowledge, self.knowledge_share = knowledge_base, knowledge_share
        self.skipped: Counter = Counter()  # the world never yields bad records

    @classmethod
    def from_config(cls, cfg: DataConfig, split: str) -> WorldSource:
        kb = cfg.knowledge
        base = knowledge.knowledge_base(kb.entities, kb.attributes) if kb.entities else None
        return cls(split, cfg.caption_register, cfg.image_size, cfg.max_objects, base, kb.share)

    def record(self, kind: str, index: int, rng: random.Random) -> Record | None:
        if (
            kind == "text"
            and self.knowledge is not None
            and knowledge.is_biography(index, self.knowledge_share)
        ):
            return Record(text=self.knowledge.document(rng))
        gen = GENERATORS[GENERATOR_FOR_KIND[kind]]
        return gen(rng, self.split, self.register, self.image_size, max_objects=self.max_objects)
