"""Scenes of the built-in world: what they hold, how they are drawn, how splits are disjoint.

A scene is a plain background with 1–3 objects (1 to `data.max_objects`, up to 9), each with a
shape, a colour, a size and a cell of a 3×3 grid (at most one object per cell, so objects never
overlap). Drawing is exact and pixel-aligned: the image is split into 3×3 cells of
`c = image_size // 3` pixels (centred, the left-over border is background); a large object
fills a `c×c` shape mask, a small one a `s×s` mask (`s ≈ 0.6·c`) centred in its cell. Every
(shape, size) mask is distinct, which is what lets `parser.parse_scenes` recover scenes exactly.

Splits are disjoint by construction:
- test scenes contain at least one object whose (shape, colour) pair is *held out*
  (`HELD_OUT_PAIRS`); train and val scenes contain none;
- val scenes are the non-test scenes whose canonical hash falls in 1/`VAL_MODULUS` of the hash
  space; train scenes are all the others. So no train scene can ever appear in val or test.
"""

from __future__ import annotations

import dataclasses
import functools
import random

import numpy as np

from moesaic.config import check_max_objects
from moesaic.errors import ConfigError

SHAPES = ("square", "circle", "triangle", "cross", "ring", "bar")
COLOURS = (
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "cyan",
    "pink",
    "white",
    "brown",
)
COLOUR_RGB = np.array(
    [
        (220, 40, 40),
        (40, 170, 60),
        (40, 80, 230),
        (245, 225, 40),
        (140, 50, 190),
        (250, 140, 20),
        (40, 215, 225),
        (250, 140, 200),
        (250, 250, 250),
        (135, 85, 35),
    ],
    dtype=np.float32,
)
BACKGROUNDS = ("black", "grey", "navy")
BACKGROUND_RGB = np.array([(0, 0, 0), (95, 95, 95), (15, 20, 70)], dtype=np.float32)
SIZES = ("small", "large")
# Cells of the 3×3 grid in row-major order (0 = top left, 4 = centre, 8 = bottom right).
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
MAX_OBJECTS = 3  # the default of `data.max_objects` (any value up to the 9 cells)
VAL_MODULUS = 16

# (shape, colour) pairs that only ever appear in test scenes: a compositional hold-out, every
# shape and every colour still appears in training with other partners.
HELD_OUT_PAIRS = frozenset(
    (s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS)) if (3 * s + c) % 7 == 3
)

# Shape masks at the base resolution: large 5×5, small 3×3 (rows top to bottom).
_LARGE = {
    "square": ["11111", "11111", "11111", "11111", "11111"],
    "circle": ["01110", "11111", "11111", "11111", "01110"],
    "triangle": ["00100", "01110", "01110", "11111", "11111"],
    "cross": ["10001", "01010", "00100", "01010", "10001"],
    "ring": ["11111", "10001", "10001", "10001", "11111"],
    "bar": ["00000", "11111", "11111", "11111", "00000"],
}
_SMALL = {
    "square": ["111", "111", "111"],
    "circle": ["010", "111", "010"],
    "triangle": ["010", "111", "111"],
    "cross": ["101", "010", "101"],
    "ring": ["111", "101", "111"],
    "bar": ["000", "111", "000"],
}


@dataclasses.dataclass(frozen=True, order=True)
class SceneObject:
    """One object: indices into SHAPES, COLOURS, SIZES, POSITIONS."""

    cell: int
    shape: int
    colour: int
    size: int

    @property
    def words(self) -> dict[str, str]:
        return {
            "shape": SHAPES[self.shape],
            "colour": COLOURS[self.colour],
            "size": SIZES[self.size],
            "position": POSITIONS[self.cell],
        }


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects sorted by cell (row-major), and the background index."""

    objects: tuple[SceneObject, ...]
    background: int

    def key(self) -> int:
        """A canonical 64-bit hash (stable across processes and machines)."""
        h = mix64(self.background + 1)
        for o in self.objects:
            h = mix64(h ^ (o.cell * 1000 + o.shape * 100 + o.colour * 10 + o.size + 1))
        return h

    def split(self) -> str:
        if any((o.shape, o.colour) in HELD_OUT_PAIRS for o in self.objects):
            return "test"
        return "val" if self.key() % VAL_MODULUS == 0 else "train"


def mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-mixed, platform-independent integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a sequence of integers (seed, split id, source id, index, ...)."""
    h = 0x5EED
    for p in parts:
        h = mix64(h ^ (int(p) & 0xFFFFFFFFFFFFFFFF))
    return h >> 1


def _random_scene(rng: random.Random, force_held_out: bool, max_objects: int) -> Scene:
    """Test scenes: the first object has a held-out pair, the others any pair. Train/val
    scenes: only allowed pairs (sampled directly, so no rejection is needed for them)."""
    n = rng.randint(1, max_objects)
    cells = rng.sample(range(9), n)
    objects = []
    for i, cell in enumerate(cells):
        if force_held_out and i == 0:
            shape, colour = rng.choice(_HELD_OUT_LIST)
        elif force_held_out:
            shape, colour = rng.randrange(len(SHAPES)), rng.randrange(len(COLOURS))
        else:
            shape, colour = rng.choice(_ALLOWED_LIST)
        objects.append(SceneObject(cell, shape, colour, rng.randrange(len(SIZES))))
    return Scene(tuple(sorted(objects)), rng.randrange(len(BACKGROUNDS)))


_HELD_OUT_LIST = sorted(HELD_OUT_PAIRS)
_ALLOWED_LIST = sorted(
    (s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS)) if (s, c) not in HELD_OUT_PAIRS
)


def sample_scene(rng: random.Random, split: str = "train", max_objects: int = MAX_OBJECTS) -> Scene:
    """A random scene of `split` (train | val | test) with 1..`max_objects` objects, by
    rejection where needed. More objects per scene is the world's image-side dial of content
    per image (more objects to draw jointly, longer captions); the parser stays exact."""
    check_max_objects(max_objects)
    if split == "test":
        return _random_scene(rng, True, max_objects)
    if split not in ("train", "val"):
        raise ConfigError(f"split='{split}' is not one of train, val, test")
    while True:
        scene = _random_scene(rng, False, max_objects)
        if scene.split() == split:
            return scene


@dataclasses.dataclass(frozen=True)
class Layout:
    """Pixel geometry of an image size: cell size, offset and the (shape, size) masks."""

    image_size: int
    cell: int
    offset: int
    masks: np.ndarray  # [len(SHAPES) * len(SIZES), cell, cell] bool, index = shape * 2 + size

    def mask(self, shape: int, size: int) -> np.ndarray:
        return self.masks[shape * len(SIZES) + size]


def _upsample(rows: list[str], n: int) -> np.ndarray:
    base = np.array([[ch == "1" for ch in r] for r in rows], dtype=bool)
    idx = (np.arange(n) * base.shape[0]) // n
    return base[np.ix_(idx, idx)]


@functools.lru_cache(maxsize=8)
def layout(image_size: int) -> Layout:
    """The drawing geometry for `image_size` (≥ 15 so every shape mask stays distinct)."""
    if image_size < 15:
        raise ConfigError(
            f"data.image_size={image_size} is too small for the built-in world; use >= 15 "
            "(16 or 32)"
        )
    c = image_size // 3
    s = max(3, round(0.6 * c))
    lo = (c - s) // 2
    masks = np.zeros((len(SHAPES) * len(SIZES), c, c), dtype=bool)
    for i, name in enumerate(SHAPES):
        masks[2 * i + 1] = _upsample(_LARGE[name], c)
        masks[2 * i, lo : lo + s, lo : lo + s] = _upsample(_SMALL[name], s)
    flat = masks.reshape(len(masks), -1)
    assert len({m.tobytes() for m in flat}) == len(flat), "shape masks must be distinct"
    return Layout(image_size, c, (image_size - 3 * c) // 2, masks)


def to_unit(rgb: np.ndarray) -> np.ndarray:
    """0..255 colours to the [-1, 1] pixel range."""
    return rgb / 127.5 - 1.0


COLOUR_UNIT = to_unit(COLOUR_RGB)
BACKGROUND_UNIT = to_unit(BACKGROUND_RGB)


def render(scene: Scene, image_size: int = 16) -> np.ndarray:
    """The scene as an RGB image [image_size, image_size, 3] float32 in [-1, 1]."""
    lay = layout(image_size)
    img = np.empty((image_size, image_size, 3), dtype=np.float32)
    img[:] = BACKGROUND_UNIT[scene.background]
    c, o = lay.cell, lay.offset
    for obj in scene.objects:
        r, col = divmod(obj.cell, 3)
        view = img[o + r * c : o + (r + 1) * c, o + col * c : o + (col + 1) * c]
        view[lay.mask(obj.shape, obj.size)] = COLOUR_UNIT[obj.colour]
    return img


def patchify(image_HWC: np.ndarray, patch_size: int) -> np.ndarray:
    """[H, W, C] → [(H/p)·(W/p), p·p·C]: patches in row-major order, each flattened (p, p, C)."""
    H, W, C = image_HWC.shape
    p = patch_size
    x = image_HWC.reshape(H // p, p, W // p, p, C).transpose(0, 2, 1, 3, 4)
    return x.reshape((H // p) * (W // p), p * p * C)


def unpatchify(patches_NP: np.ndarray, image_size: int, patch_size: int) -> np.ndarray:
    """Inverse of `patchify`: [N, p·p·C] → [H, W, C]."""
    p, g = patch_size, image_size // patch_size
    C = patches_NP.shape[-1] // (p * p)
    x = patches_NP.reshape(g, g, p, p, C).transpose(0, 2, 1, 3, 4)
    return x.reshape(image_size, image_size, C)
