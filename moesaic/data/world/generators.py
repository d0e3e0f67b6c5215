"""The registry of world document generators: the one place new kinds of world data plug in.

A generator maps (rng, split, register, image_size, *, max_objects) to a `Record` — raw content
before tokenization. The packer lays a record out according to the mix key it was drawn for
(see `documents.py`). A record may hold several images: the frames of a clip (`clips.py`),
drawn for the mix keys `video` and `action_video` with the clip length range the source was
built with (`WorldSource(frames=...)`, from `data.video`), their actions as text in `actions`.
Clips keep the world's default object count (`scenes.MAX_OBJECTS`) whatever `max_objects`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import numpy as np

from moesaic.config import DataConfig
from moesaic.data.world import captions, clips, knowledge, scenes, text


@dataclasses.dataclass
class Record:
    """Raw content of one document: text and/or images (HWC float32 in [-1, 1]).

    Clips: `images` are the T frames and `actions` the T − 1 action texts between them (empty
    when the clip has none); world clips also carry their structured `clip`.
    """

    text: str = ""
    images: tuple[np.ndarray, ...] = ()
    answer: str = ""  # for question records: `text` is the question
    scene: scenes.Scene | None = None
    # text documents only: `text` cut into pieces (piece, carries text loss), e.g. the held-out
    # knowledge probes score only attribute values; empty means all of `text` carries loss
    pieces: tuple[tuple[str, bool], ...] = ()
    actions: tuple[str, ...] = ()
    clip: clips.Clip | None = None


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


def clip_record(
    rng: random.Random, split: str, image_size: int, frames: tuple[int, int] = (4, 8)
) -> Record:
    """A world clip of `frames[0]`–`frames[1]` frames (length uniform) with its actions."""
    clip = clips.random_clip(rng, split, *frames)
    images = clips.render_clip(clip, image_size)
    return Record(images=images, scene=clip.scenes[0], actions=clip.texts, clip=clip)


@register("clip")
def _clip(
    rng: random.Random,
    split: str,
    register: str,
    image_size: int,
    *,
    max_objects: int = scenes.MAX_OBJECTS,
) -> Record:
    return clip_record(rng, split, image_size)


# Which generator feeds each mix key.
GENERATOR_FOR_KIND = {
    "text": "text",
    "caption_image": "scene",
    "image_caption": "scene",
    "image": "scene",
    "vqa": "vqa",
    "ood_text": "ood_text",
    "caption": "caption",
    "video": "clip",
    "action_video": "clip",
}


class WorldSource:
    """The built-in world as a packer source: every kind, generated on demand.

    With a knowledge base, the text documents picked by `knowledge.is_biography(index,
    knowledge_share)` are biographies in training phrasing; all other documents are exactly
    those of the world without one (same generator, same random numbers). Clips have
    `frames` = (min, max) frames (`data.video.min_frames`, `max_frames`).
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
        frames: tuple[int, int] = (4, 8),
    ):
        from collections import Counter

        captions.check_register(register)
        scenes.layout(image_size)  # validates the size
        scenes.check_max_objects(max_objects)
        clips.check_frames(*frames)
        self.split, self.register, self.image_size = split, register, image_size
        self.max_objects = max_objects
        self.knowledge, self.knowledge_share = knowledge_base, knowledge_share
        self.frames = (int(frames[0]), int(frames[1]))
        self.skipped: Counter = Counter()  # the world never yields bad records

    @classmethod
    def from_config(cls, cfg: DataConfig, split: str) -> WorldSource:
        kb = cfg.knowledge
        base = knowledge.knowledge_base(kb.entities, kb.attributes) if kb.entities else None
        frames = (cfg.video.min_frames, cfg.video.max_frames)
        return cls(
            split, cfg.caption_register, cfg.image_size, cfg.max_objects, base, kb.share, frames
        )

    def record(self, kind: str, index: int, rng: random.Random) -> Record | None:
        if (
            kind == "text"
            and self.knowledge is not None
            and knowledge.is_biography(index, self.knowledge_share)
        ):
            return Record(text=self.knowledge.document(rng))
        name = GENERATOR_FOR_KIND[kind]
        if name == "clip":
            return clip_record(rng, self.split, self.image_size, self.frames)
        gen = GENERATORS[name]
        return gen(rng, self.split, self.register, self.image_size, max_objects=self.max_objects)
