"""The decode cache: entries equal a fresh decode bit for bit, a changed file is decoded again,
damaged entries are rewritten, small images bypass it, `data.decode_cache` turns it off."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from moesaic.config import load_config
from moesaic.data import build_stream, load_tokenizer
from moesaic.data.decode_cache import MIN_BYTES, DecodeCache
from moesaic.data.images import decode_image, decode_pixels, scale_pixels


def _noise_jpeg(seed: int, size=(320, 240)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    assert len(buf.getvalue()) >= MIN_BYTES
    return buf.getvalue()


def _grey16_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 65536, (200, 180), dtype=np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert len(buf.getvalue()) >= MIN_BYTES
    return buf.getvalue()


def _decoder(size, channels):
    return lambda data: decode_pixels(data, size, channels)


@pytest.mark.parametrize(("make", "channels"), [(_noise_jpeg, 3), (_grey16_png, 1)])
def test_an_entry_equals_a_fresh_decode(tmp_path, make, channels):
    path = tmp_path / "img"
    path.write_bytes(make(0))
    cache = DecodeCache(tmp_path / "cache", 16, channels)
    first = cache.pixels(path, _decoder(16, channels))
    again = DecodeCache(tmp_path / "cache", 16, channels).pixels(path, _decoder(16, channels))
    fresh = decode_image(path, 16, channels)
    assert (cache.hits, cache.misses) == (0, 1)
    for pixels in (first, again):
        assert pixels.dtype == (np.uint8 if make is _noise_jpeg else np.float32)
        out = scale_pixels(pixels)
        assert out.dtype == fresh.dtype and np.array_equal(out, fresh)
    assert len(list((tmp_path / "cache").rglob("*.px"))) == 1


def test_a_changed_file_is_decoded_again(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(_noise_jpeg(1))
    cache = DecodeCache(tmp_path / "cache", 8, 3)
    old = cache.pixels(path, _decoder(8, 3))
    path.write_bytes(_noise_jpeg(2))  # new content at the same path
    new = cache.pixels(path, _decoder(8, 3))
    assert cache.misses == 2 and not np.array_equal(old, new)
    assert np.array_equal(scale_pixels(new), decode_image(path, 8, 3))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same content
    assert np.array_equal(cache.pixels(path, _decoder(8, 3)), new)
    assert (cache.hits, cache.misses) == (1, 2)  # hashed again, found, not decoded


def test_bytes_and_damaged_entries(tmp_path):
    blob = _noise_jpeg(3)
    cache = DecodeCache(tmp_path / "cache", 8, 3)
    a = cache.pixels(blob, _decoder(8, 3))
    b = cache.pixels(bytes(blob), _decoder(8, 3))
    assert (cache.hits, cache.misses) == (1, 1) and np.array_equal(a, b)
    (entry,) = (tmp_path / "cache").rglob("*.px")
    entry.write_bytes(entry.read_bytes()[:20])  # a damaged entry
    c = cache.pixels(blob, _decoder(8, 3))
    assert cache.misses == 2 and np.array_equal(a, c)
    assert entry.stat().st_size == 4 + 8 * 8 * 3  # rewritten whole
    other = DecodeCache(tmp_path / "cache", 8, 1)  # another channel count: its own entries
    other.pixels(blob, _decoder(8, 1))
    assert other.misses == 1


def test_small_images_bypass_the_cache(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 20, 30)).save(buf, format="PNG")
    cache = DecodeCache(tmp_path / "cache", 8, 3)
    cache.pixels(buf.getvalue(), _decoder(8, 3))
    assert (cache.hits, cache.misses) == (0, 0) and not (tmp_path / "cache").exists()


def test_data_decode_cache_option(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESAIC_CACHE", str(tmp_path / "home"))
    root = tmp_path / "photos"
    root.mkdir()
    lines = []
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(_noise_jpeg(10 + i))
        lines.append(json.dumps({"file": f"{i}.jpg", "caption": f"photo {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines))
    base = ["data.source=folder", f"data.paths=[{root}]", "data.vocab_size=300",
            "data.seq_len=64", "data.batch_size=2", "data.mix={image: 1}"]  # fmt: skip
    tok = load_tokenizer(load_config("tiny", base).data, tmp_path / "tok")
    entries = tmp_path / "home" / "decoded"
    off = build_stream(load_config("tiny", [*base, "data.decode_cache=false"]).data, tok)
    plain = [next(off) for _ in range(2)]
    assert off.source.decode_cache is None and not entries.exists()
    on = build_stream(load_config("tiny", base).data, tok)
    for b in plain:
        assert np.array_equal(next(on).patches.numpy(), b.patches.numpy())
    train = len(on.source.items)  # the split holds 2 of the 4
    assert len(list(entries.rglob("*.px"))) == train == 2 and on.source.decode_cache.hits > 0


def test_the_cache_setting_does_not_change_a_runs_identity():
    """Runs with and without the cache compute the same: a run resumes or is reused either way."""
    from moesaic.runconfig import config_fingerprint

    on, off = load_config("tiny"), load_config("tiny", ["data.decode_cache=false"])
    assert off.data.decode_cache is False
    assert config_fingerprint(on) == config_fingerprint(off)
