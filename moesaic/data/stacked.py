"""A stream whose every batch stacks one batch from each of several mixes (`data.parts`).

The step-matched joint run of the modality-tax study (design.md §5) must see, at every
optimizer step, exactly the batch the text-only run sees *and* exactly the batch the image-only
run sees. With `data.parts = [{text: 1}, {caption_image: 0.75, image: 0.25}]` each batch is
`data.batch_size` rows of the first mix followed by `data.batch_size` rows of the second, each
part drawn by its own `Stream` with the run's seed — the same documents, in the same order, as
a run with `data.mix` set to that part. Rows are independent (documents never straddle rows and
ids are per row), so stacking changes nothing inside a row; the model's losses are means over
each modality's own positions, so the joint step's loss is L_text + λ·L_image of the two
unimodal batches, and the gradient is the sum of theirs.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from moesaic.batch import Batch
from moesaic.data.packing import Stream
from moesaic.errors import DataError

STATE_VERSION = 1


class StackedStream:
    """`len(parts)` streams, one batch of each concatenated along the rows per `next()`."""

    def __init__(self, parts: list[Stream]):
        self.parts = parts
        self.rank, self.world_size = parts[0].rank, parts[0].world_size

    @property
    def produced(self) -> dict[str, int]:
        """Document tokens per kind over all parts."""
        total: Counter = Counter()
        for p in self.parts:
            total.update(p.produced)
        return dict(total)

    @property
    def produced_by_source(self) -> dict[str, dict[str, int]]:
        """Document tokens per source and kind over all parts ({} with `data.source`)."""
        total: dict[str, Counter] = {}
        for p in self.parts:
            for name, by_kind in p.produced_by_source.items():
                total.setdefault(name, Counter()).update(by_kind)
        return {name: dict(c) for name, c in total.items()}

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def stats(self) -> Counter:
        total: Counter = Counter()
        for p in self.parts:
            total.update(p.stats)
        return total

    @property
    def skipped(self) -> dict[str, int]:
        total: Counter = Counter()
        for p in self.parts:
            total.update(p.skipped)
        return dict(total)

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "parts": [p.state_dict() for p in self.parts],
        }

    def load_state_dict(self, state: dict) -> None:
        parts = state.get("parts")
        if state.get("version") != STATE_VERSION or not isinstance(parts, list):
            raise DataError("data stream state is not a stacked-parts state; resume with the "
                            "same data.parts")  # fmt: skip
        if len(parts) != len(self.parts):
            raise DataError(
                f"data stream state has {len(parts)} parts, this run {len(self.parts)}; "
                "resume with the same data.parts"
            )
        for p, s in zip(self.parts, parts, strict=True):
            p.load_state_dict(s)

    def __iter__(self) -> StackedStream:
        return self

    def __next__(self) -> Batch:
        batches = [next(p) for p in self.parts]
        fields = [f.name for f in dataclasses.fields(Batch)]
        return Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in fields))
