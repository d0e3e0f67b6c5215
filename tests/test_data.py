"""Tokenizer, the packed stream, eval sets and the caption-shift metric on the world."""

import json
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from moesaic.batch import DocKind, Modality
from moesaic.config import load_config
from moesaic.data import (
    SPECIAL_TOKENS,
    Tokenizer,
    build_eval_sets,
    build_stream,
    caption_shift,
    load_tokenizer,
    measure_caption_shift,
)
from moesaic.data.tokenizer import train_tokenizer
from moesaic.errors import ConfigError, DataError


def _cfg(*extra):
    base = ["data.vocab_size=512", "data.seq_len=128", "data.batch_size=4"]
    return load_config("tiny", [*base, *extra]).data


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(_cfg(), tmp_path_factory.mktemp("cache"))


def _equal(a, b):
    ta, tb = a.tensors(), b.tensors()
    return all(torch.equal(ta[k], tb[k]) for k in ta)


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_trains_caches_and_reproduces(tmp_path, tok):
    assert tok.vocab_size == 512
    ids = [tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id]
    assert ids == [0, 1, 2, 3, 4]
    text = "A small red circle at the top left on a black background."
    assert tok.decode(tok.encode(text)) == text
    cfg = _cfg()
    again = load_tokenizer(cfg, tmp_path)
    assert again.to_str() == tok.to_str()  # same seed, fresh cache: identical
    cached = list((tmp_path / "tokenizers").glob("*/tokenizer.json"))
    assert len(cached) == 1 and not list(cached[0].parent.glob(".*"))  # no temp files left
    assert load_tokenizer(cfg, tmp_path).to_str() == tok.to_str()
    other = load_tokenizer(_cfg("data.vocab_size=600"), tmp_path)
    assert other.vocab_size == 600
    assert len(list((tmp_path / "tokenizers").glob("*/tokenizer.json"))) == 2


def test_user_tokenizer_file(tmp_path, tok):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = load_tokenizer(_cfg(f"data.tokenizer={path}"), tmp_path / "unused")
    assert loaded.to_str() == tok.to_str() and not (tmp_path / "unused").exists()
    # a tokenizer without our special tokens gets them appended
    bare = HFTokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain = tmp_path / "plain.json"
    bare.save(str(plain))
    user = Tokenizer.from_file(plain)
    assert user.added_special == list(SPECIAL_TOKENS)
    assert len({user.pad_id, user.bos_id, user.eos_id, user.boi_id, user.eoi_id}) == 5
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(_cfg(f"data.tokenizer={tmp_path / 'nope.json'}"), tmp_path)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match="not a Hugging Face tokenizer"):
        load_tokenizer(_cfg(f"data.tokenizer={tmp_path / 'junk.json'}"), tmp_path)


def test_train_tokenizer_is_deterministic():
    corpus = ["the red circle", "a blue square and a red ring"] * 50
    assert train_tokenizer(corpus, 300).to_str() == train_tokenizer(corpus, 300).to_str()


# ------------------------------------------------------------------ stream


def test_batches_are_valid_and_shaped(tok):
    cfg = _cfg()
    stream = build_stream(cfg, tok)
    for _ in range(5):
        b = next(stream)
        b.validate()
        assert b.shape == (4, 128) and b.patch_dim == 48
        assert b.num_text_targets > 0
    kinds = set(b.doc_kind.unique().tolist())
    assert kinds <= {int(k) for k in DocKind}


def test_same_seed_same_bytes_other_seed_differs(tok):
    a = [next(s) for s in [build_stream(_cfg(), tok)] for _ in range(3)]
    b = [next(s) for s in [build_stream(_cfg(), tok)] for _ in range(3)]
    c = [next(s) for s in [build_stream(_cfg("data.seed=1"), tok)] for _ in range(3)]
    assert all(_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not _equal(a[0], c[0])


def test_resume_is_exact(tok):
    cfg = _cfg()
    ref = build_stream(cfg, tok)
    batches = [next(ref) for _ in range(7)]
    cut = build_stream(cfg, tok)
    for _ in range(3):
        next(cut)
    state = json.loads(json.dumps(cut.state_dict()))  # JSON round trip
    resumed = build_stream(cfg, tok)
    resumed.load_state_dict(state)
    assert all(_equal(next(resumed), b) for b in batches[3:])
    with pytest.raises(DataError, match="rank 0 of 1"):
        build_stream(cfg, tok, rank=1, world_size=2).load_state_dict(state)


def _doc_keys(stream, n_batches):
    keys = []
    for _ in range(n_batches):
        rows = [stream._row() for _ in range(stream.cfg.batch_size)]
        keys += [d.key for r in rows for d in r]
    return keys


def test_ranks_draw_disjoint_documents(tok):
    cfg = _cfg()
    k0 = _doc_keys(build_stream(cfg, tok, rank=0, world_size=2), 4)
    k1 = _doc_keys(build_stream(cfg, tok, rank=1, world_size=2), 4)
    assert not set(k0) & set(k1)
    assert all(g % 2 == 0 for _, g in k0) and all(g % 2 == 1 for _, g in k1)
    b0 = next(build_stream(cfg, tok, rank=0, world_size=2))
    b1 = next(build_stream(cfg, tok, rank=1, world_size=2))
    assert not torch.equal(b0.tokens, b1.tokens)
    with pytest.raises(ConfigError, match="rank=2"):
        build_stream(cfg, tok, rank=2, world_size=2)


def test_mix_is_a_token_share(tok):
    cfg = _cfg("data.mix={text: 0.6, caption_image: 0.3, image: 0.1}")
    stream = build_stream(cfg, tok)
    counts = Counter()
    for _ in range(20):
        b = next(stream)
        counts.update(b.doc_kind.flatten().tolist())
    real = sum(v for k, v in counts.items() if k != DocKind.PAD)
    assert counts[DocKind.TEXT] / real == pytest.approx(0.6, abs=0.03)
    assert counts[DocKind.CAPTION_IMAGE] / real == pytest.approx(0.3, abs=0.03)
    assert counts[DocKind.IMAGE] / real == pytest.approx(0.1, abs=0.03)
    assert counts[DocKind.PAD] / sum(counts.values()) < 0.1


def _docs(b, row):
    """(kind, tokens, targets, modality, image_loss, t) per document of a row."""
    out = []
    for d in b.doc_id[row].unique().tolist():
        m = b.doc_id[row] == d
        out.append((int(b.doc_kind[row][m][0]), b.tokens[row][m], b.targets[row][m],
                    b.modality[row][m], b.image_loss[row][m], b.t[row][m]))  # fmt: skip
    return out


def test_layout_and_targets_per_kind(tok):
    cfg = _cfg("data.caption_dropout=0")
    b = next(build_stream(cfg, tok))
    seen = set()
    for row in range(b.shape[0]):
        for kind, tokens, targets, modality, image_loss, t in _docs(b, row):
            seen.add(kind)
            if kind == DocKind.PAD:
                assert (targets == -1).all() and (tokens == tok.pad_id).all()
                continue
            assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id and targets[-1] == -1
            img = modality == Modality.IMAGE
            text_pos = (~img).nonzero().flatten()
            # every text target is the next token, and only text tokens are predicted
            for i in range(len(tokens) - 1):
                if targets[i] >= 0:
                    assert targets[i] == tokens[i + 1] and not img[i + 1]
            assert (targets[img] == -1).all()
            if img.any():
                s = int(img.nonzero()[0])
                e = int(img.nonzero()[-1])
                assert tokens[s - 1] == tok.boi_id and tokens[e + 1] == tok.eoi_id
                assert targets[s - 1] == -1 and targets[e] == -1  # eoi never predicted
                assert targets[s - 2] == (tok.boi_id if kind != DocKind.IMAGE else -1)
            if kind == DocKind.TEXT:
                assert (targets[:-1] >= 0).all()
            if kind == DocKind.CAPTION_IMAGE:
                assert image_loss[img].all() and (t[img] < 1).all()
                assert (targets[text_pos[: int(img.nonzero()[0]) - 1]] >= 0).all()
            if kind == DocKind.IMAGE_CAPTION:
                assert not image_loss.any() and (t[img] == 1).all()
            if kind == DocKind.IMAGE:
                assert image_loss[img].all() and (targets == -1).all()
    assert {DocKind.TEXT, DocKind.CAPTION_IMAGE} <= seen


def test_caption_loss_off_and_dropout(tok):
    b = next(build_stream(_cfg("data.caption_loss=false", "data.mix={caption_image: 1}"), tok))
    assert b.num_text_targets == 0 and b.image_loss.any()
    b = next(build_stream(_cfg("data.caption_dropout=1", "data.mix={caption_image: 1}"), tok))
    for row in range(b.shape[0]):
        for kind, tokens, *_ in _docs(b, row):
            if kind == DocKind.CAPTION_IMAGE:
                assert tokens[1] == tok.boi_id  # empty caption: unconditional generation


def test_understanding_noise_bounds_t(tok):
    cfg = _cfg("data.understanding_noise=0.2", "data.mix={image_caption: 1}")
    b = next(build_stream(cfg, tok))
    t = b.t[b.image_mask]
    assert (t >= 0.8).all() and (t < 1).any()


def test_time_shift_moves_toward_noise(tok):
    def mean_t(shift):
        s = build_stream(_cfg(f"data.time_shift={shift}", "data.mix={image: 1}"), tok)
        return float(torch.cat([x.t[x.image_mask] for x in (next(s) for _ in range(4))]).mean())

    assert mean_t(3.0) < mean_t(1.0) - 0.1


def test_seq_len_too_short_for_an_image(tok):
    with pytest.raises(ConfigError, match="seq_len=16"):
        build_stream(_cfg("data.seq_len=16"), tok)
    b = next(build_stream(_cfg("data.seq_len=16", "data.mix={text: 1}"), tok))
    b.validate()  # text alone is fine: long documents are truncated


# ------------------------------------------------------------------ eval sets and shift


def test_eval_sets_fixed_and_independent_of_mix(tok):
    a = build_eval_sets(_cfg(), tok, seed=7, n_batches=2)
    b = build_eval_sets(_cfg("data.mix={text: 1}", "data.seed=3"), tok, seed=7, n_batches=2)
    c = build_eval_sets(_cfg(), tok, seed=8, n_batches=2)
    assert set(a) == {
        "text", "ood_text", "image", "image_uncond", "caption", "video", "action_video"
    }  # fmt: skip
    for name in a:
        assert len(a[name]) == 2
        for x, y in zip(a[name], b[name], strict=True):
            x.validate()
            assert _equal(x, y)
        assert not _equal(a[name][0], c[name][0])
    image = a["image"][0]
    assert image.num_text_targets == 0 and image.image_loss.any()
    assert set(image.t[image.image_mask].unique().tolist()) <= {(i + 0.5) / 8 for i in range(8)}
    assert a["caption"][0].num_text_targets > 0 and not a["caption"][0].image_loss.any()
    assert (a["text"][0].doc_kind != DocKind.CAPTION_IMAGE).all()
    # the unconditional set: the same images, noise and flow times, with no caption at all
    cond, uncond = a["image"][0], a["image_uncond"][0]
    for f in ("patches", "noise", "t"):
        first_cond = getattr(cond, f)[0][cond.image_id[0] == 0]
        assert first_cond.numel() > 0
        assert torch.equal(first_cond, getattr(uncond, f)[0][uncond.image_id[0] == 0])
    for row in range(uncond.tokens.shape[0]):
        text = (uncond.modality[row] == Modality.TEXT) & (uncond.doc_kind[row] != DocKind.PAD)
        per_doc = torch.bincount(uncond.doc_id[row][text])
        assert (per_doc[per_doc > 0] == 4).all()  # bos boi … eoi eos: no caption token


def test_caption_shift_metric(tok):
    same = caption_shift([[1, 2, 3]] * 5, [[1, 2, 3]] * 5)
    assert same == {"unigram_js": 0.0, "bigram_js": 0.0}
    apart = caption_shift([[1, 2]], [[3, 4]])
    assert apart["unigram_js"] == pytest.approx(1.0) and apart["bigram_js"] == pytest.approx(1.0)
    cfg = _cfg()
    terse = measure_caption_shift(cfg, tok, 200, seed=0, register="terse")
    natural = measure_caption_shift(cfg, tok, 200, seed=0, register="natural")
    assert terse["unigram_js"] > natural["unigram_js"] + 0.1
    assert terse["bigram_js"] > natural["bigram_js"]
