"""Several sources in one stream: lanes, their token shares, and the state of every source.

A *lane* is one document kind of one source (`text@corpus`, `caption_image@photos`). The
packer's scheduler (`packing.Stream`) mixes lanes exactly as it mixes kinds: it always draws
from the lane furthest below its share of document tokens, so every lane stays within one
document of its share at all times.

Shares. For a mix M (the run's `data.mix`, or one entry of `data.parts`) a source s may draw
the kinds it provides to which M gives a positive weight. Among those, its shares share_s(k)
are its own `mix` when it has one, else M, normalised over those kinds. A source left with no
kind drops out. The target share of lane (s, k) is

    weight_s × share_s(k) / Σ weight_s'      (the sum over the sources that did not drop out)

so a text-only run (`data.mix={text: 1}`) draws only from sources that provide text, and each
`data.parts` entry acts as that part's M.

Identity. Lane (s, k)'s document g is a pure function of (seed, split, s, k, g): the document
seed gains the source's salt, a hash of its name (not of its position in the list, so adding
or reordering sources changes no source's documents). The single source of `data.source` has
no name and no salt: its lanes are the bare kinds and its documents are those it always had.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter

from moesaic.config import DataConfig, SourceConfig
from moesaic.errors import ConfigError


def name_salt(name: str) -> int:
    """A source's seed component: 63 bits of the SHA-256 of its name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


@dataclasses.dataclass
class Member:
    """One source of a `SourceSet`: the reader object and how much it is drawn."""

    name: str  # "" for the single source of data.source
    source: object  # a packing.Source: kinds, skipped, record(kind, index, rng)
    weight: float = 1.0
    mix: dict[str, float] = dataclasses.field(default_factory=dict)  # {} = the run's mix
    label: str = ""  # how messages name it
    reader: str = ""  # world | folder | text | ...
    paths: tuple[str, ...] = ()

    @property
    def salt(self) -> tuple[int, ...]:
        return (name_salt(self.name),) if self.name else ()

    def lane(self, kind: str) -> str:
        return f"{kind}@{self.name}" if self.name else kind

    def shares(self, mix: dict[str, float]) -> dict[str, float]:
        """share_s(k) for the mix (module doc), normalised; {} when the source drops out."""
        allowed = {k for k, w in mix.items() if w > 0 and k in self.source.kinds}
        raw = {k: w for k, w in (self.mix or mix).items() if w > 0 and k in allowed}
        total = sum(raw.values())
        return {k: w / total for k, w in raw.items()} if total > 0 else {}


@dataclasses.dataclass(frozen=True)
class Lane:
    key: str  # "kind" or "kind@source"
    kind: str
    member: Member
    weight: float  # target share of document tokens


class SourceSet:
    """The sources of one stream; the single source of `data.source` is a set of one."""

    def __init__(self, members: list[Member]):
        self.members = members
        self.by_name = {m.name: m for m in members}
        self.carried: Counter = Counter()  # skips of a restarted state, not split by source
        for m in members:
            extra = [k for k, w in m.mix.items() if w > 0 and k not in m.source.kinds]
            if extra:
                raise ConfigError(
                    f"{m.label}: its mix gives weight to '{extra[0]}', which it does not "
                    f"provide ({', '.join(m.source.kinds)}); drop that kind from its mix"
                )

    @classmethod
    def single(cls, source, label: str, reader: str = "", paths: tuple[str, ...] = ()) -> SourceSet:
        """The one unnamed source of `data.source` (bare-kind lanes, no salt)."""
        return cls([Member("", source, label=label, reader=reader, paths=paths)])

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every kind some source provides (in first-seen order)."""
        return tuple(dict.fromkeys(k for m in self.members for k in m.source.kinds))

    def lanes(self, mix: dict[str, float]) -> dict[str, Lane]:
        """The lanes a stream with this mix draws and their target shares (module doc)."""
        plans = [(m, m.shares(mix)) for m in self.members]
        plans = [(m, s) for m, s in plans if s]
        if not plans:
            if len(self.members) == 1 and not self.members[0].name:
                which, provided = f"source '{self.members[0].reader}'", ", ".join(self.kinds)
            else:
                which = "any of data.sources"
                provided = "; ".join(f"{m.name}: {', '.join(m.source.kinds)}" for m in self.members)
            raise ConfigError(
                f"data.mix {mix} has no positive weight on a kind that {which} provides "
                f"({provided})"
            )
        total = sum(m.weight for m, _ in plans)
        out = {}
        for m, shares in plans:
            for kind, share in shares.items():
                key = m.lane(kind)
                out[key] = Lane(key, kind, m, m.weight / total * share)
        return out

    def resolve(self, key: str) -> tuple[str, Member]:
        """(kind, member) of a lane key."""
        kind, _, name = key.partition("@")
        return kind, self.by_name[name]

    # ------------------------------------------------------------------ counts and state

    @property
    def skipped(self) -> Counter:
        """Bad records skipped so far, by reason, over all sources."""
        total = Counter(self.carried)
        for m in self.members:
            total.update(m.source.skipped)
        return total

    @property
    def skipped_draws(self) -> Counter:
        total: Counter = Counter()
        for m in self.members:
            total.update(getattr(m.source, "skipped_draws", {}))
        return total

    def skipped_by_source(self) -> dict[str, dict[str, int]]:
        return {m.name: dict(m.source.skipped) for m in self.members if m.source.skipped}

    def state_dict(self) -> dict:
        """{"skipped": ..., "source": ...}: one source keeps the single-source layout."""
        if len(self.members) == 1 and not self.members[0].name:
            src = self.members[0].source
            return {
                "skipped": dict(src.skipped),
                "source": src.state_dict() if hasattr(src, "state_dict") else {},
            }
        members = {
            m.name: {
                "skipped": dict(m.source.skipped),
                "state": m.source.state_dict() if hasattr(m.source, "state_dict") else {},
            }
            for m in self.members
        }
        return {"skipped": dict(self.skipped), "source": {"members": members}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("source", {}) or {}
        if len(self.members) == 1 and not self.members[0].name:
            src = self.members[0].source
            src.skipped.clear()
            src.skipped.update(state.get("skipped", {}))
            if hasattr(src, "load_state_dict"):
                src.load_state_dict(saved)
            return
        members = saved.get("members")
        self.carried = Counter() if members else Counter(state.get("skipped", {}))
        for m in self.members:
            entry = (members or {}).get(m.name, {})
            m.source.skipped.clear()
            m.source.skipped.update(entry.get("skipped", {}))
            if hasattr(m.source, "load_state_dict"):
                m.source.load_state_dict(entry.get("state", {}))


def member_config(cfg: DataConfig, src: SourceConfig) -> DataConfig:
    """The data config a reader of one `data.sources` entry sees (its kind, paths, options)."""
    return dataclasses.replace(
        cfg,
        source=src.kind,
        paths=list(src.paths),
        follow_symlinks=src.follow_symlinks,
        caption_register=src.caption_register or cfg.caption_register,
        max_objects=src.max_objects or cfg.max_objects,
        sources=[],
    )


def source_label(src: SourceConfig) -> str:
    return f"data.sources '{src.name}' ({src.kind})"


def open_sources(cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1) -> SourceSet:
    """The sources of a run for one split: `data.sources`, or the one `data.source`."""
    from moesaic.data import make_source

    if not cfg.sources:
        source = make_source(cfg, split, rank, world_size)
        return SourceSet.single(source, f"data.source='{cfg.source}'", cfg.source, tuple(cfg.paths))
    members = []
    for src in cfg.source_list():
        label = source_label(src)
        source = make_source(member_config(cfg, src), split, rank, world_size, label=label)
        members.append(
            Member(src.name, source, src.weight, dict(src.mix), label, src.kind, tuple(src.paths))
        )
    return SourceSet(members)
