"""The registry of world document generators: the one place new kinds of world data plug in.

A generator maps (rng, split, register) to a `Record` — raw content before tokenization. The
packer lays a record out according to the mix key it was drawn for (see `documents.py`).
A record may hold several images: the frames of a clip (`clips.py`), drawn for the mix keys
`video` and `action_video` with the clip length range the source was built with
(`WorldSource(frames=...)`, from `data.video`), their actions as text in `actions`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import numpy as np

from moesaic.data.world import captions, clips, scenes, text


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
    actions: tuple[str, ...] = ()
    clip: clips.Clip | None = None


Generator = Callable[[random.Random, str, str, int], Record]
GENERATORS: dict[str, Generator] = {}


def register(name: str) -> Callable[[Generator], Generator]:
    def deco(fn: Generator) -> Generator:
        GENERATORS[name] = fn
        return fn

    return deco


@register("text")
def _general(rng: random.Random, split: str, register: str, image_size: int) -> Record:
    return Record(text=text.general_document(rng))


@register("ood_text")
def _ood(rng: random.Random, split: str, register: str, image_size: int) -> Record:
    return Record(text=text.ood_document(rng))


@register("scene")
def _scene(rng: random.Random, split: str, register: str, image_size: int) -> Record:
    scene = scenes.sample_scene(rng, split)
    cap = captions.caption(scene, register, rng)
    return Record(text=cap, images=(scenes.render(scene, image_size),), scene=scene)


@register("vqa")
def _vqa(rng: random.Random, split: str, register: str, image_size: int) -> Record:
    scene = scenes.sample_scene(rng, split)
    q, a = captions.question_answer(scene, rng)
    return Record(text=q, images=(scenes.render(scene, image_size),), answer=a, scene=scene)


def clip_record(
    rng: random.Random, split: str, image_size: int, frames: tuple[int, int] = (4, 8)
) -> Record:
    """A world clip of `frames[0]`–`frames[1]` frames (length uniform) with its actions."""
    clip = clips.random_clip(rng, split, *frames)
    images = clips.render_clip(clip, image_size)
    return Record(images=images, scene=clip.scenes[0], actions=clip.texts, clip=clip)


@register("clip")
def _clip(rng: random.Random, split: str, register: str, image_size: int) -> Record:
    return clip_record(rng, split, image_size)


# Which generator feeds each mix key.
GENERATOR_FOR_KIND = {
    "text": "text",
    "caption_image": "scene",
    "image_caption": "scene",
    "image": "scene",
    "vqa": "vqa",
    "ood_text": "ood_text",
    "video": "clip",
    "action_video": "clip",
}


class WorldSource:
    """The built-in world as a packer source: every kind, generated on demand. Clips have
    `frames` = (min, max) frames (`data.video.min_frames`, `max_frames`)."""

    kinds = tuple(GENERATOR_FOR_KIND)

    def __init__(
        self, split: str, register: str, image_size: int, frames: tuple[int, int] = (4, 8)
    ):
        from collections import Counter

        captions.check_register(register)
        scenes.layout(image_size)  # validates the size
        clips.check_frames(*frames)
        self.split, self.register, self.image_size = split, register, image_size
        self.frames = (int(frames[0]), int(frames[1]))
        self.skipped: Counter = Counter()  # the world never yields bad records

    def record(self, kind: str, index: int, rng: random.Random) -> Record | None:
        name = GENERATOR_FOR_KIND[kind]
        if name == "clip":
            return clip_record(rng, self.split, self.image_size, self.frames)
        return GENERATORS[name](rng, self.split, self.register, self.image_size)
