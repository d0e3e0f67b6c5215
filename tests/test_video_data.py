"""World clips and the video document kinds: determinism, the parser on every frame, splits,
layouts and loss masks of `video` / `action_video`, exact resume, eval sets, options."""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from moesaic.batch import DocKind, Modality
from moesaic.config import load_config
from moesaic.data import build_eval_sets, build_stream, load_tokenizer
from moesaic.data.world import clips, scenes
from moesaic.data.world.generators import WorldSource
from moesaic.data.world.parser import parse_scenes
from moesaic.errors import ConfigError


def _cfg(*extra):
    base = ["data.vocab_size=512", "data.seq_len=160", "data.batch_size=4"]
    return load_config("tiny", [*base, *extra]).data


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(_cfg(), tmp_path_factory.mktemp("cache"))


def _clips(n, seed, split, lo=4, hi=8):
    rng = random.Random(seed)
    return [clips.random_clip(rng, split, lo, hi) for _ in range(n)]


def _equal(a, b):
    ta, tb = a.tensors(), b.tensors()
    return all(torch.equal(ta[k], tb[k]) for k in ta)


# ------------------------------------------------------------------ the clip generator


def test_clips_are_deterministic_and_seed_dependent():
    a, b, c = _clips(30, 1, "train"), _clips(30, 1, "train"), _clips(30, 2, "train")
    assert a == b and a != c
    fa = [clips.render_clip(x) for x in a]
    fb = [clips.render_clip(x) for x in b]
    assert all(
        np.array_equal(x, y) for u, v in zip(fa, fb, strict=True) for x, y in zip(u, v, strict=True)
    )
    lengths = {len(x.scenes) for x in _clips(200, 3, "train")}
    assert lengths == set(range(4, 9))  # uniform over [min, max]
    assert {len(x.scenes) for x in _clips(50, 3, "val", 2, 3)} == {2, 3}


@pytest.mark.parametrize("size", [16, 32])
def test_parser_is_exact_on_every_frame(size):
    truth = [
        s for split in ("train", "val", "test") for c in _clips(150, 7, split) for s in c.scenes
    ]
    frames = np.stack([scenes.render(s, size) for s in truth])
    parsed = parse_scenes(frames)
    wrong = [(p.scene, t) for p, t in zip(parsed, truth, strict=True) if p.scene != t]
    assert len(truth) > 2000 and not wrong, wrong[:3]


def test_actions_change_one_object_and_keep_the_world_valid():
    kinds = set()
    for split in ("train", "val", "test"):
        for clip in _clips(200, 11, split):
            assert len(clip.actions) == len(clip.texts) == len(clip.scenes) - 1
            for before, action, after, text in zip(
                clip.scenes, clip.actions, clip.scenes[1:], clip.texts, strict=False
            ):
                kinds.add(action.kind)
                assert clips.apply(before, action) == after
                assert after.background == before.background
                assert 1 <= len(after.objects) <= scenes.MAX_OBJECTS
                assert len({o.cell for o in after.objects}) == len(after.objects)
                changed = set(before.objects) ^ set(after.objects)
                assert 1 <= len(changed) <= 2  # one object appears, vanishes or is replaced
                assert text.split()[0] == action.kind
                if action.kind != "add":  # the text names exactly the object acted on
                    assert _named(before, text) == [action.obj], (text, before)
    assert kinds == set(clips.ACTION_KINDS)


def _named(scene, text):
    """Objects of `scene` that the description in `text` ("verb the [position size | size]
    colour shape …") fits."""
    words = text.split()[2:]
    size = next((w for w in words[:3] if w in scenes.SIZES), None)
    at = " ".join(words[: words.index(size)]) if size else ""
    colour, shape = words[words.index(size) + 1 :][:2] if size else words[:2]
    return [
        o
        for o in scene.objects
        if (o.words["colour"], o.words["shape"]) == (colour, shape)
        and size in (None, o.words["size"])
        and at in ("", o.words["position"])
    ]


def test_action_texts_read_as_documented():
    red_circle = scenes.SceneObject(cell=4, shape=1, colour=0, size=1)
    scene = scenes.Scene((red_circle,), background=0)
    move = clips.Action("move", red_circle, direction="left")
    assert clips.action_text(scene, move) == "move the red circle left"
    assert clips.apply(scene, move).objects[0].cell == 3
    blue = scenes.SceneObject(cell=2, shape=0, colour=2, size=0)
    assert clips.action_text(scene, clips.Action("add", blue)) == (
        "add a small blue square top right"
    )
    paint = clips.Action("paint", red_circle, colour=1)
    assert clips.action_text(scene, paint) == "paint the red circle green"
    twin = scenes.SceneObject(cell=0, shape=1, colour=0, size=0)
    two = scenes.Scene((twin, red_circle), background=0)
    assert clips.action_text(two, clips.Action("remove", twin)) == "remove the small red circle"
    triple = scenes.Scene((twin, red_circle, dataclasses.replace(twin, cell=8)), background=0)
    assert clips.action_text(triple, clips.Action("remove", twin)) == (
        "remove the top left small red circle"
    )
    beside = scenes.Scene((red_circle, dataclasses.replace(twin, cell=3)), background=0)
    with pytest.raises(ValueError, match="occupied"):
        clips.apply(beside, move)


def test_clip_splits_follow_the_scene_splits():
    for split in ("train", "val", "test"):
        for clip in _clips(300, 5, split):
            assert clip.split() == split
            first = clip.scenes[0].split()
            assert first == split
            if split == "train":
                assert all(s.split() == "train" for s in clip.scenes)
            if split == "val":
                assert all(s.split() != "test" for s in clip.scenes)
    assert any(
        any(s.split() == "test" for s in c.scenes[1:]) for c in _clips(300, 5, "test")
    )  # test clips may keep or create held-out pairs


def test_world_source_draws_clips_for_both_kinds():
    src = WorldSource("train", "terse", 16, frames=(3, 5))
    for kind in ("video", "action_video"):
        rec = src.record(kind, 0, random.Random(4))
        assert 3 <= len(rec.images) <= 5 and len(rec.actions) == len(rec.images) - 1
        assert rec.clip is not None and rec.clip.scenes[0] == rec.scene
        assert [p.scene for p in parse_scenes(np.stack(rec.images))] == list(rec.clip.scenes)
    with pytest.raises(ConfigError, match="max_frames"):
        WorldSource("train", "terse", 16, frames=(5, 3))


# ------------------------------------------------------------------ documents and packing


def _video_docs(b):
    """(row, kind, positions) of every video document."""
    out = []
    for row in range(b.shape[0]):
        for d in b.doc_id[row].unique().tolist():
            pos = (b.doc_id[row] == d).nonzero().flatten()
            kind = int(b.doc_kind[row, pos[0]])
            if kind in (DocKind.VIDEO, DocKind.ACTION_VIDEO):
                out.append((row, kind, pos))
    return out


def _frames(b, row, pos):
    ids = b.image_id[row, pos]
    return [pos[ids == i] for i in ids[ids >= 0].unique().tolist()]


@pytest.mark.parametrize("context", ["clean", "noised"])
def test_video_layouts_and_loss_masks(tok, context):
    cfg = _cfg("data.mix={video: 0.5, action_video: 0.5}", f"data.video.context={context}")
    m = cfg.patches_per_image
    docs = []
    stream = build_stream(cfg, tok)
    for _ in range(3):
        b = next(stream)
        b.validate()
        docs += [(b, *d) for d in _video_docs(b)]
    assert {k for _, _, k, _ in docs} == {DocKind.VIDEO, DocKind.ACTION_VIDEO}
    n_frames = []
    for b, row, kind, pos in docs:
        tokens, modality = b.tokens[row, pos], b.modality[row, pos]
        assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
        assert (b.targets[row, pos] == -1).all()  # no text loss in clip documents
        assert not (modality == Modality.IMAGE).any()
        frames = _frames(b, row, pos)
        n_frames.append(len(frames))
        for f in frames:  # each frame: its own block, contiguous, one flow time
            assert len(f) == m and (b.modality[row, f] == Modality.VIDEO).all()
            assert b.tokens[row, f[0] - 1] == tok.boi_id and b.tokens[row, f[-1] + 1] == tok.eoi_id
            assert b.t[row, f].unique().numel() == 1
        loss = [bool(b.image_loss[row, f].all()) for f in frames]
        assert all(bool(b.image_loss[row, f].any()) == x for f, x in zip(frames, loss, strict=True))
        t = [float(b.t[row, f[0]]) for f in frames]
        if context == "clean":  # only the last frame is noised and carries loss
            assert loss == [False] * (len(frames) - 1) + [True]
            assert t[:-1] == [1.0] * (len(frames) - 1) and t[-1] < 1.0
        else:
            assert all(loss) and all(x < 1.0 for x in t)
        gaps = [int(g[0] - f[-1]) - 3 for f, g in zip(frames, frames[1:], strict=False)]
        if kind == DocKind.VIDEO:
            assert gaps == [0] * (len(frames) - 1)  # eoi boi, back to back
        else:
            assert all(g > 0 for g in gaps)  # an action between every two frames
    assert min(n_frames) == (2 if context == "clean" else 4) and max(n_frames) > 4


def test_action_texts_sit_between_the_frames(tok):
    from moesaic.data.packing import KIND_IDS
    from moesaic.data.world.scenes import derive_seed

    cfg = _cfg("data.mix={action_video: 1}", "data.video.context=noised")
    stream = build_stream(cfg, tok)
    for doc in stream._row():
        g = doc.key[1]
        s = derive_seed(cfg.seed, 0, KIND_IDS["action_video"], g, 0)  # the factory's seed
        rec = stream.source.record("action_video", g, random.Random(s))
        text = [int(x) for x, im in zip(doc.tokens, _image_positions(doc), strict=True) if not im]
        expected = [tok.bos_id, tok.boi_id]
        for a in rec.actions[: len(doc.images) - 1]:
            expected += [tok.eoi_id, *tok.encode(a), tok.boi_id]
        assert text == [*expected, tok.eoi_id, tok.eos_id]


def _image_positions(doc):
    flags = np.zeros(len(doc), dtype=bool)
    for im in doc.images:
        flags[im.start : im.start + im.patches.shape[0]] = True
    return flags


def test_long_clips_lose_frames_to_fit(tok):
    cfg = _cfg("data.seq_len=64", "data.mix={video: 1}", "data.video.context=noised")
    b = next(build_stream(cfg, tok))
    b.validate()
    assert all(len(_frames(b, r, p)) == 3 for r, _, p in _video_docs(b))  # 2 + 3·18 = 56 ≤ 64
    with pytest.raises(ConfigError, match="clip document"):
        build_stream(_cfg("data.seq_len=30", "data.mix={video: 1}"), tok)


def test_video_mix_resumes_exactly(tok):
    cfg = _cfg("data.mix={text: 0.5, video: 0.25, action_video: 0.25}")
    ref = build_stream(cfg, tok)
    batches = [next(ref) for _ in range(6)]
    cut = build_stream(cfg, tok)
    for _ in range(2):
        next(cut)
    state = json.loads(json.dumps(cut.state_dict()))
    resumed = build_stream(cfg, tok)
    resumed.load_state_dict(state)
    assert all(_equal(next(resumed), b) for b in batches[2:])
    kinds = torch.cat([b.doc_kind.flatten() for b in batches])
    real = (kinds != DocKind.PAD).sum()
    share = float(((kinds == DocKind.VIDEO) | (kinds == DocKind.ACTION_VIDEO)).sum() / real)
    assert share == pytest.approx(0.5, abs=0.1)


def test_text_and_video_mix_trains_both(tok):
    b = next(build_stream(_cfg("data.mix={text: 0.5, video: 0.5}"), tok))
    assert b.num_text_targets > 0 and b.image_loss[b.video_mask].any()
    assert not b.image_mask.any()


def test_eval_sets_hold_video_at_fixed_times(tok):
    a = build_eval_sets(_cfg(), tok, seed=7, n_batches=2)
    b = build_eval_sets(_cfg("data.video.context=noised", "data.mix={text: 1}"), tok, 7, 2)
    grid = {(i + 0.5) / 8 for i in range(8)}
    for name in ("video", "action_video"):
        for x, y in zip(a[name], b[name], strict=True):
            assert _equal(x, y)  # independent of the mix and the training context mode
        v = a[name][0]
        assert v.num_text_targets == 0 and not v.image_mask.any()
        assert set(v.t[v.image_loss].unique().tolist()) <= grid
        ctx = v.video_mask & ~v.image_loss
        assert ctx.any() and (v.t[ctx] == 1).all()
    assert (a["action_video"][0].doc_kind == DocKind.ACTION_VIDEO).any()
    small = build_eval_sets(_cfg("data.seq_len=32", "data.mix={text: 1}"), tok, 7, 1)
    assert "video" not in small and "text" in small  # a two-frame clip does not fit


def test_video_config_is_checked():
    with pytest.raises(ConfigError, match="min_frames=1"):
        load_config("tiny", ["data.video.min_frames=1"])
    with pytest.raises(ConfigError, match="max_frames=3"):
        load_config("tiny", ["data.video.min_frames=4", "data.video.max_frames=3"])
    with pytest.raises(ConfigError, match="context='noisy'"):
        load_config("tiny", ["data.video.context=noisy"])
    with pytest.raises(ConfigError, match="video_ffn='video'"):
        load_config("tiny", ["model.ffn.video_ffn=video"])
    with pytest.raises(ConfigError, match="divisible by 3"):
        load_config(
            "tiny",
            ["model.ffn.kind=moe", "model.ffn.experts=8", "model.ffn.groups=modality",
             "model.ffn.video_ffn=own"],
        )  # fmt: skip
    cfg = load_config("tiny", ["data.video.min_frames=2", "data.video.max_frames=3"])
    assert WorldSource("train", "terse", 16, frames=(2, 3)).frames == (2, 3)
    assert (cfg.data.video.min_frames, cfg.data.video.max_frames) == (2, 3)


def test_bench_data_measures_the_video_kinds(tmp_path, capsys):
    from moesaic.cli import main

    out = tmp_path / "data.json"
    over = ["data.vocab_size=300", "data.seq_len=128", "data.batch_size=2"]
    assert main(["bench", "data", "tiny", *over, "--seconds", "0.05", "--json", str(out)]) == 0
    rates = json.loads(out.read_text())["per_kind_tokens_per_s"]
    video = {"video", "action_video", "video (context=noised)", "action_video (context=noised)"}
    assert video <= set(rates) and all(rates[k] > 0 for k in video)
    assert "action_video (context=noised)" in capsys.readouterr().out
