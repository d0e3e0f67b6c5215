"""Captions and visual questions about scenes, as structured templates.

Registers (`data.caption_register`):
- `terse`: alt-text-like fragments, a narrow vocabulary and few templates
  ("small red circle top left, large blue bar centre; black background");
- `plain`: one simple sentence ("A small red circle at the top left and ... on a black
  background.");
- `natural`: several sentences in the register of the general text (narrative function words,
  synonyms for sizes and positions);
- `mixed`: each caption picks one of the three registers at random.

Everything a caption can say is data in `REGISTERS` (templates with `{objects}` /
`{background}` / `{count}` slots, per-object phrase templates, joiners and the word choices for
each attribute value), so an evaluator can invert it: `attribute_phrases(register)` lists, per
attribute, the phrases that can stand for each value. Every caption names every object's size,
colour, shape and position, and the background, so a caption determines its scene.
"""

from __future__ import annotations

import dataclasses
import random

from moesaic.config import CAPTION_REGISTERS
from moesaic.data.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
)
from moesaic.errors import ConfigError

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SHAPE_PLURALS = {s: s + ("es" if s == "cross" else "s") for s in SHAPES}


@dataclasses.dataclass(frozen=True)
class Register:
    """How one register talks about a scene."""

    name: str
    templates: tuple[str, ...]  # slots: {objects} {background} {count}
    object_templates: tuple[str, ...]  # slots: {size} {colour} {shape} {position}
    joiners: tuple[str, ...]  # between object phrases; the last join may differ (see `last`)
    last_joiners: tuple[str, ...]
    sizes: dict[str, tuple[str, ...]]
    positions: dict[str, tuple[str, ...]]
    capitalize: bool = False


_TERSE_POS = {p: (p,) for p in POSITIONS}
_PLAIN_POS = {p: (f"at the {p}",) for p in POSITIONS} | {"centre": ("in the centre",)}
_NATURAL_POS = {
    "top left": ("in the top left corner", "up in the left corner"),
    "top": ("near the top", "at the top of the picture"),
    "top right": ("in the top right corner", "up in the right corner"),
    "left": ("on the left side", "over on the left"),
    "centre": ("right in the middle", "in the centre"),
    "right": ("on the right side", "over on the right"),
    "bottom left": ("in the bottom left corner", "down in the left corner"),
    "bottom": ("near the bottom", "at the bottom of the picture"),
    "bottom right": ("in the bottom right corner", "down in the right corner"),
}

REGISTERS: dict[str, Register] = {
    "terse": Register(
        name="terse",
        templates=(
            "{objects}; {background} background",
            "{objects}, {background} bg",
            "{count} shapes: {objects}; {background} background",
            "image: {objects} on {background}",
        ),
        object_templates=(
            "{size} {colour} {shape} {position}",
            "{colour} {shape}, {size}, {position}",
        ),
        joiners=(", ",),
        last_joiners=(", ",),
        sizes={"small": ("small",), "large": ("large",)},
        positions=_TERSE_POS,
    ),
    "plain": Register(
        name="plain",
        templates=(
            "{objects} on a {background} background.",
            "There is {objects} on a {background} background.",
            "A {background} background with {objects}.",
        ),
        object_templates=("a {size} {colour} {shape} {position}",),
        joiners=(", ",),
        last_joiners=(" and ",),
        sizes={"small": ("small",), "large": ("large",)},
        positions=_PLAIN_POS,
        capitalize=True,
    ),
    "natural": Register(
        name="natural",
        templates=(
            "In this picture we can see {objects}. The background is {background}.",
            "Someone has drawn {objects}. All of it sits on a plain {background} background.",
            "Look closely and you will find {objects}; the rest of the picture is {background}.",
            "The picture shows {count} things: {objects}. Behind them the page is {background}.",
        ),
        object_templates=(
            "a {size} {colour} {shape} {position}",
            "a {colour} {shape} that is rather {size}, {position}",
        ),
        joiners=(", ", "; there is also "),
        last_joiners=(", and ", ", and finally "),
        sizes={"small": ("small", "little", "tiny"), "large": ("large", "big")},
        positions=_NATURAL_POS,
    ),
}
assert (*REGISTERS, "mixed") == CAPTION_REGISTERS  # the config names every register


def check_register(name: str) -> None:
    if name not in CAPTION_REGISTERS:
        raise ConfigError(
            f"data.caption_register='{name}' is not one of {', '.join(CAPTION_REGISTERS)}"
        )


def attribute_phrases(register: str) -> dict[str, dict[str, tuple[str, ...]]]:
    """For each attribute, the phrases a register may use for each value (for caption parsers)."""
    reg = REGISTERS[register]
    return {
        "size": dict(reg.sizes),
        "colour": {c: (c,) for c in COLOURS},
        "shape": {s: (s,) for s in SHAPES},
        "position": dict(reg.positions),
        "background": {b: (b,) for b in BACKGROUNDS},
    }


def object_phrase(obj: SceneObject, reg: Register, rng: random.Random) -> str:
    w = obj.words
    return rng.choice(reg.object_templates).format(
        size=rng.choice(reg.sizes[w["size"]]),
        colour=w["colour"],
        shape=w["shape"],
        position=rng.choice(reg.positions[w["position"]]),
    )


def caption(scene: Scene, register: str, rng: random.Random) -> str:
    """A caption of `scene` in `register` (terse | plain | natural | mixed)."""
    if register == "mixed":
        register = rng.choice(tuple(REGISTERS))
    reg = REGISTERS[register]
    objs = list(scene.objects)
    rng.shuffle(objs)
    phrases = [object_phrase(o, reg, rng) for o in objs]
    text = phrases[0]
    for i, p in enumerate(phrases[1:], start=1):
        join = rng.choice(reg.last_joiners if i == len(phrases) - 1 else reg.joiners)
        text += join + p
    out = rng.choice(reg.templates).format(
        objects=text,
        background=BACKGROUNDS[scene.background],
        count=NUMBER_WORDS[len(objs)] if register == "natural" else len(objs),
    )
    return out[0].upper() + out[1:] if reg.capitalize else out


# ------------------------------------------------------------------ visual questions


def question_answer(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A visual question about `scene` and its short answer."""
    objs = scene.objects
    shapes = [o.shape for o in objs]
    kinds = ["count_all", "count_shape", "exists", "where"]
    unique = [o for o in objs if shapes.count(o.shape) == 1]
    if unique:
        kinds += ["colour", "size"]
    kind = rng.choice(kinds)
    if kind == "colour":
        o = rng.choice(unique)
        return f"What colour is the {SHAPES[o.shape]}?", COLOURS[o.colour]
    if kind == "size":
        o = rng.choice(unique)
        return f"Is the {SHAPES[o.shape]} small or large?", SIZES[o.size]
    if kind == "count_all":
        return "How many objects are there?", NUMBER_WORDS[len(objs)]
    if kind == "count_shape":
        s = rng.randrange(len(SHAPES))
        return f"How many {SHAPE_PLURALS[SHAPES[s]]} are there?", NUMBER_WORDS[shapes.count(s)]
    if kind == "where":
        o = rng.choice(objs)
        return f"Where is the {COLOURS[o.colour]} {SHAPES[o.shape]}?", POSITIONS[o.cell]
    colour, shape = rng.randrange(len(COLOURS)), rng.randrange(len(SHAPES))
    present = any(o.colour == colour and o.shape == shape for o in objs)
    return f"Is there a {COLOURS[colour]} {SHAPES[shape]}?", "yes" if present else "no"
