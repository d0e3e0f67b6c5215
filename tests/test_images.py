"""The one image-decoding rule: every mode and bit depth, EXIF orientation, the pixel cap, and
the same pixels from every reader and from `sample --image`."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from moesaic.commands.sample import read_image
from moesaic.config import load_config
from moesaic.data import make_source
from moesaic.data.images import MAX_PIXELS, ImageError, decode_image
from moesaic.errors import DataError
from tests.image_files import bomb_png, encode, jpeg_with_size, png16_rgb

S = 4  # data.image_size of these tests: 4×4 files are decoded without resizing
ONE = 2 / 127.5  # tolerance of a value that went through 8-bit rounding
WHITE, BLACK = (1.0, 1.0, 1.0), (-1.0, -1.0, -1.0)


def _grey16():
    v = np.array([[0, 20000, 40000, 65535]] * S, dtype=np.uint16)
    return encode(Image.fromarray(v)), np.repeat((v / 65535.0 * 2 - 1)[..., None], 3, -1)


def _rgb16():
    px = np.zeros((S, S, 3), dtype=np.uint16)
    px[...] = (65535, 0, 0x8080)  # 8 bits kept: 255, 0, 128
    return png16_rgb(px), np.broadcast_to([1.0, -1.0, 128 / 127.5 - 1], (S, S, 3))


def _palette_transparent():
    img = Image.new("P", (S, S), 0)
    img.putpalette([0, 0, 0, 255, 0, 0])
    img.paste(1, (2, 0, 4, 4))  # right half red, left half transparent black
    want = np.zeros((S, S, 3))
    want[:, :2] = WHITE
    want[:, 2:] = (1.0, -1.0, -1.0)
    return encode(img, transparency=0), want


def _rgba():
    img = Image.new("RGBA", (S, S), (0, 0, 0, 0))  # transparent black
    img.paste((0, 0, 255, 255), (0, 2, 4, 4))  # opaque blue bottom half
    want = np.zeros((S, S, 3))
    want[:2] = WHITE
    want[2:] = (-1.0, -1.0, 1.0)
    return encode(img), want


def _la():
    img = Image.new("LA", (S, S), (0, 0))
    img.paste((0, 255), (0, 0, 2, 4))  # opaque black left half
    want = np.zeros((S, S, 3))
    want[:, :2] = BLACK
    want[:, 2:] = WHITE
    return encode(img), want


def _cmyk():
    return encode(Image.new("CMYK", (S, S), (255, 0, 0, 0)), "TIFF"), np.broadcast_to(
        (-1.0, 1.0, 1.0), (S, S, 3)
    )


def _bilevel():
    img = Image.new("1", (S, S), 0)
    img.paste(1, (0, 0, 4, 2))
    want = np.zeros((S, S, 3))
    want[:2], want[2:] = WHITE, BLACK
    return encode(img), want


def _float():
    v = np.array([[-5.0, 0.0, 127.5, 300.0]] * S, dtype=np.float32)  # Pillow's 8-bit scale
    want = np.clip(v / 255.0, 0, 1) * 2 - 1
    return encode(Image.fromarray(v), "TIFF"), np.repeat(want[..., None], 3, -1)


def _int32():
    v = np.array([[0, 32768, 65535, 100000]] * S, dtype=np.int32)
    want = np.clip(v / 65535.0, 0, 1) * 2 - 1
    return encode(Image.fromarray(v), "TIFF"), np.repeat(want[..., None], 3, -1)


def _exif_rotated():
    """Stored 8×4 with the left half red, tagged 'rotate 90° clockwise to display': shown 4×8
    with red on top; the centre crop keeps the middle rows: red above blue."""
    img = Image.new("RGB", (8, 4), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 4, 4))
    exif = Image.Exif()
    exif[0x0112] = 6
    want = np.zeros((S, S, 3))
    want[:2] = (1.0, -1.0, -1.0)
    want[2:] = (-1.0, -1.0, 1.0)
    return encode(img, exif=exif), want


CASES = {
    "grey16": _grey16,
    "rgb16": _rgb16,
    "palette_transparent": _palette_transparent,
    "rgba": _rgba,
    "la": _la,
    "cmyk": _cmyk,
    "bilevel": _bilevel,
    "float": _float,
    "int32": _int32,
    "exif_rotated": _exif_rotated,
}


def _folder_decode(tmp_path, data: bytes, suffix: str, channels: int) -> np.ndarray:
    """The pixels the folder reader trains on for this file."""
    root = tmp_path / "folder"
    root.mkdir()
    (root / f"x{suffix}").write_bytes(data)
    (root / "captions.jsonl").write_text(json.dumps({"file": f"x{suffix}", "caption": "x"}))
    cfg = load_config(
        "tiny",
        [
            "data.source=folder",
            f"data.paths=[{root}]",
            f"data.image_size={S}",
            "data.patch_size=2",
            f"data.channels={channels}",
        ],  # fmt: skip
    ).data
    src = make_source(cfg, "train")
    return src.load(src.items[0]).images[0]


@pytest.mark.parametrize("name", list(CASES))
def test_every_mode_decodes_to_its_colours(tmp_path, name):
    data, want = CASES[name]()
    suffix = ".tif" if data[:2] in (b"II", b"MM") else ".png"
    x = decode_image(data, S, 3)
    assert x.shape == (S, S, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x, want, atol=ONE)
    # One rule: the folder reader and `sample --image` give exactly the same pixels.
    assert np.array_equal(_folder_decode(tmp_path, data, suffix, 3), x)
    (tmp_path / f"in{suffix}").write_bytes(data)
    assert np.array_equal(read_image(tmp_path / f"in{suffix}", S, 3), x)


def test_grey_channel_and_16_bit_precision():
    data, want = _grey16()
    grey = decode_image(data, S, 1)
    assert grey.shape == (S, S, 1)
    # 16-bit values keep more than 8 bits of precision (20000/65535 is not an 8-bit level).
    np.testing.assert_allclose(grey[..., 0], want[..., 0], atol=1e-6)
    rgb = decode_image(_rgba()[0], S, 1)  # alpha composited, then luma
    np.testing.assert_allclose(rgb[:2, :, 0], 1.0, atol=ONE)


def test_resizing_16_bit_is_area_averaging_in_float():
    v = np.zeros((8, 8), dtype=np.uint16)
    v[:, :4] = 65535
    x = decode_image(encode(Image.fromarray(v)), 2, 1)[..., 0]
    np.testing.assert_allclose(x, [[1.0, -1.0], [1.0, -1.0]], atol=1e-6)


def test_non_finite_float_image_is_bad():
    v = np.full((S, S), np.nan, dtype=np.float32)
    with pytest.raises(ImageError, match="NaN") as e:
        decode_image(encode(Image.fromarray(v), "TIFF"), S)
    assert e.value.reason == "bad_image"


@pytest.mark.parametrize(
    "data",
    [bomb_png(9000, 9000), bomb_png(100_000, 100_000), jpeg_with_size(60000, 60000)],
    ids=["over-our-cap", "over-pillows-cap", "jpeg"],
)
def test_decompression_bombs_are_refused_before_decoding(data):
    assert MAX_PIXELS < 9000 * 9000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError) as e:
            decode_image(data, S)
    assert e.value.reason == "too_large"


def test_only_known_formats_are_opened():
    """Content Pillow would open as another format (here ICO, like EPS or PSD) is refused."""
    ico = encode(Image.new("RGB", (16, 16), (255, 0, 0)), "ICO")
    with pytest.raises(ImageError, match="not an image") as e:
        decode_image(ico, S)
    assert e.value.reason == "bad_image"


def test_sample_image_errors_are_one_line_data_errors(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(100_000, 100_000))
    with pytest.raises(DataError, match=r"over the limit|more than .* pixels.*downscale"):
        read_image(bomb, S)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    cut = tmp_path / "cut.png"
    cut.write_bytes(encode(Image.fromarray(noise))[:4000])
    with pytest.raises(DataError, match="is not an image that can be read") as e:
        read_image(cut, S)
    assert "\n" not in str(e.value)
