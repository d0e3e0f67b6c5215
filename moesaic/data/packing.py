"""The packer: documents from a source, mixed by token share, packed into fixed-length rows.

Mix semantics. `data.mix` gives each document kind a weight; weights are normalised over the
kinds the source can produce (a text-only source ignores image kinds) and read as shares of
*document tokens* (padding excluded). A deterministic scheduler always draws the next document
from the kind that is furthest below its share (argmin of produced_tokens / weight, ties by
key order), so after any prefix of the stream each kind's share is within one document of its
target — no sampling noise.

Row packing. Documents never straddle rows. Each row is filled first with documents held over
from earlier rows (in order), then with new documents while at most `LOOKAHEAD` documents are
held over: a document that does not fit the rest of the row is held over to the next row, which
always has room for the first held-over document (every document is at most `seq_len` long).
What is left of a row is padding, one document of kind PAD. Text longer than `seq_len` is
truncated at the end (counted in `stream.stats["truncated_tokens"]`); nothing else is ever
dropped or repeated: every drawn document appears exactly once, whole, in order of its row.

Several sources (`data.sources`, `mixing.py`). The scheduler mixes *lanes* — one kind of one
source, `kind@name` — exactly as it mixes kinds: a lane is drawn only when it is at or below its
share, so none ever gets more than one document ahead of it (nor, since the deviations sum to
zero, more than one document per other lane behind). With the one source of `data.source` the
lanes are the bare kinds.

Determinism and resume. Document `g` of kind `k` is a pure function of (seed, split, k, g) —
and of the source, through its salt, when there are several: its content, flow time, caption
dropout and noise ε all come from generators seeded with `derive_seed(seed, split, k, g)`.
Rank `r` of `w` draws the global indices g ≡ r (mod w) of every lane, so ranks never share a
document. The stream state is therefore a handful of counters plus the keys
of the held-over documents (regenerated on restore): `state_dict()` is small JSON and
`load_state_dict()` continues with byte-identical batches.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Protocol

import numpy as np
import torch

from moesaic.batch import Batch, DocKind, Modality
from moesaic.config import DataConfig
from moesaic.data.documents import (
    KIND_OF,
    Doc,
    assemble,
    flow_time,
    min_image_doc_len,
    video_doc_len,
)
from moesaic.data.mixing import SourceSet
from moesaic.data.world.generators import Record
from moesaic.data.world.scenes import derive_seed, mix64, patchify
from moesaic.errors import ConfigError, DataError

LOOKAHEAD = 4
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
KIND_IDS = {
    "text": 0,
    "caption_image": 1,
    "image_caption": 2,
    "vqa": 3,
    "image": 4,
    "ood_text": 5,
    "video": 6,
    "action_video": 7,
}
# Caption-only document g is drawn from image_caption document g's seed: the same caption.
KIND_IDS["caption"] = KIND_IDS["image_caption"]
IMAGE_KINDS = ("caption_image", "image_caption", "vqa", "image")
VIDEO_KINDS = ("video", "action_video")
STATE_VERSION = 1


class Source(Protocol):
    """Anything that yields records by (kind, global index)."""

    kinds: tuple[str, ...]
    skipped: Counter

    def record(self, kind: str, index: int, rng: random.Random) -> Record | None: ...


@dataclasses.dataclass(frozen=True)
class DocOptions:
    """How records become documents (the train stream takes these from `DataConfig`)."""

    caption_loss: bool = True
    caption_dropout: float = 0.1
    time_shift: float = 3.0
    understanding_noise: float = 0.0
    t_grid: tuple[float, ...] = ()  # fixed flow times, cycled by document index (eval sets)
    salt: int = 0  # separates streams that share a seed (eval sets)
    video_context: str = "clean"  # clean | noised (documents.py, docs/video.md)

    @classmethod
    def from_config(cls, cfg: DataConfig) -> DocOptions:
        return cls(
            caption_loss=cfg.caption_loss,
            caption_dropout=cfg.caption_dropout,
            time_shift=cfg.time_shift,
            understanding_noise=cfg.understanding_noise,
            video_context=cfg.video.context,
        )


def min_video_frames(context: str) -> int:
    """Frames a clip document needs: a context frame and a target (clean), or one frame."""
    return 2 if context == "clean" else 1


class DocFactory:
    """Turns (lane, global index) into a laid-out `Doc`: a pure function of its arguments."""

    def __init__(
        self, cfg: DataConfig, tok, sources: Source | SourceSet, split: str, seed: int, opts
    ):
        if not isinstance(sources, SourceSet):
            sources = SourceSet.single(sources, f"data.source='{cfg.source}'", cfg.source)
        self.cfg, self.tok, self.sources, self.opts = cfg, tok, sources, opts
        self.ids = tok.special
        self.split_id, self.seed = SPLIT_IDS[split], seed
        # One PCG64 re-seeded per document: the same numbers as a fresh generator would give
        # for that document, without the cost of building one (SeedSequence) every time.
        self._bitgen = np.random.PCG64(0)
        self._gen = np.random.Generator(self._bitgen)

    def _noise(self, s: int, shape: tuple[int, ...]) -> np.ndarray:
        """ε for the document with seed `s`: a pure function of (s, shape)."""
        state = (mix64(s) << 64) | mix64(s ^ 0x6E6F697365)
        inc = (mix64(s ^ 0x696E63) << 1) | 1
        self._bitgen.state = {
            "bit_generator": "PCG64",
            "state": {"state": state, "inc": inc},
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self._gen.standard_normal(shape, dtype=np.float32)

    def __call__(self, lane: str, g: int) -> Doc | None:
        kind, member = self.sources.resolve(lane)
        s = derive_seed(self.seed, self.split_id, KIND_IDS[kind], g, self.opts.salt, *member.salt)
        rng = random.Random(s)
        rec = member.source.record(kind, g, rng)
        if rec is None:
            return None
        key, opts, L = (lane, g), self.opts, self.cfg.seq_len
        if kind in ("text", "ood_text", "caption"):
            pieces = rec.pieces or ((rec.text, True),)
            segs = [("text", self.tok.encode(text), loss) for text, loss in pieces]
            return assemble(kind, segs, self.ids, key, L)
        if kind in VIDEO_KINDS:
            return self._video(kind, rec, s, rng, key)
        patches = patchify(rec.images[0], self.cfg.patch_size)
        noise = self._noise(s, patches.shape)
        if kind in ("caption_image", "image"):
            t = flow_time(rng.random(), opts.time_shift)
        else:
            t = 1.0 - opts.understanding_noise * rng.random()
        if opts.t_grid:
            t = opts.t_grid[g % len(opts.t_grid)]
        if kind == "caption_image":
            drop = rng.random() < opts.caption_dropout
            caption = [] if drop else self.tok.encode(rec.text)
            segs = [
                ("text", caption, opts.caption_loss),
                ("image", patches, noise, t, True, opts.caption_loss),
            ]
        elif kind == "image_caption":
            segs = [("image", patches, noise, t, False, True)]
            segs.append(("text", self.tok.encode(rec.text), True))
        elif kind == "vqa":
            segs = [("image", patches, noise, t, False, True)]
            segs.append(("text", self.tok.encode(rec.text), False))
            segs.append(("text", self.tok.encode(" " + rec.answer), True))
        else:
            segs = [("image", patches, noise, t, True, False)]
        return assemble(kind, segs, self.ids, key, L)

    def _video(
        self, kind: str, rec: Record, s: int, rng: random.Random, key: tuple[str, int]
    ) -> Doc:
        """A clip laid out as `video` or `action_video` (documents.py): the frames kept, which
        of them are noised and their flow times, all drawn from the document's own rng. `key`
        is the document's (lane, global index)."""
        opts, L, n, g = self.opts, self.cfg.seq_len, len(rec.images), key[1]
        if kind == "action_video" and len(rec.actions) != n - 1:
            raise DataError(f"a clip of {n} frames has {len(rec.actions)} actions")
        clean = opts.video_context == "clean"
        lo = min_video_frames(opts.video_context)
        k = rng.randint(2, n) if clean else n
        acts = rec.actions[: k - 1] if kind == "action_video" else ()
        actions = [self.tok.encode(a) for a in acts]
        H, W = rec.images[0].shape[:2]
        m = (H // self.cfg.patch_size) * (W // self.cfg.patch_size)
        while k > lo and video_doc_len(k, m, sum(map(len, actions[: k - 1]))) > L:
            k -= 1
        frames = [patchify(im, self.cfg.patch_size) for im in rec.images[:k]]
        noise = self._noise(s, (k, m, frames[0].shape[1]))
        grid = opts.t_grid
        if clean:
            t_last = grid[g % len(grid)] if grid else flow_time(rng.random(), opts.time_shift)
            times, losses = [1.0] * (k - 1) + [t_last], [False] * (k - 1) + [True]
        else:
            times = [
                grid[(g + j) % len(grid)] if grid else flow_time(rng.random(), opts.time_shift)
                for j in range(k)
            ]
            losses = [True] * k
        segs: list[tuple] = []
        for j in range(k):
            if j > 0 and actions:
                segs.append(("text", actions[j - 1], False))
            segs.append(("frame", frames[j], noise[j], times[j], losses[j], False))
        return assemble(kind, segs, self.ids, key, L)


class Stream:
    """An infinite, exactly resumable iterator of `Batch`es [batch_size, seq_len]."""

    def __init__(
        self,
        cfg: DataConfig,
        tok,
        source: Source | SourceSet,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        mix: dict[str, float] | None = None,
        opts: DocOptions | None = None,
        seed: int | None = None,
    ):
        if split not in SPLIT_IDS:
            raise ConfigError(f"split='{split}' is not one of {', '.join(SPLIT_IDS)}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        self.cfg, self.tok = cfg, tok
        self.rank, self.world_size, self.split = rank, world_size, split
        if not isinstance(source, SourceSet):
            source = SourceSet.single(source, f"data.source='{cfg.source}'", cfg.source)
        self.sources = source
        self.source = source.members[0].source if len(source.members) == 1 else source
        lanes = source.lanes(dict(cfg.mix if mix is None else mix))
        self.weights = {key: lane.weight for key, lane in lanes.items()}  # lane -> target share
        need = min_image_doc_len(cfg.patches_per_image)
        if any(lane.kind in IMAGE_KINDS for lane in lanes.values()) and cfg.seq_len < need:
            raise ConfigError(
                f"data.seq_len={cfg.seq_len} cannot hold one image document ({need} positions "
                f"for {cfg.patches_per_image} patches); raise data.seq_len or data.patch_size"
            )
        context = (opts or DocOptions.from_config(cfg)).video_context
        need = video_doc_len(min_video_frames(context), cfg.patches_per_image)
        if any(lane.kind in VIDEO_KINDS for lane in lanes.values()) and cfg.seq_len < need:
            raise ConfigError(
                f"data.seq_len={cfg.seq_len} cannot hold a clip document ({need} positions for "
                f"{min_video_frames(context)} frames of {cfg.patches_per_image} patches); raise "
                "data.seq_len or data.patch_size"
            )
        self.factory = DocFactory(
            cfg, tok, source, split, cfg.seed if seed is None else seed,
            opts or DocOptions.from_config(cfg),
        )  # fmt: skip
        self.counters = {k: 0 for k in self.weights}  # documents drawn per lane (this rank)
        self.lane_tokens = {k: 0 for k in self.weights}  # document tokens per lane
        self.pending: list[Doc] = []
        self.rows = 0
        self.stats: Counter = Counter()

    # ------------------------------------------------------------------ state

    @property
    def produced(self) -> dict[str, int]:
        """Document tokens per kind (summed over sources)."""
        out: Counter = Counter()
        for lane, n in self.lane_tokens.items():
            out[lane.partition("@")[0]] += n
        return dict(out)

    @property
    def produced_by_source(self) -> dict[str, dict[str, int]]:
        """Document tokens per source and kind ({} with the single `data.source`)."""
        out: dict[str, dict[str, int]] = {}
        for lane, n in self.lane_tokens.items():
            kind, _, name = lane.partition("@")
            if name:
                out.setdefault(name, {})[kind] = n
        return out

    @property
    def skipped(self) -> dict[str, int]:
        """Bad records skipped so far, by reason."""
        return dict(self.sources.skipped)

    @property
    def skipped_draws(self) -> dict[str, int]:
        """Draws that met a bad record, by reason (a bad record is skipped once, drawn often)."""
        return dict(self.sources.skipped_draws)

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "counters": dict(self.counters),
            "produced": dict(self.lane_tokens),
            "pending": [list(d.key) for d in self.pending],
            "rows": self.rows,
            "stats": dict(self.stats),
            **self.sources.state_dict(),  # "skipped", "source"
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data stream state version {state.get('version')} is not supported")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise DataError(
                f"data stream state is for rank {state['rank']} of {state['world_size']}, "
                f"not rank {self.rank} of {self.world_size}; resume with the same world size"
            )
        if set(state["counters"]) != set(self.counters):
            raise DataError(
                f"data stream state mixes {sorted(state['counters'])}, this stream "
                f"{sorted(self.counters)}; resume with the same data.mix"
            )
        self.counters = {k: int(v) for k, v in state["counters"].items()}
        self.lane_tokens = {k: int(v) for k, v in state["produced"].items()}
        self.sources.load_state_dict(state)
        self.pending = [self.factory(k, int(g)) for k, g in state["pending"]]
        self.rows = int(state["rows"])
        self.stats = Counter(state["stats"])

    # ------------------------------------------------------------------ drawing and packing

    def _draw(self) -> Doc:
        lane = min(self.weights, key=lambda k: self.lane_tokens[k] / self.weights[k])
        for _ in range(1_000_000):
            g = self.counters[lane] * self.world_size + self.rank
            self.counters[lane] += 1
            doc = self.factory(lane, g)
            if doc is not None:
                self.lane_tokens[lane] += len(doc)
                self.stats["docs"] += 1
                self.stats["truncated_tokens"] += doc.truncated
                return doc
        kind, member = self.sources.resolve(lane)
        raise DataError(f"{member.label} yields no usable '{kind}' records")

    def _row(self) -> list[Doc]:
        L, placed, used = self.cfg.seq_len, [], 0
        held = []
        for doc in self.pending:
            if used + len(doc) <= L:
                placed.append(doc)
                used += len(doc)
            else:
                held.append(doc)
        self.pending = held
        while used < L and len(self.pending) < LOOKAHEAD:
            doc = self._draw()
            if used + len(doc) <= L:
                placed.append(doc)
                used += len(doc)
            else:
                self.pending.append(doc)
        self.rows += 1
        return placed

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Batch:
        B = self.cfg.batch_size
        return pack_rows([self._row() for _ in range(B)], self.cfg, self.tok.pad_id)


def pack_rows(rows: list[list[Doc]], cfg: DataConfig, pad_id: int) -> Batch:
    """Write rows of documents into a `Batch` [len(rows), seq_len] (the rest of a row is PAD)."""
    B, L, P = len(rows), cfg.seq_len, cfg.patch_dim
    tokens = np.full((B, L), pad_id, dtype=np.int64)
    targets = np.full((B, L), -1, dtype=np.int64)
    patches = np.zeros((B, L, P), dtype=np.float32)
    noise = np.zeros((B, L, P), dtype=np.float32)
    t = np.ones((B, L), dtype=np.float32)
    image_loss = np.zeros((B, L), dtype=bool)
    modality = np.full((B, L), int(Modality.TEXT), dtype=np.int64)
    image_id = np.full((B, L), -1, dtype=np.int64)
    doc_id = np.zeros((B, L), dtype=np.int64)
    doc_kind = np.full((B, L), int(DocKind.PAD), dtype=np.int64)
    for b, docs in enumerate(rows):
        off, n_img = 0, 0
        for d, doc in enumerate(docs):
            n = len(doc)
            tokens[b, off : off + n] = doc.tokens
            targets[b, off : off + n] = doc.targets
            doc_id[b, off : off + n] = d
            doc_kind[b, off : off + n] = int(KIND_OF[doc.kind])
            for img in doc.images:
                s, m = off + img.start, img.patches.shape[0]
                patches[b, s : s + m] = img.patches
                noise[b, s : s + m] = img.noise
                t[b, s : s + m] = img.t
                image_loss[b, s : s + m] = img.loss
                modality[b, s : s + m] = img.modality
                image_id[b, s : s + m] = n_img
                n_img += 1
            off += n
        doc_id[b, off:] = len(docs)
    arrays = (tokens, targets, patches, noise, t, image_loss, modality, image_id, doc_id, doc_kind)
    return Batch(*(torch.from_numpy(a) for a in arrays))
