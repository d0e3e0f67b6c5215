"""Caption parser: reads a world caption (any register) back into the scene it describes.

Used to score generated captions (`tasks.py`). It inverts the templates in
`moesaic.data.world.captions` using only their data (`attribute_phrases(register)` of every
register), so new phrasings added there are understood without changes here.

How: the caption is lowercased and scanned left to right for attribute phrases (longest
phrase first, whole words only), over the union of all registers' phrase tables, so a caption
in any register — or a mixture, as a model may write — parses. In every object template the
position comes last, so a position phrase closes the current object; an attribute that the
current object already has also closes it (a generated caption that forgot a position). The
background is the one background word the caption names (a conflict leaves it unknown).
Object phrases that name a cell twice keep only the first object there.

Attributes are indices into the world's SHAPES / COLOURS / SIZES / POSITIONS tables; an
attribute the caption never states is None.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from moesaic.data.world.captions import REGISTERS, attribute_phrases
from moesaic.data.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
)

ATTRIBUTES = ("shape", "colour", "size", "position")
_VALUES = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}


@dataclasses.dataclass(frozen=True)
class ObjectGuess:
    """One object as stated by a caption; None where the caption does not say."""

    shape: int | None = None
    colour: int | None = None
    size: int | None = None
    cell: int | None = None

    @property
    def complete(self) -> bool:
        return None not in (self.shape, self.colour, self.size, self.cell)

    @staticmethod
    def of(obj: SceneObject) -> ObjectGuess:
        return ObjectGuess(obj.shape, obj.colour, obj.size, obj.cell)


@dataclasses.dataclass(frozen=True)
class ParsedCaption:
    objects: tuple[ObjectGuess, ...]
    background: int | None

    @property
    def scene(self) -> Scene | None:
        """The scene, when the caption states every attribute of every object (else None)."""
        if self.background is None or not self.objects:
            return None
        if not all(o.complete for o in self.objects):
            return None
        objs = [SceneObject(o.cell, o.shape, o.colour, o.size) for o in self.objects]
        return Scene(tuple(sorted(objs)), self.background)


@functools.lru_cache(maxsize=1)
def _phrase_table() -> tuple[re.Pattern, dict[str, tuple[str, int]]]:
    """Regex over every phrase of every register, and phrase -> (attribute, value index)."""
    table: dict[str, tuple[str, int]] = {}
    for register in REGISTERS:
        for attr, by_value in attribute_phrases(register).items():
            for value, phrases in by_value.items():
                entry = (attr, _VALUES[attr].index(value))
                for phrase in phrases:
                    key = phrase.lower()
                    if table.setdefault(key, entry) != entry:
                        raise ValueError(f"caption phrase '{key}' is ambiguous across registers")
    alternatives = sorted(table, key=lambda p: (-len(p), p))
    body = "|".join(re.escape(p) for p in alternatives)
    return re.compile(rf"(?<![a-z])(?:{body})(?![a-z])"), table


def phrase_mentions(text: str) -> list[tuple[str, int]]:
    """(attribute, value index) of each attribute phrase in `text`, in order."""
    pattern, table = _phrase_table()
    return [table[m.group(0)] for m in pattern.finditer(text.lower())]


def parse_caption(text: str) -> ParsedCaption:
    """Parse a caption of any register into objects and background (see module doc)."""
    objects: list[ObjectGuess] = []
    backgrounds: set[int] = set()
    current: dict[str, int] = {}

    def close() -> None:
        if current:
            objects.append(
                ObjectGuess(
                    current.get("shape"),
                    current.get("colour"),
                    current.get("size"),
                    current.get("position"),
                )
            )
            current.clear()

    for attr, value in phrase_mentions(text):
        if attr == "background":
            backgrounds.add(value)
            continue
        if attr in current:
            close()
        current[attr] = value
        if attr == "position":
            close()
    close()
    seen: set[int] = set()
    kept = []
    for o in objects:
        if o.cell is not None and o.cell in seen:
            continue
        if o.cell is not None:
            seen.add(o.cell)
        kept.append(o)
    background = backgrounds.pop() if len(backgrounds) == 1 else None
    return ParsedCaption(tuple(kept), background)
