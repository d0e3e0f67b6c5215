"""Clips of the built-in world: a scene evolving over T frames under actions written as text.

A clip is T scenes s_0 … s_{T−1} and T − 1 actions; action a_j turns s_{j−1} into s_j. One
action changes one object, so the clip stays inside the scene distribution (1–3 objects, one
per cell of the 3×3 grid, the background fixed):

    move    an object to an empty neighbouring cell     "move the red circle left"
    add     a new object in an empty cell (≤ 3 objects)  "add a small blue square top right"
    remove  an object (≥ 2 objects, never the last)      "remove the small green bar"
    paint   an object a different colour                 "paint the red circle green"

An action names its object by the shortest unambiguous description in the scene it acts on:
colour and shape, plus the size when another object shares them, plus the cell in front
("the top left small red circle") when that is still not unique (cells are, one object per
cell). The cell goes first so that it never runs into a move's direction.

Splits follow the scenes' (`scenes.py`): a *train* clip has only train scenes as frames; a
*val* clip starts from a val scene and never shows a held-out (shape, colour) pair; a *test*
clip starts from a test scene (it holds a held-out pair) and may do anything after that. So no
frame of a val or test clip's first scene appears in any train clip, and test clips are the
compositional hold-out. Actions are drawn uniformly among the feasible kinds, then uniformly
among their feasible arguments; train and val actions that would leave the split are redrawn.
Everything is a pure function of the `random.Random` passed in.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from moesaic.data.world.scenes import (
    COLOURS,
    HELD_OUT_PAIRS,
    MAX_OBJECTS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    render,
    sample_scene,
)
from moesaic.errors import ConfigError

ACTION_KINDS = ("move", "add", "remove", "paint")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
MIN_FRAMES = 2
MAX_TRIES = 1000
_ALLOWED = [
    (s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS)) if (s, c) not in HELD_OUT_PAIRS
]


@dataclasses.dataclass(frozen=True)
class Action:
    """One step. `obj` is the object acted on as it was before the step (for `add`: the new
    object, in its cell); `direction` names the move; `colour` is paint's new colour index."""

    kind: str
    obj: SceneObject
    direction: str = ""
    colour: int = -1

    def target(self) -> SceneObject | None:
        """The object after the step (None when it was removed)."""
        if self.kind == "move":
            dr, dc = DIRECTIONS[self.direction]
            r, c = divmod(self.obj.cell, 3)
            return dataclasses.replace(self.obj, cell=(r + dr) * 3 + c + dc)
        if self.kind == "paint":
            return dataclasses.replace(self.obj, colour=self.colour)
        return None if self.kind == "remove" else self.obj


@dataclasses.dataclass(frozen=True)
class Clip:
    scenes: tuple[Scene, ...]  # T frames
    actions: tuple[Action, ...]  # T − 1 steps
    texts: tuple[str, ...]  # the actions as text

    def split(self) -> str:
        """The split the clip belongs to (module doc)."""
        first = self.scenes[0].split()
        if first == "test":
            return "test"
        if any(s.split() == "test" for s in self.scenes):
            return "invalid"
        if first == "val":
            return "val"
        return "train" if all(s.split() == "train" for s in self.scenes) else "invalid"


def apply(scene: Scene, action: Action) -> Scene:
    """The scene after `action`."""
    objects = [o for o in scene.objects if o.cell != action.obj.cell]
    after = action.target()
    if action.kind != "add" and len(objects) == len(scene.objects):
        raise ValueError(f"{action} acts on an empty cell of {scene}")
    if after is not None:
        if any(o.cell == after.cell for o in objects):
            raise ValueError(f"{action} puts an object on an occupied cell of {scene}")
        objects.append(after)
    return Scene(tuple(sorted(objects)), scene.background)


def describe(scene: Scene, obj: SceneObject) -> str:
    """The shortest unambiguous name of `obj` in `scene` (module doc)."""
    w = obj.words
    same = [o for o in scene.objects if (o.shape, o.colour) == (obj.shape, obj.colour)]
    if len(same) == 1:
        return f"the {w['colour']} {w['shape']}"
    if sum(o.size == obj.size for o in same) == 1:
        return f"the {w['size']} {w['colour']} {w['shape']}"
    return f"the {w['position']} {w['size']} {w['colour']} {w['shape']}"


def action_text(scene: Scene, action: Action) -> str:
    """`action` (applied to `scene`) as the text the model is conditioned on."""
    if action.kind == "add":
        w = action.obj.words
        return f"add a {w['size']} {w['colour']} {w['shape']} {w['position']}"
    name = describe(scene, action.obj)
    if action.kind == "move":
        return f"move {name} {action.direction}"
    if action.kind == "paint":
        return f"paint {name} {COLOURS[action.colour]}"
    return f"remove {name}"


def _moves(scene: Scene) -> list[Action]:
    used = {o.cell for o in scene.objects}
    out = []
    for o in scene.objects:
        r, c = divmod(o.cell, 3)
        for name, (dr, dc) in DIRECTIONS.items():
            if 0 <= r + dr < 3 and 0 <= c + dc < 3 and (r + dr) * 3 + c + dc not in used:
                out.append(Action("move", o, direction=name))
    return out


def random_action(rng: random.Random, scene: Scene, any_pair: bool) -> Action:
    """A feasible action on `scene`: kind uniform among the feasible ones, then its arguments.
    New (shape, colour) pairs come from the allowed pairs unless `any_pair` (test clips)."""
    n = len(scene.objects)
    moves = _moves(scene)
    feasible = (bool(moves), n < MAX_OBJECTS, n > 1, True)
    kinds = [k for k, ok in zip(ACTION_KINDS, feasible, strict=True) if ok]
    kind = rng.choice(kinds)
    if kind == "move":
        return rng.choice(moves)
    if kind == "remove":
        return Action("remove", rng.choice(scene.objects))
    if kind == "add":
        free = [c for c in range(9) if c not in {o.cell for o in scene.objects}]
        cell = rng.choice(free)
        shape, colour = _pair(rng, any_pair)
        return Action("add", SceneObject(cell, shape, colour, rng.randrange(len(SIZES))))
    obj = rng.choice(scene.objects)
    while True:
        shape, colour = _pair(rng, any_pair, shape=obj.shape)
        if colour != obj.colour:
            return Action("paint", obj, colour=colour)


def _pair(rng: random.Random, any_pair: bool, shape: int = -1) -> tuple[int, int]:
    """A (shape, colour) pair, with a given shape when `shape` >= 0."""
    if any_pair:
        s = shape if shape >= 0 else rng.randrange(len(SHAPES))
        return s, rng.randrange(len(COLOURS))
    pool = [p for p in _ALLOWED if shape < 0 or p[0] == shape]
    return rng.choice(pool)


def sample_clip(rng: random.Random, split: str, frames: int) -> Clip:
    """A clip of `frames` scenes of `split` (module doc)."""
    if frames < MIN_FRAMES:
        raise ConfigError(f"a clip needs >= {MIN_FRAMES} frames, got {frames}")
    keep = ("train",) if split == "train" else ("train", "val")  # splits later frames may take
    scenes = [sample_scene(rng, split)]
    actions: list[Action] = []
    texts: list[str] = []
    for _ in range(frames - 1):
        scene = scenes[-1]
        for _ in range(MAX_TRIES):
            action = random_action(rng, scene, any_pair=split == "test")
            nxt = apply(scene, action)
            if split == "test" or nxt.split() in keep:
                break
        else:  # pragma: no cover - some action always keeps a scene in its split
            raise RuntimeError(f"no action keeps {scene} in split '{split}'")
        actions.append(action)
        texts.append(action_text(scene, action))
        scenes.append(nxt)
    return Clip(tuple(scenes), tuple(actions), tuple(texts))


def check_frames(min_frames: int, max_frames: int, path: str = "data.video") -> None:
    """Raise `ConfigError` unless MIN_FRAMES <= min_frames <= max_frames."""
    if min_frames < MIN_FRAMES:
        raise ConfigError(f"{path}.min_frames={min_frames} must be >= {MIN_FRAMES}")
    if max_frames < min_frames:
        raise ConfigError(
            f"{path}.max_frames={max_frames} must be >= {path}.min_frames={min_frames}"
        )


def random_clip(rng: random.Random, split: str, min_frames: int, max_frames: int) -> Clip:
    """A clip whose length is drawn uniformly from [min_frames, max_frames]."""
    return sample_clip(rng, split, rng.randint(min_frames, max_frames))


def render_clip(clip: Clip, image_size: int = 16) -> tuple[np.ndarray, ...]:
    """The frames of `clip`, each [image_size, image_size, 3] float32 in [-1, 1]."""
    return tuple(render(s, image_size) for s in clip.scenes)


__all__ = [
    "ACTION_KINDS",
    "Action",
    "Clip",
    "action_text",
    "apply",
    "check_frames",
    "describe",
    "random_action",
    "random_clip",
    "render_clip",
    "sample_clip",
]
