"""`data.source: clips`: folders of frame images with optional actions, read into the video
document kinds; bad clips, frames and action files skipped and counted."""

import json
import random
import warnings

import numpy as np
import pytest
from PIL import Image

from moesaic.batch import DocKind, Modality
from moesaic.config import load_config
from moesaic.data import build_eval_sets, build_stream, load_tokenizer, make_source
from moesaic.data.clips import natural_key
from moesaic.data.sources import DataWarning
from moesaic.data.world import clips
from moesaic.data.world.parser import parse_scenes
from moesaic.errors import DataError

N_CLIPS = 24


def _cfg(paths, *extra):
    base = ["data.vocab_size=300", "data.seq_len=128", "data.batch_size=2", "data.source=clips"]
    return load_config("tiny", [*base, f"data.paths=[{paths}]", *extra]).data


def _save(frame, path):
    pixels = np.round((frame + 1.0) * 127.5).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def _write_clips(root, actions="txt", bad=False):
    """World clips as frame folders: frame names that sort wrongly as plain strings."""
    rng = random.Random(0)
    truth = {}
    for i in range(N_CLIPS):
        clip = clips.sample_clip(rng, "train", 11)
        d = root / f"clip{i:02d}"
        d.mkdir(parents=True)
        for j, frame in enumerate(clips.render_clip(clip)):
            _save(frame, d / f"f{j + 1}.png")  # f1 … f11: as plain strings f10 < f2
        if actions == "txt" or (actions == "some" and i % 2):
            (d / "actions.txt").write_text("\n".join(clip.texts) + "\n")
        elif actions == "jsonl":
            lines = [json.dumps({"action": t}) for t in clip.texts]
            (d / "actions.jsonl").write_text("\n".join(lines) + "\n")
        truth[str(d)] = clip
    if bad:
        for i in (0, 2, 3):  # an unreadable middle frame, in every 6-frame window of the clip
            (root / f"clip{i:02d}" / "f6.png").write_bytes(b"\x89PNG broken")
        (root / "clip01" / "actions.txt").write_text("only one action\n")  # wrong count
        (root / "single").mkdir()
        _save(clips.render_clip(clip)[0], root / "single" / "f1.png")  # one frame
    return truth


def test_natural_order():
    names = ["f10.png", "f2.png", "f1.png", "a.png"]
    assert sorted(names, key=natural_key) == ["a.png", "f1.png", "f2.png", "f10.png"]


@pytest.mark.parametrize("actions", ["txt", "jsonl"])
def test_clips_are_read_in_order_with_their_actions(tmp_path, actions):
    truth = _write_clips(tmp_path / "clips", actions)
    cfg = _cfg(tmp_path / "clips", "data.video.min_frames=3", "data.video.max_frames=5")
    src = make_source(cfg, "train")
    assert src.kinds == ("video", "action_video") and len(src.items) == N_CLIPS - 2
    for index in range(10):
        rec = src.record("action_video", index, random.Random(index))
        assert 3 <= len(rec.images) <= 5 and len(rec.actions) == len(rec.images) - 1
        parsed = [p.scene for p in parse_scenes(np.stack(rec.images))]
        n = len(parsed)
        windows = [  # a window of consecutive frames of some clip, with that window's actions
            (list(c.scenes[i : i + n]), list(c.texts[i : i + n - 1]))
            for c in truth.values()
            for i in range(len(c.scenes) - n + 1)
        ]
        assert (parsed, list(rec.actions)) in windows


def test_clips_train_and_evaluate(tmp_path):
    _write_clips(tmp_path / "clips", "some")
    cfg = _cfg(tmp_path / "clips", "data.mix={video: 0.5, action_video: 0.5}")
    tok = load_tokenizer(cfg, tmp_path / "cache")
    assert tok.encode("move") and "move" in tok.decode(tok.encode("move the red"))
    b = next(build_stream(cfg, tok))
    b.validate()
    kinds = set(b.doc_kind.unique().tolist())
    assert {DocKind.VIDEO, DocKind.ACTION_VIDEO} <= kinds
    assert (b.modality != Modality.IMAGE).all() and b.image_loss[b.video_mask].any()
    sets = build_eval_sets(cfg, tok, 1, 1, split="val")
    assert {"video", "ood_text"} <= set(sets)


def test_bad_clips_are_skipped_and_counted(tmp_path):
    _write_clips(tmp_path / "clips", "txt", bad=True)
    cfg = _cfg(tmp_path / "clips", "data.mix={video: 1}", "data.video.min_frames=6",
               "data.video.max_frames=6", "data.seq_len=256")  # fmt: skip
    with pytest.warns(DataWarning):
        src = make_source(cfg, "train")
    assert src.skipped["short_clip"] == 1 and src.skipped["bad_actions"] == 1
    clip01 = [ref for ref in src.items if ref[0].name == "clip01"]  # [] when it is held out
    assert len(src.with_actions) == len(src.items) - len(clip01)  # it still serves `video`
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        tok = load_tokenizer(cfg, tmp_path / "cache")
        stream = build_stream(cfg, tok)
        for _ in range(N_CLIPS):
            next(stream).validate()
    # each broken frame counted once (at most 2 of the 3 clips are held out of train), however
    # often the windows holding it are drawn
    assert 1 <= stream.skipped["bad_image"] <= 3
    assert stream.skipped_draws["bad_image"] >= stream.skipped["bad_image"]
    with pytest.raises(DataError, match="short_clip|1 frames"):
        make_source(_cfg(tmp_path / "clips", "data.strict=true"), "train")


def test_no_clips_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable records"), pytest.warns(DataWarning):
        make_source(_cfg(tmp_path / "empty"), "train")


def test_clips_as_one_of_several_sources(tmp_path):
    """Clips as a `data.sources` entry: video lanes of both sources, per-source video sets."""
    _write_clips(tmp_path / "clips", "txt")
    sources = [
        {"kind": "world"},
        {"kind": "clips", "name": "real", "paths": [str(tmp_path / "clips")]},
    ]
    cfg = load_config(
        "tiny",
        ["data.vocab_size=300", "data.seq_len=128", "data.batch_size=2",
         "data.sources=" + json.dumps(sources), "data.mix={text: 0.5, video: 0.5}"],
    ).data  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        tok = load_tokenizer(cfg, tmp_path / "cache")
        stream = build_stream(cfg, tok)
        for _ in range(6):
            next(stream).validate()
        sets = build_eval_sets(cfg, tok, 1, 1, split="val")
    produced = stream.produced_by_source
    assert produced["real"]["video"] > 0 and produced["world"]["video"] > 0
    assert set(produced["real"]) == {"video"}  # the clips hold no text
    assert {"video", "video@world", "video@real"} <= set(sets)
    assert {"action_video@world", "action_video@real"} <= set(sets)  # sets ignore the run's mix
