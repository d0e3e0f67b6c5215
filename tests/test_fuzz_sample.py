"""Fuzzing `sample`'s inputs and outputs: `--image` files of random bytes, truncated images of
every format, huge declared dimensions; `--out` names of any suffix. Nothing but the
project's one-line errors may escape; what is read is finite pixels in [-1, 1], what is written
is the format its suffix names."""

from __future__ import annotations

import string
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from moesaic.commands.sample import OUT_FORMATS, read_image, write_image
from moesaic.errors import ConfigError, DataError
from tests.fuzz_utils import FAST, SLOW, OpenGuard, image_bytes


def read_property(data: bytes, size: int, channels: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.png"
        path.write_bytes(data)
        with OpenGuard() as guard, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own warnings about odd files
            try:
                x = read_image(path, size, channels)
            except DataError as e:
                assert str(e).startswith(f"--image '{path}' ") and "\n" not in str(e)
                return
        assert guard.outside(Path(tmp)) == []
    assert x.shape == (size, size, channels) and x.dtype == np.float32
    assert np.isfinite(x).all() and np.abs(x).max() <= 1.0


sizes = st.sampled_from([1, 2, 4, 8, 16])
channel_counts = st.sampled_from([1, 3])


@FAST
@given(image_bytes, sizes, channel_counts)
def test_fuzz_read_image(data, size, channels):
    read_property(data, size, channels)


@pytest.mark.slow
@SLOW
@given(image_bytes, sizes, channel_counts)
def test_fuzz_read_image_long(data, size, channels):
    read_property(data, size, channels)


suffixes = st.one_of(
    st.sampled_from([*OUT_FORMATS, ".PNG", ".Jpg", ".xyz", ".png.txt", "", ".", ".pdf", ".eps"]),
    st.text(string.ascii_letters + string.digits + ".", max_size=6),
)


@FAST
@given(suffixes, st.integers(1, 3), channel_counts)
def test_fuzz_write_image(suffix, scale, channels):
    image = np.linspace(-1, 1, 4 * 4 * channels, dtype=np.float32).reshape(4, 4, channels)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"s{suffix}"
        try:
            write_image(image, out, scale)
        except ConfigError as e:
            assert out.suffix.lower() not in OUT_FORMATS and "\n" not in str(e)
            assert list(Path(tmp).iterdir()) == []
            return
        with Image.open(out) as im:
            assert im.format == OUT_FORMATS[out.suffix.lower()]
            assert im.size == (4 * scale, 4 * scale)
