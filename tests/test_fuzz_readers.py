"""Fuzzing the real-data readers with hostile files: random bytes, truncations, wrong encodings,
paths and symlinks out of the source directory.

Every example checks: nothing but the project's errors escapes; no file outside the source
directory is opened (an `OpenGuard`), and the canary outside never reaches a record; every
record is well formed (images finite in [-1, 1], text free of NULs, byte-order marks and
undecodable bytes, at most `data.seq_len × CHARS_PER_TOKEN` characters); and every skip is
counted — scanned lines = records + counted skips, draws of bad records = `skipped_draws`,
bad records met = the skips counted while drawing.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import re
import tarfile
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesaic.config import load_config
from moesaic.data import reading
from moesaic.data.images import decode_image
from moesaic.data.sources import CHARS_PER_TOKEN, DataWarning, open_source
from moesaic.errors import DataError
from tests.fuzz_utils import (
    CANARY_TEXT,
    FAST,
    SLOW,
    OpenGuard,
    image_bytes,
    make_layout,
)

S, SEQ = 8, 16  # data.image_size, data.seq_len: documents keep SEQ × CHARS_PER_TOKEN characters
NAMES = [
    "0.png", "1.png", "2.png", "sub/3.png", "0.png/", "loop/0.png", "sub/../1.png",
    "../outside/secret.png", "{outside}/secret.png", "link.png", "dirlink/secret.png",
    "sub/../../outside/secret.png", "missing.png", "", ".", "sub", "a\x00b.png", "\x1b[2J\n.png",
]  # fmt: skip
line_text = st.text(st.characters(exclude_characters="\r\n", exclude_categories=("Cs",)))


def _cfg(source: str, paths: list[Path], *extra: str):
    return load_config(
        "tiny",
        [f"data.source={source}", f"data.paths={[str(p) for p in paths]}", f"data.seq_len={SEQ}",
         f"data.image_size={S}", "data.patch_size=4", *extra],
    ).data  # fmt: skip


def _open(cfg, root: Path):
    """The train split of a source, opened under the guard: (source or None, guard)."""
    with OpenGuard() as guard, warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        try:
            src = open_source(cfg, "train")
        except DataError as e:
            assert "\n" not in str(e)
            src = None
    assert guard.outside(root) == []
    return src, guard


def _draw_all(src, kind: str, root: Path, canary_px, follow: bool = False) -> list:
    """Draw every record twice; check records, the guard and the counts (the canary may appear
    only when symlinks are followed). Returns the records."""
    with OpenGuard() as guard, warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        n = src.split_records if hasattr(src, "items") else len(list(src.samples()))
    assert guard.outside(root) == []
    scan_skips = dict(src.skipped)
    records, nones = [], 0
    with OpenGuard() as guard, warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        for g in range(2 * n):
            try:
                rec = src.record(kind, g, random.Random(g))
            except DataError as e:  # a split with nothing but bad records
                assert "every one of the" in str(e) and "\n" not in str(e)
                assert len(src.bad_records) == n
                nones += 1
                break
            if rec is None:
                nones += 1
            else:
                records.append(rec)
    assert guard.outside(root) == []
    assert sum(src.skipped_draws.values()) == nones
    load_skips = sum(src.skipped.values()) - sum(scan_skips.values())
    assert load_skips == len(src.bad_records) <= n
    for rec in records:
        _check_text(rec.text, follow)
        for img in rec.images:
            assert img.shape == (S, S, 3) and img.dtype == np.float32
            assert np.isfinite(img).all() and np.abs(img).max() <= 1.0
            assert canary_px is None or not np.allclose(img, canary_px, atol=0.02)
    return records


def _check_text(text: str, follow: bool = False) -> None:
    assert follow or CANARY_TEXT not in text
    assert text.strip() == text and text
    assert "\x00" not in text and "\ufeff" not in text
    assert not re.search("[\ud800-\udfff]", text)
    assert len(text) <= SEQ * CHARS_PER_TOKEN


def _canary_pixels(outside: Path):
    return decode_image(outside / "secret.png", S, 3)


# ---------------------------------------------------------------------------- folder


caption_lines = st.one_of(
    st.builds(
        lambda n, c: json.dumps({"file": n, "caption": c}), st.sampled_from(NAMES), line_text
    ),  # fmt: skip
    st.builds(
        lambda n: json.dumps({"file": n, "caption": ["not", "text"]}), st.sampled_from(NAMES)
    ),
    st.builds(json.dumps, st.one_of(st.integers(), st.lists(st.integers()), st.none())),
    line_text,
    st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b),
    st.sampled_from(
        ['{"file": "0.png", "caption": "a\\ud800b"}', '{"file": "1.png", "caption": "a\\u0000b"}']
    ),  # fmt: skip
)


def _expected_records(lines: list[str | bytes]) -> int | None:
    """Records + counted skips the scan must report for these lines of a UTF-8 file, or None
    when the file is bad as a whole (one `bad_encoding`)."""
    n = 0
    for line in lines:
        if isinstance(line, bytes):
            if b"\x00" in line:
                return None
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                n += 1
                continue
        if "\x00" in line:
            return None
        n += bool(line.strip())
    return n


def folder_property(data) -> None:
    files = data.draw(st.dictionaries(st.sampled_from(["0.png", "1.png", "2.png", "sub/3.png"]),
                                      image_bytes, max_size=4))  # fmt: skip
    lines = data.draw(st.lists(caption_lines, max_size=12))
    encoding = data.draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32", "csv"]))
    follow = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as tmp:
        root, outside = make_layout(Path(tmp))
        for name, blob in files.items():
            (root / name).write_bytes(blob)
        lines = [ln.replace("{outside}", str(outside)) if isinstance(ln, str) else ln
                 for ln in lines]  # fmt: skip
        if encoding == "csv":
            body = ["file,caption"] + [ln if isinstance(ln, str) else "x" for ln in lines]
            (root / "captions.csv").write_text("\n".join(body), errors="surrogateescape")
        elif encoding == "utf-8":
            raw = [b'{"file": "0.png", "caption": "first"}']  # a random first line is no BOM
            raw += [ln if isinstance(ln, bytes) else ln.encode() for ln in lines]
            (root / "captions.jsonl").write_bytes(b"\n".join(raw))
        else:
            text = "\n".join(ln for ln in lines if isinstance(ln, str))
            (root / "captions.jsonl").write_bytes(text.encode(encoding))
        cfg = _cfg("folder", [root], f"data.follow_symlinks={str(follow).lower()}",
                   "data.mix={image: 1}")  # fmt: skip
        try:
            src, _ = _open(cfg, root if not follow else Path(tmp))
        except DataError:  # the csv header, or csv that does not parse
            assert encoding == "csv"
            return
        if src is None:
            return
        if encoding == "utf-8":
            expected = _expected_records([b"first line", *lines])
            if expected is None:
                assert dict(src.skipped) == {"bad_encoding": 1}
            else:
                assert src.n_records + sum(src.skipped.values()) == expected
        if not follow:
            for ref in src.items:
                assert ref[0].resolve().is_relative_to(root.resolve())
        canary = None if follow else _canary_pixels(outside)
        _draw_all(src, "image", root if not follow else Path(tmp), canary, follow)


@FAST
@given(st.data())
def test_fuzz_folder(data):
    folder_property(data)


@pytest.mark.slow
@SLOW
@given(st.data())
def test_fuzz_folder_long(data):
    folder_property(data)


# ---------------------------------------------------------------------------- text


text_files = st.one_of(
    st.builds(
        lambda t, enc: t.encode(enc, errors="surrogatepass"),
        st.text(max_size=300),
        st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]),
    ),
    st.builds(
        lambda docs: "\n".join(json.dumps({"text": d}) for d in docs).encode(),
        st.lists(st.one_of(line_text, st.integers(), st.sampled_from(["\ud800", "\x00"]))),
    ),
    st.binary(max_size=300),
    st.builds(lambda n: ("x" * n + "\n\n" + "y" * n).encode(), st.integers(0, 3000)),
)


def text_property(data) -> None:
    files = data.draw(st.dictionaries(st.sampled_from(["a.txt", "b.jsonl", "sub/c.txt", "d.txt"]),
                                      text_files, max_size=4))  # fmt: skip
    follow = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as tmp:
        root, _ = make_layout(Path(tmp))
        for name, blob in files.items():
            (root / name).write_bytes(blob)
        cfg = _cfg("text", [root], f"data.follow_symlinks={str(follow).lower()}")
        src, _ = _open(cfg, root if not follow else Path(tmp))
        if src is None:
            return
        texts = src.texts()
        if not follow:
            assert not any(CANARY_TEXT in t for t in texts)
            assert src.skipped["outside_root"] == 2  # passwd.txt and dirlink
            for t in texts:
                _check_text(t)
        _draw_all(src, "text", root if not follow else Path(tmp), None, follow)


@FAST
@given(st.data())
def test_fuzz_text(data):
    text_property(data)


@pytest.mark.slow
@SLOW
@given(st.data())
def test_fuzz_text_long(data):
    text_property(data)


pieces = st.lists(st.sampled_from(["\r\n", "\r", "\n", "a", "é", "中", "😀", " ", "\u2028"]))
line_break_texts = st.one_of(
    pieces.map("".join),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00")),
)


@FAST
@given(text=line_break_texts,
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"]),
       block=st.integers(1, 9), max_chars=st.integers(1, 50))  # fmt: skip
def test_line_reader_matches_a_whole_file_split(text, encoding, block, max_chars):
    """Lines read in tiny blocks are the lines of the whole text, however blocks cut them."""
    want = re.split(r"\r\n|\r|\n", text)
    if want[-1] == "":
        want.pop()
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(reading, "BLOCK", block):
        f = Path(tmp) / "t.txt"
        f.write_bytes(text.encode(encoding))
        got = list(reading.read_lines(f, max_chars))
    assert [ln.length for ln in got] == [len(w) for w in want]
    assert [ln.text for ln in got] == [w[:max_chars] for w in want]
    assert [ln.number for ln in got] == list(range(1, len(want) + 1))


# ---------------------------------------------------------------------------- webdataset


member_names = st.one_of(
    st.sampled_from(["0001.png", "./0001.txt", "./a.b/0002.jpg", "a.b/0002.json", "0003.png",
                     "0003.txt", "../../escape.png", "/abs/0004.png", "/abs/0004.txt", ".hidden",
                     "noext", "./", "0005.PNG", "0005.TXT"]),
    st.text(max_size=20),
)  # fmt: skip
member_data = st.one_of(
    image_bytes,
    st.text(max_size=40).map(lambda t: t.encode("utf-8", errors="surrogatepass")),
    st.builds(lambda c: json.dumps({"caption": c}).encode(), st.one_of(line_text, st.integers())),
)


def _tar(members: list, outside: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        for name, kind in (("9999.png", tarfile.SYMTYPE), ("9998.png", tarfile.LNKTYPE)):
            info = tarfile.TarInfo(name)  # links out of the shard and the directory
            info.type, info.linkname = kind, str(outside / "secret.png")
            tar.addfile(info)
        info = tarfile.TarInfo("9999.txt")
        info.size = 7
        tar.addfile(info, io.BytesIO(b"caption"))
    return buf.getvalue()


def webdataset_property(data) -> None:
    members = data.draw(st.lists(st.tuples(member_names, member_data), max_size=10))
    cut = data.draw(st.one_of(st.none(), st.floats(0, 1)))
    with tempfile.TemporaryDirectory() as tmp:
        root, outside = make_layout(Path(tmp))
        blob = _tar(members, outside)
        if cut is not None:
            blob = blob[: int(len(blob) * cut)]
        (root / "0.tar").write_bytes(blob)
        (root / "elsewhere.tar").symlink_to(outside / "secret.png")
        cfg = _cfg("webdataset", [root])
        src, _ = _open(cfg, root)
        if src is None:
            return
        assert src.skipped["outside_root"] == 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            empty = not list(src.samples())
        if empty:  # a split without samples stops with one line
            with pytest.raises(DataError, match="has no 'train' samples"):
                src.record("image", 0, random.Random(0))
            return
        _draw_all(src, "image", root, _canary_pixels(outside))


@FAST
@given(st.data())
def test_fuzz_webdataset(data):
    webdataset_property(data)


@pytest.mark.slow
@SLOW
@given(st.data())
def test_fuzz_webdataset_long(data):
    webdataset_property(data)


# ---------------------------------------------------------------------------- hf and digits


def hf_property(data) -> None:
    import datasets

    n = data.draw(st.integers(1, 6))
    images = data.draw(st.lists(st.one_of(image_bytes, st.just(b"")), min_size=n, max_size=n))
    captions = data.draw(st.lists(st.one_of(line_text, st.none()), min_size=n, max_size=n))
    with tempfile.TemporaryDirectory() as tmp:
        root, outside = make_layout(Path(tmp))
        cells = [{"bytes": b, "path": None} for b in images]
        features = datasets.Features(
            {"image": datasets.Image(), "caption": datasets.Value("string")}
        )
        ds = datasets.Dataset.from_dict({"image": cells, "caption": captions}, features=features)
        ds.save_to_disk(str(root / "ds"))
        src, _ = _open(_cfg("hf", [root / "ds"]), root)
        if src is not None:
            _draw_all(src, "image", root, _canary_pixels(outside))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets missing")
@settings(parent=FAST, max_examples=8)
@given(st.data())
def test_fuzz_hf(data):
    hf_property(data)


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn missing")
@settings(parent=FAST, max_examples=4)
@given(size=st.sampled_from([4, 8, 12, 16]), channels=st.sampled_from([1, 3]),
       seed=st.integers(0, 100))  # fmt: skip
def test_fuzz_digits_settings(size, channels, seed):
    """Digits have no external input; every record is well formed at any size and channels."""
    cfg = load_config("tiny", ["data.source=digits", f"data.image_size={size}",
                               "data.patch_size=4", f"data.channels={channels}",
                               f"data.seed={seed}"]).data  # fmt: skip
    src = open_source(cfg, "train")
    for g in range(0, 3 * len(src.items), 97):
        rec = src.record("image", g, random.Random(g))
        img = rec.images[0]
        assert img.shape == (size, size, channels) and np.isfinite(img).all()
        assert np.abs(img).max() <= 1.0 and "digit" in rec.text
