"""WebDataset shards, streamed: brace patterns, each rank its own shards, a shard read when its
turn comes (`data.source: webdataset`, or a `webdataset` entry of `data.sources`).

Shards. Each `paths` entry is a `.tar` file, a directory (its `*.tar` files, sorted, which
must resolve inside it), or a brace pattern — `shards-{000..099}.tar` (a numeric range; bounds
written with leading zeros give zero-padded numbers), `{train,extra}-0.tar` (a list), several
groups in one pattern. Patterns are expanded as text: no directory is listed, and a shard
that is missing when its turn comes is skipped and counted once (`missing_file`).

Ranks. With n shards and w ranks (`torchrun`), rank r reads shards r, r + w, r + 2w, …
(n % w ranks get one shard more). With fewer shards than ranks, rank r reads shard r mod n and
shares it with the other ranks of that shard: of its samples it keeps every k-th, starting at
its own offset (k = the number of ranks reading it), so ranks still never share a sample, but
each reads the whole shard's member headers. Documents are disjoint across ranks either way.

Samples. A shard is opened when first drawn from: its member headers are listed (members are
never extracted) and grouped into samples by the WebDataset key (`sample_key`); the image and
caption of a sample are read only when it is drawn, and a bad sample (no image, no caption, an
image that does not decode, …) is skipped and counted then, once. The split is made inside
each shard by the readers' rule (`record_source.split_positions`: by hash order of the keys
`SHARD:KEY`, 5% val, 5% test), so a one-shard dataset splits exactly as a listed one would.
At most `OPEN_SHARDS` shards are held open (their member lists in memory); the number of
samples of each shard listed so far is part of the stream state.

Order. Epoch e visits the rank's shards in a permutation seeded by (`data.seed`, e), each
shard's samples in file order. Draw i of the rank (document index g = i·w + r) is the i-th
sample of that sequence, for every document kind alike, so document g is a pure function of
(seed, split, shards, rank, world size, g): a resume on the same number of ranks is exact. On a
different number of ranks the stream restarts from the old positions scaled (documents may
repeat or be skipped; the shards per rank change).
"""

from __future__ import annotations

import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from moesaic.config import DataConfig
from moesaic.data.reading import BadEncoding, contained, decode_text
from moesaic.data.record_source import (
    JSON_ERRORS,
    MAX_LINE_CHARS,
    RecordSource,
    Skip,
    json_field,
    split_positions,
)
from moesaic.data.world.generators import Record
from moesaic.errors import ConfigError, DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_MEMBER_BYTES = 1 << 28  # a tar member larger than this is not read
MAX_SHARDS = 1_000_000  # a pattern expanding to more shards than this is refused
OPEN_SHARDS = 4  # shards held open (member lists in memory) at once
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")

Members = dict[str, tarfile.TarInfo]  # a sample's members by extension (".png", ".txt", …)


def expand_braces(pattern: str) -> list[str]:
    """`a-{00..02}.tar` → a-00.tar, a-01.tar, a-02.tar; `{x,y}` lists; several groups multiply.

    Raises `ConfigError` for an unbalanced or nested brace, or more than `MAX_SHARDS` names.
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ConfigError(f"shard pattern '{pattern}' has a '}}' without '{{'; fix the braces")
        return [pattern]
    close = pattern.find("}", start)
    if close < 0 or "{" in pattern[start + 1 : close] or "}" in pattern[:start]:
        raise ConfigError(
            f"shard pattern '{pattern}' has an unclosed or nested brace; write groups like "
            "shards-{000..099}.tar or {a,b}.tar"
        )
    body, head, tail = pattern[start + 1 : close], pattern[:start], pattern[close + 1 :]
    m = _RANGE.match(body)
    if m:
        first, last = m.group(1), m.group(2)
        lo, hi = int(first), int(last)
        if abs(hi - lo) >= MAX_SHARDS:
            raise ConfigError(f"shard pattern '{pattern}' names over {MAX_SHARDS:,} shards")
        padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-")[0] == "0" for b in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if hi >= lo else -1
        items = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    rests = expand_braces(tail)
    if len(items) * len(rests) > MAX_SHARDS:
        raise ConfigError(f"shard pattern '{pattern}' names over {MAX_SHARDS:,} shards")
    return [head + item + rest for item in items for rest in rests]


def shards_of_rank(n: int, rank: int, world_size: int) -> tuple[list[int], int, int]:
    """(shard indices rank reads, k ranks sharing each of them, this rank's offset among them)."""
    if n >= world_size:
        return list(range(rank, n, world_size)), 1, 0
    shard = rank % n
    return [shard], len(range(shard, world_size, n)), rank // n


def sample_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member by the WebDataset rule, or None if it has no key."""
    while name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class _Shard:
    """An opened shard: the tar file and its samples of this split and rank, in file order."""

    def __init__(self, tar: tarfile.TarFile | None, samples: list[tuple[str, Members]]):
        self.tar, self.samples = tar, samples

    def release(self) -> None:
        if self.tar is not None:
            self.tar.close()


class ShardSource(RecordSource):
    """WebDataset shards read as they are drawn (module doc)."""

    def __init__(
        self, cfg: DataConfig, split: str, label: str = "", rank: int = 0, world_size: int = 1
    ):
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._setup(cfg, split, label)
        self.shards = self._shard_list([Path(p) for p in cfg.paths])
        if not self.shards:
            raise DataError(
                f"{self.label} found no shards in {cfg.paths}"
                + (f" (skipped: {dict(self.skipped)})" if self.skipped else "")
            )
        self.world_size = world_size
        self.mine, self.sharing, self.offset = shards_of_rank(len(self.shards), rank, world_size)
        self.counts: dict[int, int] = {}  # shard index -> samples of this split and rank
        self._orders: dict[int, list[int]] = {}
        self._met: set[int] = set()  # shards whose problems (missing, bad) were counted

    # ------------------------------------------------------------------ shards

    def _shard_list(self, paths: list[Path]) -> list[Path]:
        shards = []
        for p in paths:
            if "{" in str(p) or "}" in str(p):
                shards += [Path(s) for s in expand_braces(str(p))]
            elif p.is_dir():
                root = p.resolve()
                for shard in sorted(p.glob("*.tar")):
                    if contained(root, shard.name, self.cfg.follow_symlinks) is None:
                        self.bad("outside_root", f"{shard} (a symlink out of '{p}')")
                    else:
                        shards.append(shard)
            else:
                shards.append(p)  # a missing file is counted when its turn comes
        return shards

    def _shard(self, s: int) -> _Shard:
        """Shard `s`, opened and listed (kept among the `OPEN_SHARDS` most recent)."""
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        shard = self._list(s)
        self.counts[s] = len(shard.samples)
        self._open[s] = shard
        while len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)[1].release()
        return shard

    def _list(self, s: int) -> _Shard:
        path = self.shards[s]
        if not path.is_file():
            self._once(s, "missing_file", str(path))
            return _Shard(None, [])
        try:
            tar = tarfile.open(path)  # noqa: SIM115 (kept open to read samples as drawn)
            members = tar.getmembers()
        except Exception:  # tarfile and its decompressors raise many types for bad data
            self._once(s, "bad_shard", str(path))
            return _Shard(None, [])
        groups: dict[str, Members] = {}
        for m in members:
            split = sample_key(m.name) if m.isfile() else None
            if split is not None:
                groups.setdefault(split[0], {})["." + split[1]] = m
        keys = list(groups)
        keep = sorted(split_positions([f"{path}:{k}" for k in keys], self.split))
        keep = keep[self.offset :: self.sharing]
        return _Shard(tar, [(keys[i], groups[keys[i]]) for i in keep])

    def _once(self, s: int, reason: str, where: str) -> None:
        if s not in self._met:
            self._met.add(s)
            self.bad(reason, where)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            rng = np.random.default_rng([self.cfg.seed, epoch, 11])
            self._orders = {epoch: [self.mine[j] for j in rng.permutation(len(self.mine))]}
        return self._orders[epoch]

    @property
    def split_records(self) -> int | None:
        """Samples of this split and rank, once every shard of the rank has been listed."""
        if all(s in self.counts for s in self.mine):
            return sum(self.counts[s] for s in self.mine)
        return None

    def _locate(self, i: int) -> tuple[int, int]:
        """(shard, position among its samples) of this rank's i-th draw (module doc: order)."""
        total = self.split_records
        epoch, rest = divmod(i, total) if total else (0, i)
        while total != 0:
            for s in self._order(epoch):
                n = self.counts[s] if s in self.counts else len(self._shard(s).samples)
                if rest < n:
                    return s, rest
                rest -= n
            total = self.split_records  # every shard has been listed by now
            if total:
                epoch, rest = epoch + 1 + rest // total, rest % total
        raise DataError(
            f"{self.label} has no '{self.split}' samples in its {len(self.mine)} shard(s) "
            f"for this process (skipped: {dict(self.skipped)}); add data or shards"
        )

    # ------------------------------------------------------------------ drawing

    def record(self, kind: str, index: int, rng) -> Record | None:
        """The sample at document index `index` (this rank's draw `index // world_size`)."""
        s, j = self._locate(index // self.world_size)
        bad_key = (s << 32) + j
        reason = self.bad_records.get(bad_key)
        if reason is None:
            key, members = self._shard(s).samples[j]
            try:
                return self._load(s, key, members)
            except Skip as e:
                self.bad(e.reason, e.where)
                self.bad_records[bad_key] = reason = e.reason
        self.skipped_draws[reason] += 1
        total = self.split_records
        if total is not None and len(self.bad_records) >= total:
            raise DataError(
                f"every one of the {total} '{self.split}' samples of {self.label} is bad "
                f"({dict(self.skipped)}); fix the data"
            )
        return None

    def _load(self, s: int, key: str, members: Members) -> Record:
        tar = self._shard(s).tar
        where = f"{self.shards[s]}:{key}"
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if image is None:
            raise Skip("missing_file", f"{where} (no image)")
        caption = self._caption(tar, members, where)
        if image.size > MAX_MEMBER_BYTES:
            raise Skip("too_large", f"{where} ({image.size:,} bytes)")
        try:
            data = tar.extractfile(image).read()  # type: ignore[union-attr]
        except Exception:  # a truncated or damaged shard
            raise Skip("bad_image", f"{where} (the shard cannot be read here)") from None
        return Record(text=caption, images=(self._image(data, where),))

    def _caption(self, tar: tarfile.TarFile | None, members: Members, where: str) -> str:
        member = members.get(".txt") or members.get(".json")
        if member is None:
            raise Skip("empty_caption", f"{where} (no caption)")
        if member.size > MAX_LINE_CHARS:
            raise Skip("too_long", f"{where} ({member.size:,} bytes of caption)")
        try:
            raw = decode_text(tar.extractfile(member).read())  # type: ignore[union-attr]
            text = json_field(raw, "caption", "text") if member.name.endswith(".json") else raw
            text = self._cap(text)
        except BadEncoding:
            raise Skip("bad_encoding", where) from None
        except JSON_ERRORS:
            raise Skip("malformed_line", where) from None
        except Exception:  # a shard truncated inside this member
            raise Skip("bad_shard", where) from None
        if not text:
            raise Skip("empty_caption", where)
        return text

    def samples(self) -> Iterator[tuple[Path, str, Members]]:
        """(shard, key, members) of every sample of this split and rank, shard after shard in
        the order given (each shard listed when reached)."""
        for s, key, members in self._samples():
            yield self.shards[s], key, members

    def _samples(self) -> Iterator[tuple[int, str, Members]]:
        for s in self.mine:
            yield from ((s, key, members) for key, members in self._shard(s).samples)

    def texts(self, limit: int = 20000) -> list[str]:
        """Captions of up to `limit` samples of this split, shard after shard."""
        out: list[str] = []
        for s, key, members in self._samples():
            try:
                out.append(self._caption(self._shard(s).tar, members, f"{self.shards[s]}:{key}"))
            except Skip:
                continue
            if len(out) >= limit:
                break
        return out

    def close(self) -> None:
        """Close the shards held open."""
        while self._open:
            self._open.popitem()[1].release()

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "bad_records": {str(j): r for j, r in sorted(self.bad_records.items())},
            "skipped_draws": dict(self.skipped_draws),
            "shard_samples": {str(s): n for s, n in sorted(self.counts.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        saved = {int(s): int(n) for s, n in state.get("shard_samples", {}).items()}
        listed = {s: len(shard.samples) for s, shard in self._open.items()}
        self.counts = {s: n for s, n in saved.items() if s < len(self.shards)} | listed
