"""Property tests of the packer: any document lengths and mix ratios give valid Batches, and
every drawn document appears exactly once, whole (text beyond seq_len truncated and counted)."""

import dataclasses
import random
from collections import Counter

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moesaic.batch import DocKind
from moesaic.config import DataConfig
from moesaic.data.documents import KIND_OF, SpecialIds
from moesaic.data.packing import KIND_IDS, Stream, pack_rows
from moesaic.data.world.generators import Record

KINDS = ("text", "caption_image", "image_caption", "vqa", "image")


class FakeTok:
    """Token ids spell out the document: kind id, index and position, so nothing can hide."""

    pad_id, bos_id, eos_id, boi_id, eoi_id = 0, 1, 2, 3, 4
    special = SpecialIds(0, 1, 2, 3, 4)

    def encode(self, text: str) -> list[int]:
        kind, g, n, part = text.strip().split("|")
        base = 10 + KIND_IDS[kind] * 10**8 + int(g) * 10**4 + int(part) * 10**3
        return list(range(base, base + int(n)))


class FakeSource:
    kinds = KINDS

    def __init__(self, lengths, size):
        self.lengths, self.size, self.skipped = lengths, size, Counter()

    def record(self, kind, index, rng: random.Random):
        n = self.lengths[(index * 7 + KIND_IDS[kind]) % len(self.lengths)]
        image = np.full((self.size, self.size, 3), (index % 9) / 10, dtype=np.float32)
        text = f"{kind}|{index}|{n}|0"
        return Record(text=text, images=(image,), answer=f"{kind}|{index}|1|1")


def _expected_text(kind, g, n):
    tok = FakeTok()
    if kind == "vqa":
        return tok.encode(f"{kind}|{g}|{n}|0") + tok.encode(f"{kind}|{g}|1|1")
    if kind == "image":
        return []
    return tok.encode(f"{kind}|{g}|{n}|0")


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 150), min_size=1, max_size=8),
    weights=st.dictionaries(st.sampled_from(KINDS), st.floats(0.01, 1.0), min_size=1),
    seq_len=st.integers(8, 96),
    batch_size=st.integers(1, 3),
)
def test_packer_keeps_every_token_once(lengths, weights, seq_len, batch_size):
    cfg = DataConfig(
        seq_len=seq_len, batch_size=batch_size, image_size=16, patch_size=8, mix=weights,
        caption_dropout=0.0,
    )  # fmt: skip
    source = FakeSource(lengths, 16)
    stream = Stream(cfg, FakeTok(), source)
    twin = Stream(cfg, FakeTok(), source)
    placed = []
    for _ in range(4):
        rows = [stream._row() for _ in range(batch_size)]
        batch = pack_rows(rows, cfg, 0)
        batch.validate()
        twin_batch = next(twin)
        assert all(torch.equal(x, y) for x, y in zip(
            batch.tensors().values(), twin_batch.tensors().values(), strict=True))  # fmt: skip
        for r, docs in enumerate(rows):
            off = 0
            for d, doc in enumerate(docs):
                n = len(doc)
                assert n <= seq_len
                assert (batch.doc_id[r, off : off + n] == d).all()
                assert (batch.doc_kind[r, off : off + n] == int(KIND_OF[doc.kind])).all()
                assert batch.tokens[r, off : off + n].tolist() == doc.tokens.tolist()
                kind, g = doc.key
                text = [x for x in doc.tokens.tolist() if x >= 10]
                want = _expected_text(kind, g, source.lengths[(g * 7 + KIND_IDS[kind]) %
                                                              len(source.lengths)])  # fmt: skip
                assert text == want[: len(text)]  # a prefix, in order, nothing repeated
                assert len(want) - len(text) == doc.truncated
                assert doc.truncated == 0 or len(doc) == seq_len
                off += n
            assert (batch.doc_kind[r, off:] == DocKind.PAD).all()
            assert (batch.tokens[r, off:] == 0).all()
            placed += [doc.key for doc in docs]
    # every drawn document is placed exactly once or still held over
    held = [d.key for d in stream.pending]
    assert len(placed) == len(set(placed)) and not set(placed) & set(held)
    drawn = {(k, g) for k, c in stream.counters.items() for g in range(c)}
    assert set(placed) | set(held) == drawn
    assert sum(stream.produced.values()) == sum(len(stream.factory(k, g)) for k, g in drawn)


@settings(max_examples=20, deadline=None)
@given(weights=st.dictionaries(st.sampled_from(KINDS), st.integers(1, 10), min_size=2))
def test_token_shares_track_the_mix(weights):
    cfg = DataConfig(seq_len=64, batch_size=2, image_size=16, patch_size=8, mix=weights)
    stream = Stream(cfg, FakeTok(), FakeSource([5, 40, 17], 16))
    for _ in range(30):
        stream._row()
    total = sum(stream.produced.values())
    norm = sum(weights.values())
    longest = 64
    for k, w in weights.items():
        # the scheduler keeps every kind within one document of its share
        assert abs(stream.produced[k] - total * w / norm) <= longest + 1


def test_resume_mid_row_holdover():
    cfg = DataConfig(seq_len=40, batch_size=2, image_size=16, patch_size=8)
    cfg = dataclasses.replace(cfg, mix={"text": 1.0, "image": 1.0})
    ref = Stream(cfg, FakeTok(), FakeSource([30, 3, 25], 16))
    want = [next(ref) for _ in range(6)]
    cut = Stream(cfg, FakeTok(), FakeSource([30, 3, 25], 16))
    for _ in range(2):
        next(cut)
    assert cut.pending, "this test needs held-over documents at the cut"
    again = Stream(cfg, FakeTok(), FakeSource([30, 3, 25], 16))
    again.load_state_dict(cut.state_dict())
    for b in want[2:]:
        got = next(again)
        assert all(torch.equal(got.tensors()[k], v) for k, v in b.tensors().items())
