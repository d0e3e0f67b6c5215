"""Readers for real data, plugged into the same packer as the world (`data.source`).

    folder      directories of images with `captions.jsonl` ({"file": ..., "caption": ...} per
                line) or `captions.csv` (header `file,caption`)
    text        `.txt` files (documents separated by blank lines) or `.jsonl` ({"text": ...})
    webdataset  `.tar` shards: members sharing a key, an image (.png/.jpg/.jpeg/.webp/.bmp)
                and a caption (.txt, or .json with "caption"/"text"); read with `tarfile`, so
                the `webdataset` package is not needed
    hf          Hugging Face datasets saved with `save_to_disk` (extra `datasets`): an image
                column (`image`/`img`) and/or a text column (`caption`/`text`)
    digits      scikit-learn's bundled 8×8 handwritten digits (extra `sklearn`), captioned
                "a handwritten digit N"

Images are converted by one rule: Pillow `convert("RGB")` (or "L" when data.channels=1),
centre-crop to a square of the shorter side, resize to `data.image_size` with area averaging
(BOX) when shrinking and bicubic when enlarging, scale to [-1, 1].

Splits: records are ordered by a hash of their key (file path + member/line); the first 5%
(at least one record once a source has three) are `val`, the next 5% `test`, the rest `train`.

Bad input — corrupt or truncated images, missing files, non-UTF-8 text, empty captions,
malformed jsonl/csv lines — is skipped and counted by reason in `skipped` (reported as
`stream.skipped`), with a warning naming the file and line (the first few per reason);
`data.strict: true` raises `DataError` instead. A source with no usable record raises
`DataError`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from moesaic.config import DataConfig
from moesaic.data.world.generators import Record
from moesaic.errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
IMAGE_KINDS = ("caption_image", "image_caption", "image")
WARN_PER_REASON = 5
VAL_FRACTION = 0.05


class DataWarning(UserWarning):
    """A bad record was skipped."""


def to_array(img, size: int, channels: int = 3) -> np.ndarray:
    """A PIL image → [size, size, channels] float32 in [-1, 1] by the documented rule."""
    from PIL import Image

    img = img.convert("RGB" if channels == 3 else "L")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), Image.BOX if s > size else Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32).reshape(size, size, channels)
    return np.clip(x / 127.5 - 1.0, -1.0, 1.0)


class RecordSource:
    """Base: a list of record references, split by key hash, drawn in per-epoch permutations."""

    kinds: tuple[str, ...] = IMAGE_KINDS

    def __init__(self, cfg: DataConfig, split: str):
        self.cfg, self.split = cfg, split
        self.skipped: Counter = Counter()
        self._warned: Counter = Counter()
        items = self.scan([Path(p) for p in cfg.paths])
        if not items:
            raise DataError(
                f"data.source='{cfg.source}' found no usable records in {cfg.paths}"
                + (f" (skipped: {dict(self.skipped)})" if self.skipped else "")
            )
        self.items = self._select(items, split)
        if not self.items:
            raise DataError(
                f"data.source='{cfg.source}' has no '{split}' records ({len(items)} in all); "
                "add more data"
            )
        self._perms: dict[int, np.ndarray] = {}

    # subclasses: scan(paths) -> list[(key, ref)], load(ref) -> Record | None
    def scan(self, paths: list[Path]) -> list[tuple[str, object]]:
        raise NotImplementedError

    def load(self, ref: object) -> Record | None:
        raise NotImplementedError

    def bad(self, reason: str, where: str) -> None:
        """Count a skipped record; warn (first few per reason) or raise in strict mode."""
        msg = f"{where}: skipped ({reason.replace('_', ' ')})"
        if self.cfg.strict:
            raise DataError(msg + "; fix the input or set data.strict=false to skip it")
        self.skipped[reason] += 1
        self._warned[reason] += 1
        if self._warned[reason] <= WARN_PER_REASON:
            warnings.warn(msg, DataWarning, stacklevel=3)

    @staticmethod
    def _select(items: list[tuple[str, object]], split: str) -> list[object]:
        def h(key: str) -> int:
            return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")

        ordered = sorted(items, key=lambda kv: (h(kv[0]), kv[0]))
        n = len(ordered)
        k = max(1, round(VAL_FRACTION * n)) if n >= 3 else 0
        parts = {"val": ordered[:k], "test": ordered[k : 2 * k], "train": ordered[2 * k :]}
        return [ref for _, ref in parts[split]]

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng([self.cfg.seed, epoch, 7])
            self._perms = {epoch: rng.permutation(len(self.items))}
        return self._perms[epoch]

    def record(self, kind: str, index: int, rng: random.Random) -> Record | None:
        epoch, i = divmod(index, len(self.items))
        return self.load(self.items[int(self._perm(epoch)[i])])

    def texts(self, limit: int = 20000) -> list[str]:
        """Text of up to `limit` records of this split (the tokenizer's training corpus)."""
        out = []
        for ref in self.items[:limit]:
            t = self.text_of(ref)
            if t:
                out.append(t)
        return out

    def text_of(self, ref: object) -> str:
        return ref[1]  # type: ignore[index]

    def _image(self, data: bytes | Path, where: str) -> np.ndarray | None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
                img.load()
                return to_array(img, self.cfg.image_size, self.cfg.channels)
        except FileNotFoundError:
            self.bad("missing_file", where)
        except Exception:  # Pillow raises many types for corrupt or truncated files
            self.bad("bad_image", where)
        return None


def _read_lines(path: Path, src: RecordSource) -> list[tuple[int, str]]:
    """(line number, text) of each UTF-8 line; undecodable lines are skipped and counted."""
    out = []
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            out.append((n, raw.decode("utf-8")))
        except UnicodeDecodeError:
            src.bad("bad_encoding", f"{path}:{n}")
    return out


class FolderSource(RecordSource):
    def scan(self, paths: list[Path]) -> list[tuple[str, object]]:
        items = []
        for root in paths:
            if not root.is_dir():
                self.bad("missing_file", str(root))
                continue
            if (root / "captions.jsonl").is_file():
                rows = self._jsonl(root / "captions.jsonl")
            elif (root / "captions.csv").is_file():
                rows = self._csv(root / "captions.csv")
            else:
                raise DataError(f"'{root}' has neither captions.jsonl nor captions.csv")
            for where, file, caption in rows:
                path = root / file
                if not caption.strip():
                    self.bad("empty_caption", where)
                elif not path.is_file():
                    self.bad("missing_file", f"{where} ({path})")
                else:
                    items.append((str(path), (path, caption.strip())))
        return items

    def _jsonl(self, path: Path) -> list[tuple[str, str, str]]:
        rows = []
        for n, line in _read_lines(path, self):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                file, caption = obj["file"], obj.get("caption", obj.get("text", ""))
                if not isinstance(file, str) or not isinstance(caption, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                self.bad("malformed_line", f"{path}:{n}")
                continue
            rows.append((f"{path}:{n}", file, caption))
        return rows

    def _csv(self, path: Path) -> list[tuple[str, str, str]]:
        lines = _read_lines(path, self)
        rows = []
        reader = csv.reader([text for _, text in lines])
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["file", "caption"]:
            raise DataError(f"'{path}' must start with the header 'file,caption'")
        for (n, _), row in zip(lines[1:], reader, strict=False):
            if len(row) != 2:
                self.bad("malformed_line", f"{path}:{n}")
                continue
            rows.append((f"{path}:{n}", row[0], row[1]))
        return rows

    def load(self, ref: object) -> Record | None:
        path, caption = ref  # type: ignore[misc]
        img = self._image(path, str(path))
        return None if img is None else Record(text=caption, images=(img,))


class TextSource(RecordSource):
    kinds = ("text",)

    def scan(self, paths: list[Path]) -> list[tuple[str, object]]:
        files = []
        for p in paths:
            if p.is_dir():
                files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl"))
            elif p.is_file():
                files.append(p)
            else:
                self.bad("missing_file", str(p))
        items = []
        for f in files:
            lines = _read_lines(f, self)
            if f.suffix == ".jsonl":
                for n, line in lines:
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                        if not isinstance(text, str):
                            raise TypeError
                    except (json.JSONDecodeError, KeyError, TypeError):
                        self.bad("malformed_line", f"{f}:{n}")
                        continue
                    if text.strip():
                        items.append((f"{f}:{n}", (f"{f}:{n}", text.strip())))
                    else:
                        self.bad("empty_text", f"{f}:{n}")
            else:
                para, start = [], 0
                for n, line in [*lines, (len(lines) + 1, "")]:
                    if line.strip():
                        start = start or n
                        para.append(line.strip())
                    elif para:
                        items.append((f"{f}:{start}", (f"{f}:{start}", " ".join(para))))
                        para, start = [], 0
        return items

    def load(self, ref: object) -> Record | None:
        return Record(text=ref[1])  # type: ignore[index]


class TarSource(RecordSource):
    """WebDataset-style shards, read with `tarfile`."""

    def scan(self, paths: list[Path]) -> list[tuple[str, object]]:
        shards = []
        for p in paths:
            shards += sorted(p.glob("*.tar")) if p.is_dir() else [p]
        self._tars: dict[Path, tarfile.TarFile] = {}
        items = []
        for shard in shards:
            try:
                tar = tarfile.open(shard)  # noqa: SIM115 (kept open to read images lazily)
                members = tar.getmembers()
            except (OSError, tarfile.TarError):
                self.bad("bad_shard", str(shard))
                continue
            self._tars[shard] = tar
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in members:
                if m.isfile() and "." in m.name:
                    key, ext = m.name.split(".", 1)
                    groups.setdefault(key, {})["." + ext.lower()] = m
            for key, g in sorted(groups.items()):
                where = f"{shard}:{key}"
                image = next((g[e] for e in IMAGE_EXTS if e in g), None)
                caption = self._caption(tar, g, where)
                if image is None:
                    self.bad("missing_file", f"{where} (no image)")
                elif caption is None:
                    continue
                elif not caption.strip():
                    self.bad("empty_caption", where)
                else:
                    items.append((where, (shard, image, caption.strip())))
        return items

    def _caption(self, tar: tarfile.TarFile, g: dict, where: str) -> str | None:
        member = g.get(".txt") or g.get(".json")
        if member is None:
            self.bad("empty_caption", f"{where} (no caption)")
            return None
        try:
            raw = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
            if member.name.endswith(".json"):
                obj = json.loads(raw)
                return str(obj.get("caption", obj.get("text", "")))
            return raw
        except UnicodeDecodeError:
            self.bad("bad_encoding", where)
        except (json.JSONDecodeError, AttributeError):
            self.bad("malformed_line", where)
        return None

    def text_of(self, ref: object) -> str:
        return ref[2]  # type: ignore[index]

    def load(self, ref: object) -> Record | None:
        shard, member, caption = ref  # type: ignore[misc]
        data = self._tars[shard].extractfile(member).read()  # type: ignore[union-attr]
        img = self._image(data, f"{shard}:{member.name}")
        return None if img is None else Record(text=caption, images=(img,))


class HFSource(RecordSource):
    """A dataset saved with `datasets.Dataset.save_to_disk` (first path)."""

    def scan(self, paths: list[Path]) -> list[tuple[str, object]]:
        try:
            import datasets
        except ImportError:
            raise DataError(
                "data.source='hf' needs the datasets package: pip install 'moesaic[datasets]'"
            ) from None
        ds = datasets.load_from_disk(str(paths[0]))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        cols = set(ds.column_names)
        self.image_col = next((c for c in ("image", "img") if c in cols), None)
        self.text_col = next((c for c in ("caption", "text") if c in cols), None)
        if self.text_col is None:
            raise DataError(f"'{paths[0]}' has no 'caption' or 'text' column ({sorted(cols)})")
        self.kinds = IMAGE_KINDS if self.image_col else ("text",)
        self.ds = ds
        items = []
        for i, text in enumerate(ds[self.text_col]):
            if isinstance(text, str) and text.strip():
                items.append((f"{paths[0]}:{i}", (i, text.strip())))
            else:
                self.bad("empty_caption", f"{paths[0]}:{i}")
        return items

    def load(self, ref: object) -> Record | None:
        i, text = ref  # type: ignore[misc]
        if self.image_col is None:
            return Record(text=text)
        img = self.ds[i][self.image_col]
        if img is None:
            self.bad("missing_file", f"row {i}")
            return None
        return Record(text=text, images=(to_array(img, self.cfg.image_size, self.cfg.channels),))


class DigitsSource(RecordSource):
    """scikit-learn's bundled 8×8 handwritten digits (no download)."""

    def scan(self, paths: list[Path]) -> list[tuple[str, object]]:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise DataError(
                "data.source='digits' needs scikit-learn: pip install 'moesaic[sklearn]'"
            ) from None
        d = load_digits()
        words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
        items = []
        for i, (img, y) in enumerate(zip(d.images, d.target, strict=True)):
            caption = f"a handwritten digit {words[y]} ({y})"
            items.append((f"digits:{i}", (img, caption)))
        return items

    def load(self, ref: object) -> Record | None:
        from PIL import Image

        img, caption = ref  # type: ignore[misc]
        pil = Image.fromarray(np.uint8(np.clip(img * 16, 0, 255)))
        return Record(text=caption, images=(to_array(pil, self.cfg.image_size, self.cfg.channels),))


SOURCES = {
    "folder": FolderSource,
    "text": TextSource,
    "webdataset": TarSource,
    "hf": HFSource,
    "digits": DigitsSource,
}


def open_source(cfg: DataConfig, split: str) -> RecordSource:
    if cfg.source == "clips":  # folders of frame images (moesaic/data/clips.py)
        from moesaic.data.clips import ClipSource

        return ClipSource(cfg, split)
    return SOURCES[cfg.source](cfg, split)


def source_corpus(cfg: DataConfig) -> list[str]:
    """Training-split text of a real source: the tokenizer's corpus."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return open_source(cfg, "train").texts()
