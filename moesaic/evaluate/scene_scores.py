"""How well a stated scene matches the true one: the scores of the captioning, text-to-image
and world-model tasks.

Scene comparison (`score_scenes`). Predicted objects are matched one-to-one to true objects by
the assignment that maximises the number of agreeing attributes (shape, colour, size,
position; exhaustive search, scenes hold at most 3 true objects). Attribute accuracy =
agreeing matched pairs / Σ max(#true, #predicted) over scenes, so a missing or an invented
object costs every attribute once. `count`: the number of objects is right; `background`: the
background is right; `exact`: the predicted scene equals the true one (all objects with all
attributes, no extra object, and the background).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from moesaic.data.world.scenes import Scene
from moesaic.evaluate.caption_parser import ATTRIBUTES, ObjectGuess

SCENE_METRICS = (*ATTRIBUTES, "count", "background", "exact")


def _fields(o: ObjectGuess) -> tuple[int | None, ...]:
    return (o.shape, o.colour, o.size, o.cell)


def _agreement(a: ObjectGuess, b: ObjectGuess) -> tuple[bool, ...]:
    return tuple(x is not None and x == y for x, y in zip(_fields(a), _fields(b), strict=True))


def match_objects(
    true: Sequence[ObjectGuess], pred: Sequence[ObjectGuess]
) -> list[tuple[int, int]]:
    """The one-to-one (true index, predicted index) pairing with the most agreeing attributes
    (ties: the first in itertools order, so the result is deterministic)."""
    if not true or not pred:
        return []
    score = [[sum(_agreement(t, p)) for p in pred] for t in true]
    if len(true) <= len(pred):
        candidates = (
            list(zip(range(len(true)), perm, strict=True))
            for perm in itertools.permutations(range(len(pred)), len(true))
        )
    else:
        candidates = (
            list(zip(perm, range(len(pred)), strict=True))
            for perm in itertools.permutations(range(len(true)), len(pred))
        )
    return max(candidates, key=lambda pairs: sum(score[i][j] for i, j in pairs))


def score_scenes(
    predicted: Sequence[tuple[Sequence[ObjectGuess], int | None]],
    true: Sequence[Scene],
) -> dict[str, float]:
    """Per-attribute, count, background and exact-scene accuracy (module doc), in [0, 1].

    predicted[i] = (objects, background) stated for true[i]; None = not stated.
    """
    if len(predicted) != len(true):
        raise ValueError(f"{len(predicted)} predictions for {len(true)} scenes")
    hits = dict.fromkeys(SCENE_METRICS, 0)
    slots = 0
    for (objs, bg), scene in zip(predicted, true, strict=True):
        t_objs = [ObjectGuess.of(o) for o in scene.objects]
        pairs = match_objects(t_objs, objs)
        slots += max(len(t_objs), len(objs))
        for i, j in pairs:
            for attr, ok in zip(ATTRIBUTES, _agreement(objs[j], t_objs[i]), strict=True):
                hits[attr] += ok
        hits["count"] += len(objs) == len(t_objs)
        hits["background"] += bg is not None and bg == scene.background
        same_objects = sorted(map(_fields, objs), key=str) == sorted(map(_fields, t_objs), key=str)
        hits["exact"] += same_objects and bg == scene.background
    n = max(len(true), 1)
    out = {a: hits[a] / max(slots, 1) for a in ATTRIBUTES}
    out |= {k: hits[k] / n for k in ("count", "background", "exact")}
    return out
