"""Readers for real data, plugged into the same packer as the world (`data.source`).

    folder      directories of images with `captions.jsonl` ({"file": ..., "caption": ...} per
                line) or `captions.csv` (header `file,caption`); `file` is relative to the
                directory and must stay inside it
    text        `.txt` files (documents separated by blank lines) or `.jsonl` ({"text": ...}),
                or directories searched recursively for them
    webdataset  `.tar` shards (files, directories, brace patterns): members sharing a key, an
                image (.png/.jpg/.jpeg/.webp/.bmp/.gif/.tif/.tiff) and a caption (.txt, or
                .json with "caption"/"text"); streamed shard by shard with `tarfile`, each rank
                its own shards (`moesaic.data.shards`), so the `webdataset` package is not
                needed
    hf          Hugging Face datasets saved with `save_to_disk` (extra `datasets`): an image
                column (`image`/`img`) and/or a text column (`caption`/`text`)
    digits      scikit-learn's bundled 8×8 handwritten digits (extra `sklearn`), captioned
                "a handwritten digit N"
    clips       folders of clips stored as frame images, with optional action files: the
                `video` and `action_video` kinds (`moesaic.data.clips`, docs/video.md)

Kinds. The image–caption readers (folder, webdataset, digits, hf with an image column) provide
`caption_image`, `image_caption`, `image` and `caption` — the caption alone as plain text
(bos caption eos, every caption token a text target, no image positions), drawn from the same
record as the other kinds, so a record whose image is bad is skipped for its caption too. The
text reader (and hf without an image column) provides `text`.

Images are decoded by one rule for every reader and for `sample --image`
(`moesaic.data.images`: known formats only, a pixel cap, EXIF orientation, every mode and bit
depth, centre crop, resize, [-1, 1]). Text is read by `moesaic.data.reading` (byte-order marks,
bounded pieces, paths that stay inside the source directory).

Long documents. A document keeps at most `data.seq_len × CHARS_PER_TOKEN` characters: the
packer keeps only `data.seq_len` tokens of it anyway, and ordinary text has far fewer than
`CHARS_PER_TOKEN` characters per token, so nothing the packer would keep is lost, and a
document never needs more memory than that.

Splits, draws and the counting of bad records are the base's (`moesaic.data.record_source`).
Bad input is skipped and counted by reason in `skipped` (reported as `stream.skipped`), each
bad record once however often it is drawn, with a warning naming the file and line (the first
few per reason):

    missing_file    a named file, directory or shard that does not exist or is no regular file
    outside_root    a name or symlink that leaves its source directory (`data.follow_symlinks`)
    bad_image       an image that does not decode (corrupt, truncated, unknown format)
    too_large       an image over the pixel cap, or a tar member over `MAX_MEMBER_BYTES`
    bad_encoding    an undecodable UTF-8 line; a whole file that is bad UTF-16/32 or holds NULs;
                    a text with NUL or an unpaired surrogate (JSON escapes)
    too_long        a jsonl / csv / caption line over `MAX_LINE_CHARS` characters
    malformed_line  a jsonl / csv line that does not parse or lacks its field
    empty_caption   an empty caption, or an image without one (webdataset)
    empty_text      an empty jsonl text
    bad_shard       a tar file that does not open

`data.strict: true` raises `DataError` instead. A source with no usable record raises
`DataError`, and so does a draw once every record of the split has turned out bad.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from moesaic.config import DataConfig
from moesaic.data.images import to_array
from moesaic.data.reading import (
    BadEncoding,
    DataWarning,
    Line,
    contained,
    still_inside,
    walk_files,
)
from moesaic.data.record_source import (
    CHARS_PER_TOKEN,
    JSON_ERRORS,
    MAX_LINE_CHARS,
    PAIR_KINDS,
    RecordSource,
    Skip,
    json_field,
)
from moesaic.data.shards import ShardSource, sample_key
from moesaic.data.world.generators import Record, WorldSource
from moesaic.errors import DataError

__all__ = [
    "CHARS_PER_TOKEN",
    "DataWarning",
    "RecordSource",
    "open_source",
    "sample_key",
    "saw_images",
    "source_corpus",
    "to_array",
]


def source_kinds(cfg: DataConfig) -> tuple[str, ...]:
    """The document kinds `data.source` can provide, from the config alone (hf: any)."""
    if cfg.source == "world":
        return WorldSource.kinds
    if cfg.source == "text":
        return ("text",)
    if cfg.source == "hf":
        return (*PAIR_KINDS, "text")
    if cfg.source == "clips":
        return ("video", "action_video")
    return PAIR_KINDS


def saw_images(cfg: DataConfig) -> bool:
    """Whether a config's data draws images: an image kind of a source weighs > 0 in its mix
    (each `data.parts` entry counts as a mix; a source's own mix sets its shares)."""
    from moesaic.data.mixing import member_config

    image = {"caption_image", "image_caption", "vqa", "image"}
    mixes = cfg.parts or [cfg.mix]
    if not cfg.sources:
        kinds = set(source_kinds(cfg)) & image
        return any(w > 0 for mix in mixes for k, w in mix.items() if k in kinds)
    for src in cfg.source_list():
        provided = set(source_kinds(member_config(cfg, src)))
        for mix in mixes:
            allowed = {k for k, w in mix.items() if w > 0 and k in provided}
            if any(w > 0 and k in allowed & image for k, w in (src.mix or mix).items()):
                return True
    return False


def _readable_lines(path: Path, lines: Iterable[Line], problems: list) -> Iterator[tuple[str, str]]:
    """(where, text) of every non-blank line of a JSONL file that decoded and is not too long;
    the others are counted in `problems` (`bad_encoding`, `too_long`)."""
    for line in lines:
        where = f"{path}:{line.number}"
        if line.text is None:
            problems.append(("bad_encoding", where))
        elif line.length > MAX_LINE_CHARS:
            problems.append(("too_long", where))
        elif line.text.strip():
            yield where, line.text


class FolderSource(RecordSource):
    def scan(self, paths: list[Path]) -> list[tuple[str, object]]:
        items = []
        follow = self.cfg.follow_symlinks
        for top in paths:
            if not top.is_dir():
                self.bad("missing_file", str(top))
                continue
            root = top.resolve()
            names = [n for n in ("captions.jsonl", "captions.csv") if (top / n).is_file()]
            if not names:
                raise DataError(f"'{top}' has neither captions.jsonl nor captions.csv")
            captions = top / names[0]
            if contained(root, names[0], follow) is None:
                self.bad("outside_root", f"{captions} (a symlink out of '{top}')")
                continue
            parse = self._jsonl if captions.suffix == ".jsonl" else self._csv
            for where, file, caption in self._read(captions, MAX_LINE_CHARS, parse):
                try:
                    caption = self._cap(caption)
                except BadEncoding as e:
                    self.bad("bad_encoding", f"{where} ({e})")
                    continue
                path = None if "\x00" in file else contained(root, file, follow)
                if not caption:
                    self.bad("empty_caption", where)
                elif "\x00" in file:
                    self.bad("malformed_line", f"{where} (NUL in the file name)")
                elif path is None:
                    self.bad("outside_root", f"{where} ('{file}' is not inside '{top}')")
                elif not path.is_file():
                    self.bad("missing_file", f"{where} ({top / file})")
                else:
                    items.append((str(top / file), (path, caption, root)))
        return items

    @staticmethod
    def _jsonl(path: Path, lines: Iterable[Line], problems: list) -> list[tuple[str, str, str]]:
        rows = []
        for where, text in _readable_lines(path, lines, problems):
            try:
                obj = json.loads(text)
                file = obj["file"]
                caption = obj.get("caption", obj.get("text", ""))
                if not isinstance(file, str) or not isinstance(caption, str):
                    raise TypeError
            except (*JSON_ERRORS, AttributeError):
                problems.append(("malformed_line", where))
                continue
            rows.append((where, file, caption))
        return rows

    @staticmethod
    def _csv(path: Path, lines: Iterable[Line], problems: list) -> list[tuple[str, str, str]]:
        numbers: list[int] = []

        def texts() -> Iterator[str]:
            for line in lines:
                if line.text is None:
                    problems.append(("bad_encoding", f"{path}:{line.number}"))
                elif line.length > MAX_LINE_CHARS:
                    problems.append(("too_long", f"{path}:{line.number}"))
                else:
                    numbers.append(line.number)
                    yield line.text

        reader = csv.reader(texts())
        try:
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["file", "caption"]:
                raise DataError(f"'{path}' must start with the header 'file,caption'")
            rows = []
            for row in reader:
                where = f"{path}:{numbers[reader.line_num - 1]}"
                if len(row) != 2:
                    problems.append(("malformed_line", where))
                    continue
                rows.append((where, row[0], row[1]))
        except csv.Error as e:  # a NUL byte, an unterminated quote at the end, ...
            raise DataError(
                f"'{path}' is not valid CSV ({e}); fix it or use captions.jsonl"
            ) from None
        return rows

    def load(self, ref: object) -> Record:
        path, caption, root = ref  # type: ignore[misc]
        if not still_inside(path, root, self.cfg.follow_symlinks):
            raise Skip("outside_root", f"{path} (no longer inside '{root}')")
        return Record(text=caption, images=(self._image(path, str(path)),))


class TextSource(RecordSource):
    kinds = ("text",)

    def scan(self, paths: list[Path]) -> list[tuple[str, object]]:
        files = []
        for p in paths:
            if p.is_dir():
                found, outside = walk_files(p, (".txt", ".jsonl"), self.cfg.follow_symlinks)
                for o in outside:
                    self.bad("outside_root", f"{o} (a symlink out of '{p}')")
                files += found
            elif p.is_file():
                files.append(p)
            else:
                self.bad("missing_file", str(p))
        items = []
        for f in files:
            if f.suffix == ".jsonl":
                items += self._read(f, MAX_LINE_CHARS, self._jsonl_docs)
            else:
                items += self._read(f, self.max_chars, self._paragraphs)
        return items

    def _jsonl_docs(self, f: Path, lines: Iterable[Line], problems: list) -> list:
        items = []
        for where, line in _readable_lines(f, lines, problems):
            try:
                text = self._cap(json_field(line, "text"))
            except BadEncoding as e:
                problems.append(("bad_encoding", f"{where} ({e})"))
                continue
            except JSON_ERRORS:
                problems.append(("malformed_line", where))
                continue
            if text:
                items.append((where, (where, text)))
            else:
                problems.append(("empty_text", where))
        return items

    def _paragraphs(self, f: Path, lines: Iterable[Line], problems: list) -> list:
        """Documents separated by blank lines, each cut to `max_chars` as it is read."""
        items, para, kept, start = [], [], 0, 0
        for line in _with_end(lines):
            if line is not None and line.text is None:
                problems.append(("bad_encoding", f"{f}:{line.number}"))
                continue
            text = line.text.strip() if line is not None else ""
            if text:
                start = start or line.number  # type: ignore[union-attr]
                if kept < self.max_chars:
                    para.append(text[: self.max_chars - kept])
                    kept += len(para[-1]) + 1
            elif para:
                key = f"{f}:{start}"
                items.append((key, (key, " ".join(para)[: self.max_chars].rstrip())))
                para, kept, start = [], 0, 0
        return items

    def load(self, ref: object) -> Record:
        return Record(text=ref[1])  # type: ignore[index]


def _with_end(lines: Iterable[Line]) -> Iterator[Line | None]:
    yield from lines
    yield None


class HFSource(RecordSource):
    """A dataset saved with `datasets.Dataset.save_to_disk` (first path)."""

    def scan(self, paths: list[Path]) -> list[tuple[str, object]]:
        try:
            import datasets
        except ImportError:
            raise DataError(
                "data.source='hf' needs the datasets package: pip install 'moesaic[datasets]'"
            ) from None
        try:
            ds = datasets.load_from_disk(str(paths[0]))
        except FileNotFoundError as e:
            raise DataError(
                f"'{paths[0]}' is not a dataset saved with save_to_disk ({e})"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        cols = set(ds.column_names)
        self.image_col = next((c for c in ("image", "img") if c in cols), None)
        self.text_col = next((c for c in ("caption", "text") if c in cols), None)
        if self.text_col is None:
            raise DataError(f"'{paths[0]}' has no 'caption' or 'text' column ({sorted(cols)})")
        self.kinds = PAIR_KINDS if self.image_col else ("text",)
        if self.image_col and isinstance(ds.features[self.image_col], datasets.Image):
            # Raw bytes, decoded by the one rule here (datasets would decode any size itself).
            ds = ds.cast_column(self.image_col, datasets.Image(decode=False))
        self.ds, self.root = ds, paths[0].resolve()
        items = []
        for i, text in enumerate(ds[self.text_col]):
            try:
                text = self._cap(text) if isinstance(text, str) else ""
            except BadEncoding as e:
                self.bad("bad_encoding", f"{paths[0]}:{i} ({e})")
                continue
            if text:
                items.append((f"{paths[0]}:{i}", (i, text)))
            else:
                self.bad("empty_caption", f"{paths[0]}:{i}")
        return items

    def load(self, ref: object) -> Record:
        i, text = ref  # type: ignore[misc]
        if self.image_col is None:
            return Record(text=text)
        where = f"{self.cfg.paths[0]}:{i}"
        try:
            img = self.ds[i][self.image_col]
        except Exception:  # a damaged arrow file
            raise Skip("bad_image", where) from None
        if isinstance(img, dict):  # {"bytes": ..., "path": ...}: an image feature, not decoded
            if img.get("bytes"):
                img = img["bytes"]
            elif img.get("path"):  # a file the dataset refers to: only inside its directory
                path = contained(self.root, img["path"], follow_symlinks=False)
                if path is None:
                    raise Skip("outside_root", f"{where} ({img['path']})")
                img = path
            else:
                img = None
        if img is None:
            raise Skip("missing_file", f"{where} (no image)")
        return Record(text=text, images=(self._image(img, where),))


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

    def load(self, ref: object) -> Record:
        from PIL import Image

        img, caption = ref  # type: ignore[misc]
        pil = Image.fromarray(np.uint8(np.clip(img * 16, 0, 255)))
        return Record(text=caption, images=(to_array(pil, self.cfg.image_size, self.cfg.channels),))


class OodTextSource(TextSource):
    """The text files of `eval.ood_text`: every record (no split), drawn as `ood_text`."""

    kinds = ("ood_text",)

    @staticmethod
    def _select(items: list[tuple[str, object]], split: str) -> list[object]:
        return [ref for _, ref in sorted(items)]


def open_ood_text(cfg: DataConfig, paths: list[str]) -> OodTextSource:
    """The user's out-of-distribution text set; a path that cannot be read stops the run."""
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise DataError(
                f"eval.ood_text path '{p}' does not exist; give .txt / .jsonl files or "
                "directories holding them"
            )
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise DataError(f"eval.ood_text path '{p}' cannot be read; fix its permissions")
    ood = dataclasses.replace(
        cfg, source="text", paths=list(paths), follow_symlinks=False, sources=[]
    )
    return OodTextSource(ood, "val", label="eval.ood_text")


SOURCES = {
    "folder": FolderSource,
    "text": TextSource,
    "webdataset": ShardSource,
    "hf": HFSource,
    "digits": DigitsSource,
}


def open_source(
    cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1, label: str = ""
) -> RecordSource:
    """The reader of `data.source` for one split (`label`: how messages name it; `rank` of
    `world_size`: which WebDataset shards this process reads)."""
    if cfg.source == "webdataset":
        return ShardSource(cfg, split, label=label, rank=rank, world_size=world_size)
    if cfg.source == "clips":  # folders of frame images (moesaic/data/clips.py)
        from moesaic.data.clips import ClipSource

        return ClipSource(cfg, split, label=label)
    return SOURCES[cfg.source](cfg, split, label=label)


def source_corpus(cfg: DataConfig) -> list[str]:
    """Training-split text of a real source: the tokenizer's corpus."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return open_source(cfg, "train").texts()
