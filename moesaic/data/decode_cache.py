"""A disk cache of decoded, resized real images, so a photo is decoded once, not once per draw.

Decoding a 4000×3000 JPEG and shrinking it to 16×16 takes a tenth of a second; the result is
768 bytes. The readers draw each image once per epoch and per document kind, so without a
cache a folder of photos keeps the data stream far below the training step's consumption.

Entries. One file per (image content, `data.image_size`, `data.channels`, decoding rule
version) holding `decode_pixels`' output — uint8 [S, S, C] for 8-bit images, float32 in [0, 1]
for 16-bit and float grey — after a 4-byte header (`MAGIC` and the dtype), so `scale_pixels`
of an entry equals `decode_image` of the file bit for bit, and a read is one `read()` (a
`.npy` header takes longer to parse than the pixels to read). Entries live under
`<cache>/decoded/v<version>-<S>px-<C>c/<ab>/<hash>.px`
(`<cache>` as for tokenizers: `$MOESAIC_CACHE`, …), are written atomically (a temporary file,
then a rename: `moesaic.files`), and a damaged or foreign entry is decoded again and
rewritten. Concurrent ranks that miss the same image both decode it and write the same bytes.

Keys. An entry is keyed by the BLAKE2b hash of the encoded bytes, so a changed file gets a new
entry and identical files (or shards holding the same image) share one. A file read by path
is hashed when first met in a process; afterwards the reader trusts (size, mtime, ctime,
inode, device) and hashes again only when one of them changes. Size and mtime alone could
miss a rewrite within one mtime tick; ctime changes on every write and cannot be set by
programs, so a change the check misses needs a file rewritten to the same size in the same
nanosecond tick. Tar members and hf cells are bytes already: they are hashed on every draw
(about 1 ms per MB, against 100 ms to decode a 12-megapixel JPEG).

Small images. Encoded images under `MIN_BYTES` are decoded each time: decoding them costs
less than a lookup and the cache would only fill with tiny files.

Size. An entry holds S²·C bytes (float32 grey: 4·S²·C) plus 4: 772 bytes per 16 px RGB
image, 3,076 at 32 px — on disk a file-system block each (4 KiB on most), so a million images
take about 4 GB. The cache is not pruned: entries of edited or deleted files stay until
`<cache>/decoded` is deleted, which is safe at any time; `data.decode_cache: false` turns it
off.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from moesaic.files import atomic_write_bytes

DECODE_VERSION = 1  # bump when the decoding rule (`images.py`) changes its output
MIN_BYTES = 32 * 1024  # encoded images smaller than this are not cached
MAGIC = b"MDC"  # an entry: MAGIC, a dtype code, the raw pixels (C order, native endianness)
DTYPES = {b"u": np.dtype(np.uint8), b"f": np.dtype(np.float32)}


class DecodeCache:
    """Decoded pixels of real images by content hash, for one (image size, channels)."""

    def __init__(self, root: Path, size: int, channels: int, min_bytes: int = MIN_BYTES):
        self.dir = Path(root) / "decoded" / f"v{DECODE_VERSION}-{size}px-{channels}c"
        self.size, self.channels, self.min_bytes = size, channels, min_bytes
        self._keys: dict[str, tuple[tuple[int, ...], str]] = {}  # path -> (stat, content key)
        self.hits = self.misses = 0

    def pixels(
        self, data: bytes | Path, decode: Callable[[bytes | Path], np.ndarray]
    ) -> np.ndarray:
        """`decode(data)` (a `decode_pixels` call), from the cache when the content is known.

        `data` is encoded bytes or a file path; errors of `decode` propagate (a bad image is
        never cached)."""
        if isinstance(data, bytes | bytearray):
            if len(data) < self.min_bytes:
                return decode(data)
            return self._through(self._hash(data), lambda: decode(bytes(data)))
        path = Path(data)
        try:
            st = os.stat(path)
        except OSError:
            return decode(path)  # the decoder reports the missing file
        if st.st_size < self.min_bytes:
            return decode(path)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        known = self._keys.get(str(path))
        if known is not None and known[0] == stamp:
            return self._through(known[1], lambda: decode(path))
        try:
            blob = path.read_bytes()
        except OSError:
            return decode(path)
        key = self._hash(blob)
        self._keys[str(path)] = (stamp, key)
        return self._through(key, lambda: decode(blob))

    @staticmethod
    def _hash(blob: bytes) -> str:
        return hashlib.blake2b(blob, digest_size=16).hexdigest()

    def entry(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.px"

    def _through(self, key: str, decode: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.entry(key)
        pixels = self._read(path)
        if pixels is not None:
            self.hits += 1
            return pixels
        self.misses += 1
        pixels = decode()
        code = b"u" if pixels.dtype == np.uint8 else b"f"
        blob = MAGIC + code + np.ascontiguousarray(pixels, DTYPES[code]).tobytes()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, blob)
        except OSError:
            pass  # a full or read-only cache only costs speed
        return pixels

    def _read(self, path: Path) -> np.ndarray | None:
        """The entry's pixels, or None when it is missing, damaged or of another shape."""
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except OSError:
            return None
        head, code, body = blob[: len(MAGIC)], blob[len(MAGIC) : len(MAGIC) + 1], blob[4:]
        dtype = DTYPES.get(code)
        shape = (self.size, self.size, self.channels)
        if head != MAGIC or dtype is None or len(body) != dtype.itemsize * int(np.prod(shape)):
            return None
        pixels = np.frombuffer(body, dtype).reshape(shape).copy()
        if dtype == np.float32 and not ((pixels >= 0) & (pixels <= 1)).all():
            return None  # (NaN fails both comparisons)
        return pixels
