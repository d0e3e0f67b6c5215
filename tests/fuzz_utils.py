"""Shared pieces of the fuzz tests: hypothesis settings, hostile file contents, and a guard that
records every file opened while it is active."""

from __future__ import annotations

import builtins
import io
import json
import os
import tarfile
from pathlib import Path
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

from tests.image_files import bomb_png, encode, jpeg_with_size

# The default suite runs a few derandomised examples per test (fast, the same every run); the
# `slow` variants explore many more, randomly.
FAST = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CANARY_RGB = (13, 37, 201)  # the colour of the image outside every root
CANARY_TEXT = "CANARY-5f3a outside text"


class OpenGuard:
    """Records the path of every file opened through `open`, `io.open`, `Path.open`, Pillow and
    `tarfile` while active (`with OpenGuard() as g:`)."""

    def __init__(self):
        self.paths: list[str] = []

    def _wrap(self, original):
        def opener(file, *args, **kwargs):
            if isinstance(file, str | bytes | os.PathLike):
                self.paths.append(os.fsdecode(file))
            return original(file, *args, **kwargs)

        return opener

    def __enter__(self) -> OpenGuard:
        self._patches = [
            mock.patch("builtins.open", self._wrap(builtins.open)),
            mock.patch("io.open", self._wrap(io.open)),
            mock.patch("tarfile.bltn_open", self._wrap(tarfile.bltn_open)),
        ]
        for p in self._patches:
            p.start()
        return self

    def __exit__(self, *exc) -> None:
        for p in reversed(self._patches):
            p.stop()

    def outside(self, root: Path) -> list[str]:
        """Opened paths that do not resolve inside `root`."""
        root = root.resolve()
        return [p for p in self.paths if not Path(p).resolve().is_relative_to(root)]


def make_layout(base: Path) -> tuple[Path, Path]:
    """(root, outside): a source directory with symlinks out of it, and a canary directory."""
    root, outside = base / "root", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(encode(Image.new("RGB", (8, 8), CANARY_RGB)))
    (outside / "secret.txt").write_text(CANARY_TEXT + "\n")
    (outside / "secret.jsonl").write_text(json.dumps({"text": CANARY_TEXT}) + "\n")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "passwd.txt").symlink_to(outside / "secret.txt")
    (root / "dirlink").symlink_to(outside)
    (root / "loop").symlink_to(root)
    return root, outside


def _valid(mode: str, fmt: str, w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    try:
        return encode(img, fmt)
    except (OSError, ValueError, KeyError):  # a mode the format cannot store
        return encode(img.convert("RGB"), fmt)


valid_images = st.builds(
    _valid,
    mode=st.sampled_from(["RGB", "L", "RGBA", "P", "I;16", "1", "LA", "CMYK", "I", "F"]),
    fmt=st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"]),
    w=st.integers(1, 24),
    h=st.integers(1, 24),
    seed=st.integers(0, 2**16),
)
truncated_images = st.tuples(valid_images, st.floats(0, 1)).map(
    lambda t: t[0][: int(len(t[0]) * t[1])]
)
huge_images = st.one_of(
    st.builds(bomb_png, st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)),
    st.builds(jpeg_with_size, st.integers(1, 65535), st.integers(1, 65535)),
)
image_bytes = st.one_of(valid_images, truncated_images, huge_images, st.binary(max_size=300))
