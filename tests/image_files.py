"""Image files made byte by byte for reader tests: modes Pillow cannot write, forged headers."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG with the given header and (already compressed) image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png16_rgb(pixels_HW3: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow reads these but cannot write them)."""
    h, w, _ = pixels_HW3.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels_HW3)
    return png(w, h, 16, 2, zlib.compress(rows))


def bomb_png(width: int, height: int) -> bytes:
    """A few hundred bytes declaring width × height pixels (a decompression bomb)."""
    return png(width, height, 8, 2, zlib.compress(b"\x00" * 64))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small valid JPEG whose frame header is rewritten to declare width × height."""
    data = bytearray(encode(Image.new("RGB", (8, 8), (10, 20, 30)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)
