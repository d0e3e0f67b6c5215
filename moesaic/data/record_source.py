"""The base of the real-data readers: records, splits, draws, and bad records counted once.

A reader (`moesaic.data.sources`) lists its records once (`scan`) and loads one when it is
drawn (`load`). The base orders the records by a hash of their key (file path + member/line):
the first 5% (at least one record once a source has three) are `val`, the next 5% `test`, the
rest `train`; each epoch draws them in a new permutation (seeded by `data.seed`).

A bad record is skipped and counted by reason in `skipped` once, however often it is drawn:
the first time it fails to load it joins `bad_records`, and later draws skip it without
reading it (`skipped_draws` counts those draws). `bad_records` is part of the stream state.
The first `WARN_PER_REASON` skips per reason warn (`DataWarning`); `data.strict: true` raises
`DataError` instead. A draw once every record of the split is bad raises `DataError`.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from moesaic.config import DataConfig
from moesaic.data.decode_cache import DecodeCache
from moesaic.data.images import ImageError, decode_image, decode_pixels, scale_pixels
from moesaic.data.reading import BadEncoding, DataWarning, checked_text, printable, read_lines
from moesaic.data.world.generators import Record
from moesaic.errors import DataError
from moesaic.files import cache_dir

IMAGE_KINDS = ("caption_image", "image_caption", "image")
# What an image–caption reader provides: the image kinds and the caption alone as plain text
# (`caption`: bos caption eos). A caption document is drawn from the same record as every
# other kind (the same image is loaded too), so a record is good or bad as a whole and
# caption document g is image_caption document g's caption.
PAIR_KINDS = (*IMAGE_KINDS, "caption")
WARN_PER_REASON = 5
VAL_FRACTION = 0.05
CHARS_PER_TOKEN = 32  # a document keeps at most data.seq_len × this many characters
MAX_LINE_CHARS = 1 << 24  # a jsonl / csv line or a caption file longer than this is skipped


class Skip(Exception):  # noqa: N818 (control flow inside the readers, never escapes them)
    """A bad record met while loading it: counted once by `RecordSource.record`."""

    def __init__(self, reason: str, where: str):
        super().__init__(where)
        self.reason, self.where = reason, where


class RecordSource:
    """Base: a list of record references, split by key hash, drawn in per-epoch permutations."""

    kinds: tuple[str, ...] = PAIR_KINDS

    def __init__(self, cfg: DataConfig, split: str, label: str = ""):
        self._setup(cfg, split, label)
        items = self.scan([Path(p) for p in cfg.paths])
        self.n_records = len(items)  # usable records of all splits
        if not items:
            raise DataError(
                f"{self.label} found no usable records in {cfg.paths}"
                + (f" (skipped: {dict(self.skipped)})" if self.skipped else "")
            )
        self.items = self._select(items, split)
        if not self.items:
            raise DataError(
                f"{self.label} has no '{split}' records ({len(items)} in all); add more data"
            )
        self._perms: dict[int, np.ndarray] = {}

    def _setup(self, cfg: DataConfig, split: str, label: str) -> None:
        """What every reader holds: counts of skips, known-bad records, the decode cache."""
        self.cfg, self.split = cfg, split
        self.label = label or f"data.source='{cfg.source}'"  # how messages name the source
        self.skipped: Counter = Counter()
        self.skipped_draws: Counter = Counter()
        self.bad_records: dict[int, str] = {}  # index into items -> reason (counted once)
        self._warned: Counter = Counter()
        self.max_chars = cfg.seq_len * CHARS_PER_TOKEN
        self.decode_cache = (
            DecodeCache(cache_dir(), cfg.image_size, cfg.channels) if cfg.decode_cache else None
        )
        for p in cfg.paths:
            if "\x00" in p:
                raise DataError(f"data.paths entry {p!r} holds a NUL character; fix the path")

    @property
    def split_records(self) -> int:
        """Records of this split (bad ones not yet met included): what eval sets report."""
        return len(self.items)

    # subclasses: scan(paths) -> list[(key, ref)]; load(ref) -> Record, raising Skip if bad
    def scan(self, paths: list[Path]) -> list[tuple[str, object]]:
        raise NotImplementedError

    def load(self, ref: object) -> Record:
        raise NotImplementedError

    def bad(self, reason: str, where: str) -> None:
        """Count a skipped record; warn (first few per reason) or raise in strict mode."""
        msg = printable(f"{where}: skipped ({reason.replace('_', ' ')})", limit=500)
        if self.cfg.strict:
            raise DataError(msg + "; fix the input or set data.strict=false to skip it")
        self.skipped[reason] += 1
        self._warned[reason] += 1
        if self._warned[reason] <= WARN_PER_REASON:
            warnings.warn(msg, DataWarning, stacklevel=3)

    @staticmethod
    def _select(items: list[tuple[str, object]], split: str) -> list[object]:
        return [items[i][1] for i in split_positions([key for key, _ in items], split)]

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng([self.cfg.seed, epoch, 7])
            self._perms = {epoch: rng.permutation(len(self.items))}
        return self._perms[epoch]

    def record(self, kind: str, index: int, rng: random.Random) -> Record | None:
        """The record drawn at global `index`; None (counted) if it is bad."""
        epoch, i = divmod(index, len(self.items))
        j = int(self._perm(epoch)[i])
        reason = self.bad_records.get(j)
        if reason is None:
            try:
                return self.load(self.items[j])
            except Skip as s:
                self.bad(s.reason, s.where)
                self.bad_records[j] = reason = s.reason
        self.skipped_draws[reason] += 1
        if len(self.bad_records) == len(self.items):
            raise DataError(
                f"every one of the {len(self.items)} '{self.split}' records of "
                f"{self.label} is bad ({dict(self.skipped)}); fix the data"
            )
        return None

    def state_dict(self) -> dict:
        """Which records are known bad (so a resumed stream does not count them again)."""
        return {
            "bad_records": {str(j): r for j, r in sorted(self.bad_records.items())},
            "skipped_draws": dict(self.skipped_draws),
        }

    def load_state_dict(self, state: dict) -> None:
        self.bad_records = {int(j): str(r) for j, r in state.get("bad_records", {}).items()}
        self.skipped_draws = Counter(state.get("skipped_draws", {}))

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

    def _image(self, data: bytes | Path | object, where: str) -> np.ndarray:
        """A record's image by the one decoding rule, through the decode cache when on."""
        size, channels = self.cfg.image_size, self.cfg.channels
        try:
            if self.decode_cache is not None and isinstance(data, bytes | bytearray | Path):
                pixels = self.decode_cache.pixels(data, lambda d: decode_pixels(d, size, channels))
                return scale_pixels(pixels)
            return decode_image(data, size, channels)  # type: ignore[arg-type]
        except ImageError as e:
            raise Skip(e.reason, f"{where} {e}") from None

    def _read(self, path: Path, max_chars: int, parse: Callable) -> list:
        """`parse(path, lines, problems)` over a text file's lines. Its problems are counted
        once the whole file has decoded; a file bad as a whole is counted once, yields nothing."""
        problems: list[tuple[str, str]] = []
        try:
            out = parse(path, read_lines(path, max_chars), problems)
        except BadEncoding as e:
            self.bad("bad_encoding", f"{path} ({e})")
            return []
        except OSError as e:
            self.bad("missing_file", f"{path} ({e.strerror or e})")
            return []
        for reason, where in problems:
            self.bad(reason, where)
        return out

    def _cap(self, text: str) -> str:
        """A caption or document: stripped, cut to `max_chars`; `BadEncoding` if unusable."""
        return checked_text(text.strip()[: self.max_chars].strip())


def split_positions(keys: list[str], split: str) -> list[int]:
    """Positions of the keys in `split`, by hash order of the keys: the first 5% (at least one
    once there are three) are val, the next 5% test, the rest train; in hash order."""

    def h(key: str) -> int:
        return int.from_bytes(hashlib.sha256(key.encode(errors="replace")).digest()[:8], "big")

    ordered = sorted(range(len(keys)), key=lambda i: (h(keys[i]), keys[i]))
    n = len(ordered)
    k = max(1, round(VAL_FRACTION * n)) if n >= 3 else 0
    parts = {"val": ordered[:k], "test": ordered[k : 2 * k], "train": ordered[2 * k :]}
    return parts[split]


def json_field(text: str, *names: str) -> str:
    """The first of `names` present in a JSON object line (must be a string)."""
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise TypeError
    for name in names:
        if name in obj:
            if not isinstance(obj[name], str):
                raise TypeError
            return obj[name]
    raise KeyError(names[0])


JSON_ERRORS = (ValueError, KeyError, TypeError, RecursionError)  # ValueError: JSONDecodeError
