"""`data.parts`: every batch stacks one batch of each mix, exactly the unimodal runs' batches."""

import pytest
import torch

from moesaic.config import load_config
from moesaic.data import StackedStream, build_stream, load_tokenizer
from moesaic.errors import ConfigError, DataError
from moesaic.train.dist_checkpoint import restart_stream_state

BASE = ["data.vocab_size=512", "data.seq_len=128", "data.batch_size=3", "data.caption_loss=false"]


def _cfg(*extra):
    return load_config("tiny", [*BASE, *extra]).data


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(_cfg(), tmp_path_factory.mktemp("cache"))


def _parts(seed=0):
    parts = 'data.parts=[{"text": 1.0}, {"caption_image": 0.75, "image": 0.25}]'
    return _cfg(f"data.seed={seed}", parts)


def test_each_batch_is_the_unimodal_batches_stacked(tok):
    stacked = build_stream(_parts(), tok)
    assert isinstance(stacked, StackedStream)
    text = build_stream(_cfg('data.mix={"text": 1.0}'), tok)
    image = build_stream(_cfg('data.mix={"caption_image": 0.75, "image": 0.25}'), tok)
    for _ in range(4):
        got, a, b = next(stacked).tensors(), next(text).tensors(), next(image).tensors()
        for key in got:
            assert torch.equal(got[key], torch.cat([a[key], b[key]])), key
    assert stacked.produced == {**text.produced, **image.produced}
    assert stacked.rows == text.rows + image.rows


def test_resume_is_exact_and_checks_the_parts(tok):
    a = build_stream(_parts(), tok)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    b = build_stream(_parts(), tok)
    b.load_state_dict(state)
    for _ in range(3):
        ta, tb = next(a).tensors(), next(b).tensors()
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(DataError, match="has 1 parts, this run 2"):
        build_stream(_parts(), tok).load_state_dict({**state, "parts": state["parts"][:1]})
    with pytest.raises(DataError, match="same data.parts"):
        build_stream(_parts(), tok).load_state_dict(build_stream(_cfg(), tok).state_dict())


def test_restart_on_another_world_size_keeps_every_part(tok):
    streams = [build_stream(_parts(), tok, rank=r, world_size=2) for r in range(2)]
    for s in streams:
        next(s)
    moved = restart_stream_state([s.state_dict() for s in streams], 0, 1)
    fresh = build_stream(_parts(), tok)
    fresh.load_state_dict(moved)  # one process continues after every document both ranks drew
    drawn = {k: max(s.parts[i].counters[k] * 2 for s in streams)
             for i, p in enumerate(fresh.parts) for k in p.counters}  # fmt: skip
    assert {k: c for p in fresh.parts for k, c in p.counters.items()} == drawn


def test_parts_are_validated():
    with pytest.raises(ConfigError, match=r"data.parts\[1\].imgae.*did you mean 'image'"):
        load_config(None, ['data.parts=[{"text": 1}, {"imgae": 1}]'])
    with pytest.raises(ConfigError, match=r"data.parts\[0\] has no positive weight"):
        load_config(None, ['data.parts=[{"text": 0}]'])
