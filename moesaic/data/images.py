"""Untrusted image files → model pixels: the one decoding rule of every reader and of `sample`.

    open (known formats only) → pixel cap → decode → EXIF orientation → mode conversion
    → centre crop → resize → float32 [size, size, channels] in [-1, 1]

Every real-data reader (`moesaic.data.sources`) and `moesaic sample --image` call
`decode_image`, so a file means the same pixels in training and at inference.

Formats. Only PNG, JPEG (with MPO, the multi-picture JPEG of phone cameras), WebP, BMP, GIF and
TIFF are opened, whatever the file is called; content Pillow would identify as another format
(EPS, which would start Ghostscript, PSD, ICO, ...) is refused as a bad image.

Size. An image that declares more than `MAX_PIXELS` pixels (width × height, read from the
header before anything is decoded) is refused with reason `too_large`: a few hundred bytes of
PNG can declare 100000 × 100000 pixels (a decompression bomb).

Modes (Pillow's names) become RGB (`data.channels=3`) or grey (`channels=1`) so:

    1, L, P, RGB, CMYK, YCbCr, LAB, HSV   Pillow's `convert` (RGB → grey: ITU-R 601-2 luma)
    I;16, I;16B, I;16L, I;16N             16-bit grey: value / 65535, kept in float precision
    I                                     32-bit integer grey, as Pillow opens 16-bit PNG and
                                          TIFF data: value / 65535, clipped to [0, 1]
    F                                     float grey on Pillow's 8-bit scale: value / 255,
                                          clipped to [0, 1]; NaN or infinity is a bad image
    RGBA, LA, PA, RGBa, and P / L / RGB   composited over an opaque white background
    with a transparent colour             (`BACKGROUND`), as viewers show them
    16-bit RGB(A) PNG                     Pillow decodes them to 8-bit RGB(A)

Grey becomes RGB by repeating the value. A frame of an animated GIF/WebP: the first.

Geometry. The EXIF orientation tag is applied first (phone photos are stored sideways with a
rotation tag). Then a centre crop to a square of the shorter side and a resize to `size`:
area averaging (BOX) when shrinking, bicubic when enlarging. 8-bit images are cropped and
resized in 8 bits, as they are stored; 16-bit and float grey in 32-bit float. Values are
scaled to [-1, 1] (8 bits: v / 127.5 − 1).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moesaic.errors import DataError

if TYPE_CHECKING:
    from PIL import Image as PILImage

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
MAX_PIXELS = 1 << 26  # 67,108,864 pixels, e.g. 8192 × 8192
BACKGROUND = (255, 255, 255)  # under transparent pixels
WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
ORIENTATION = 0x0112  # the EXIF tag
UNREADABLE = "is not an image that can be read"


class ImageError(DataError):
    """An image that cannot be used; `reason` is the name readers count the skip under
    (`bad_image`, `too_large`, `missing_file`)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_image(
    source: Path | bytes | PILImage.Image,
    size: int,
    channels: int = 3,
    *,
    nearest_multiple: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """A file path, encoded bytes or an unloaded PIL image → [size, size, channels] float32.

    `nearest_multiple`: a square image whose side is a multiple of `size` is first reduced
    with nearest-neighbour (inverts the nearest-neighbour upscaling of `sample --out`).
    Raises `ImageError` (one line) for anything that is not a usable image.
    """
    pixels = decode_pixels(
        source, size, channels, nearest_multiple=nearest_multiple, max_pixels=max_pixels
    )
    return scale_pixels(pixels)


def decode_pixels(
    source: Path | bytes | PILImage.Image,
    size: int,
    channels: int = 3,
    *,
    nearest_multiple: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """`decode_image` before the scaling to [-1, 1]: [size, size, channels] uint8 for 8-bit
    images, float32 in [0, 1] for 16-bit and float grey. What the decode cache stores
    (`decode_cache.py`): a quarter of the float bytes, and `scale_pixels` of it is
    `decode_image`'s result bit for bit."""
    from PIL import Image

    Image.init()  # register every plugin, so that `formats` names only known ones
    try:
        if isinstance(source, Image.Image):
            _check_pixels(source, max_pixels)
            source.load()
            return _pixels(source, size, channels, nearest_multiple)
        fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
        with Image.open(fp, formats=FORMATS) as im:
            _check_pixels(im, max_pixels)
            im.load()
            return _pixels(im, size, channels, nearest_multiple)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("missing_file", "does not exist") from None
    except Image.DecompressionBombError:
        raise ImageError("too_large", f"declares more than {max_pixels:,} pixels") from None
    except MemoryError:
        raise ImageError("too_large", "does not fit in memory when decoded") from None
    except Exception as e:  # Pillow raises many types for corrupt, truncated or odd files
        raise ImageError("bad_image", f"{UNREADABLE} ({_one_line(e)})") from None


def to_array(
    img: PILImage.Image, size: int, channels: int = 3, *, nearest_multiple: bool = False
) -> np.ndarray:
    """A decoded PIL image → [size, size, channels] float32 in [-1, 1] (module doc: the rule)."""
    return scale_pixels(_pixels(img, size, channels, nearest_multiple))


def scale_pixels(pixels_HWC: np.ndarray) -> np.ndarray:
    """`decode_pixels`' output → float32 in [-1, 1]: 8 bits as v / 127.5 − 1, [0, 1] as 2v − 1."""
    if pixels_HWC.dtype == np.uint8:
        return np.clip(pixels_HWC.astype(np.float32) / 127.5 - 1.0, -1.0, 1.0)
    return (pixels_HWC * 2.0 - 1.0).astype(np.float32)


def _pixels(img: PILImage.Image, size: int, channels: int, nearest_multiple: bool) -> np.ndarray:
    """Orientation, conversion, crop and resize: uint8 (8-bit) or float32 in [0, 1] (wide)."""
    from PIL import Image

    img = _oriented(img)
    w, h = img.size
    if nearest_multiple and w == h and w % size == 0 and w != size:
        img = img.resize((size, size), Image.Resampling.NEAREST)
    if img.mode in WIDE_GREY or img.mode == "F":
        grey_HW = _square(_unit_grey(img), size)
        return np.repeat(grey_HW[..., None], channels, axis=-1).astype(np.float32)
    img = _eight_bit(img, channels)
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), _filter(s, size))
    return np.asarray(img, dtype=np.uint8).reshape(size, size, channels)


def _check_pixels(img: PILImage.Image, max_pixels: int) -> None:
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(
            "too_large", f"is {w}×{h} = {w * h:,} pixels, over the limit of {max_pixels:,}"
        )
    if w < 1 or h < 1:
        raise ImageError("bad_image", f"{UNREADABLE} (no pixels: {w}×{h})")


def _oriented(img: PILImage.Image) -> PILImage.Image:
    """Apply the EXIF orientation tag (no copy when there is none)."""
    from PIL import ImageOps

    if img.getexif().get(ORIENTATION, 1) in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def _eight_bit(img: PILImage.Image, channels: int) -> PILImage.Image:
    """RGB or L, transparent pixels composited over `BACKGROUND`."""
    from PIL import Image

    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        under = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        img = Image.alpha_composite(under, rgba).convert("RGB")
    target = "RGB" if channels == 3 else "L"
    return img if img.mode == target else img.convert(target)


def _unit_grey(img: PILImage.Image) -> np.ndarray:
    """16-bit / 32-bit / float grey → [H, W] float32 in [0, 1] (module doc: modes)."""
    a_HW = np.asarray(img).astype(np.float32)
    if img.mode == "F":
        if not np.isfinite(a_HW).all():
            raise ImageError("bad_image", f"{UNREADABLE} (NaN or infinite values)")
        a_HW = a_HW / 255.0
    else:
        a_HW = a_HW / 65535.0
    return np.clip(a_HW, 0.0, 1.0)


def _square(x_HW: np.ndarray, size: int) -> np.ndarray:
    """Centre crop and resize of a float image (the 8-bit rule in float precision)."""
    from PIL import Image

    h, w = x_HW.shape
    s = min(w, h)
    top, left = (h - s) // 2, (w - s) // 2
    x_HW = np.ascontiguousarray(x_HW[top : top + s, left : left + s])
    if s != size:
        resized = Image.fromarray(x_HW).resize((size, size), _filter(s, size))
        x_HW = np.asarray(resized, dtype=np.float32)
    return np.clip(x_HW, 0.0, 1.0)


def _filter(side: int, size: int) -> int:
    from PIL import Image

    return Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]
