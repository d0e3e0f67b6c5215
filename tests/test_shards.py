"""WebDataset streaming: brace patterns, shards per rank (fewer shards than ranks too), each
sample once per epoch, lazy listing, missing shards counted once, exact resume."""

import io
import json
import random
import tarfile
import warnings

import pytest
import torch
from PIL import Image

from moesaic.config import load_config
from moesaic.data import build_stream, load_tokenizer
from moesaic.data.reading import DataWarning
from moesaic.data.shards import ShardSource, expand_braces, shards_of_rank
from moesaic.errors import ConfigError


def _png(i):
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), (i % 255, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _shards(root, n_shards, per_shard):
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root / f"part-{s:02d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"s{s}-{j:03d}"
                for name, blob in (
                    (f"{key}.png", _png(j)),
                    (f"{key}.txt", f"sample {key}".encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return str(root / f"part-{{00..{n_shards - 1:02d}}}.tar")


def _cfg(pattern, *extra):
    return load_config(
        "tiny",
        ["data.source=webdataset", f"data.paths=['{pattern}']", "data.vocab_size=300",
         "data.seq_len=64", "data.batch_size=2", *extra],
    ).data  # fmt: skip


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("a-{000..002}.tar", ["a-000.tar", "a-001.tar", "a-002.tar"]),
        ("a-{8..10}.tar", ["a-8.tar", "a-9.tar", "a-10.tar"]),
        ("a-{09..11}.tar", ["a-09.tar", "a-10.tar", "a-11.tar"]),
        ("a-{2..0}.tar", ["a-2.tar", "a-1.tar", "a-0.tar"]),
        ("{x,y}-{0..1}.tar", ["x-0.tar", "x-1.tar", "y-0.tar", "y-1.tar"]),
        ("plain.tar", ["plain.tar"]),
    ],
)
def test_brace_patterns_expand(pattern, names):
    assert expand_braces(pattern) == names


@pytest.mark.parametrize(
    ("pattern", "message"),
    [("a-{0..2.tar", "unclosed or nested"), ("a-{0..{1}}.tar", "unclosed or nested"),
     ("a}.tar", "without"), ("a-{0..2000000}.tar", "over 1,000,000 shards")],
)  # fmt: skip
def test_bad_brace_patterns_stop_with_one_line(pattern, message):
    with pytest.raises(ConfigError, match=message):
        expand_braces(pattern)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("w", [1, 2, 3, 4, 7])
def test_every_shard_slot_belongs_to_exactly_one_rank(n, w):
    owners: dict[tuple[int, int], int] = {}
    for r in range(w):
        shards, sharing, offset = shards_of_rank(n, r, w)
        for s in shards:
            for slot in range(offset, 12 * sharing, sharing):  # sample positions it keeps
                assert (s, slot) not in owners
                owners[(s, slot)] = r
    assert {s for s, _ in owners} == set(range(n))
    for s in range(n):  # every sample position of every shard is kept by someone
        assert {slot for t, slot in owners if t == s} >= set(range(12))


@pytest.mark.parametrize(("n_shards", "world"), [(5, 2), (5, 3), (2, 3), (1, 4)])
def test_ranks_read_disjoint_samples_that_cover_the_split(tmp_path, n_shards, world):
    pattern = _shards(tmp_path / "shards", n_shards, 12)
    cfg = _cfg(pattern)
    every = {key for _, key, _ in ShardSource(cfg, "train").samples()}
    assert len(every) == n_shards * (12 - 2)  # 1 val and 1 test per shard of 12
    seen: set[str] = set()
    for r in range(world):
        mine = {key for _, key, _ in ShardSource(cfg, "train", rank=r, world_size=world).samples()}
        assert mine and not mine & seen
        seen |= mine
    assert seen == every
    read = [set(ShardSource(cfg, "train", rank=r, world_size=world).mine) for r in range(world)]
    assert set().union(*read) == set(range(n_shards))
    if n_shards >= world:  # each rank its own shards
        assert sum(map(len, read)) == n_shards


def test_each_epoch_draws_every_sample_once_in_a_new_shard_order(tmp_path):
    pattern = _shards(tmp_path / "shards", 4, 7)
    src = ShardSource(_cfg(pattern), "train")
    assert src.counts == {}  # nothing listed before the first draw
    first = src.record("image", 0, random.Random(0))
    assert first is not None and len(src.counts) == 1  # one shard listed so far
    total = 4 * (7 - 2)
    epochs = [[src.record("image", e * total + i, random.Random(0)).text for i in range(total)]
              for e in range(2)]  # fmt: skip
    for texts in epochs:
        assert len(set(texts)) == total
    shard_order = [[t.split("-")[0] for t in texts[::5]] for texts in epochs]
    assert shard_order[0] != shard_order[1] and sorted(shard_order[0]) == sorted(shard_order[1])


def test_a_missing_shard_is_counted_once_when_its_turn_comes(tmp_path, monkeypatch):
    monkeypatch.setattr("moesaic.data.shards.OPEN_SHARDS", 1)  # shards are listed again
    pattern = _shards(tmp_path / "shards", 3, 6)
    (tmp_path / "shards" / "part-01.tar").unlink()
    src = ShardSource(_cfg(pattern), "train")
    assert dict(src.skipped) == {}
    with pytest.warns(DataWarning, match="part-01.tar: skipped \\(missing file\\)"):
        for i in range(3 * 2 * 4):  # three epochs of the two shards left
            assert src.record("image", i, random.Random(0)) is not None
        assert len(list(src.samples())) == len(list(src.samples())) == 2 * 4
    assert dict(src.skipped) == {"missing_file": 1} and src.split_records == 2 * 4


def test_a_streamed_run_resumes_exactly(tmp_path):
    pattern = _shards(tmp_path / "shards", 3, 10)
    cfg = _cfg(pattern, "data.mix={caption_image: 0.5, image: 0.5}")
    tok = load_tokenizer(cfg, tmp_path / "tok")
    stream = build_stream(cfg, tok, rank=1, world_size=2)
    for _ in range(5):
        next(stream).validate()
    state = json.loads(json.dumps(stream.state_dict()))
    assert state["source"]["shard_samples"]  # positions of the shards read so far
    want = [next(stream) for _ in range(4)]
    again = build_stream(cfg, tok, rank=1, world_size=2)
    again.load_state_dict(state)
    for b in want:
        pairs = zip(next(again).tensors().values(), b.tensors().values(), strict=True)
        assert all(torch.equal(x, y) for x, y in pairs)


def test_webdataset_and_text_sources_together(tmp_path):
    pattern = _shards(tmp_path / "shards", 2, 30)
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"note {i} about the shards" for i in range(60)))
    sources = [{"kind": "webdataset", "name": "tars", "paths": [pattern]},
               {"kind": "text", "name": "notes", "paths": [str(notes)]}]  # fmt: skip
    cfg = load_config("tiny", [f"data.sources={json.dumps(sources)}", "data.vocab_size=300",
                               "data.seq_len=64", "data.batch_size=2"]).data  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        tok = load_tokenizer(cfg, tmp_path / "tok")
    stream = build_stream(cfg, tok)
    for _ in range(3):
        next(stream).validate()
    assert set(stream.produced_by_source) == {"tars", "notes"}
    assert all(n > 0 for v in stream.produced_by_source.values() for n in v.values())
