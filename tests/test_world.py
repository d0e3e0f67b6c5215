"""The built-in world: determinism, splits, rendering, the scene parser, captions, questions."""

import random
import re

import numpy as np
import pytest

from moesaic.data.world import captions, generators, scenes, text
from moesaic.data.world.parser import parse_scene, parse_scenes
from moesaic.errors import ConfigError


def _scenes(n, seed, splits=("train", "val", "test")):
    rng = random.Random(seed)
    return [scenes.sample_scene(rng, splits[i % len(splits)]) for i in range(n)]


def test_vocabulary_sizes():
    assert len(scenes.SHAPES) >= 5 and len(scenes.COLOURS) >= 8 and len(scenes.SIZES) == 2
    assert len(scenes.POSITIONS) == 9


@pytest.mark.parametrize("size", [16, 32])
def test_parser_exact_on_rendered_scenes(size):
    truth = _scenes(2000, seed=size)
    images = np.stack([scenes.render(s, size) for s in truth])
    assert images.shape == (2000, size, size, 3) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1
    parsed = parse_scenes(images)
    wrong = [(p.scene, t) for p, t in zip(parsed, truth, strict=True) if p.scene != t]
    assert not wrong, wrong[:3]
    assert min(p.confidence for p in parsed) > 0.999


def test_parser_degrades_gracefully():
    truth = _scenes(200, seed=1)
    clean = np.stack([scenes.render(s, 16) for s in truth])
    gen = np.random.default_rng(0)
    light = parse_scenes(clean + gen.normal(0, 0.1, clean.shape).astype(np.float32))
    assert sum(p.scene == t for p, t in zip(light, truth, strict=True)) >= 190
    assert np.mean([p.confidence for p in light]) < 0.95  # noise lowers confidence
    junk = parse_scenes(gen.uniform(-1, 1, clean.shape))
    assert np.mean([p.confidence for p in junk]) < 0.2  # best guess, flagged as unsure
    assert all(0.0 <= c <= 1.0 for p in junk for c in (p.confidence, *p.object_confidence))
    one = parse_scene(clean[0])
    assert one.scene == truth[0] and len(one.object_confidence) == len(truth[0].objects)


def test_generator_is_deterministic_and_seed_dependent():
    a = [scenes.render(s, 16) for s in _scenes(20, seed=5)]
    b = [scenes.render(s, 16) for s in _scenes(20, seed=5)]
    c = [scenes.render(s, 16) for s in _scenes(20, seed=6)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert text.general_document(random.Random(3)) == text.general_document(random.Random(3))


def test_splits_are_disjoint_by_construction():
    train = _scenes(3000, 0, ("train",))
    val = _scenes(300, 1, ("val",))
    test = _scenes(300, 2, ("test",))
    for split, group in (("train", train), ("val", val), ("test", test)):
        assert all(s.split() == split for s in group)
        assert all(1 <= len(s.objects) <= 3 for s in group)
    held = scenes.HELD_OUT_PAIRS
    assert not any((o.shape, o.colour) in held for s in train + val for o in s.objects)
    assert all(any((o.shape, o.colour) in held for o in s.objects) for s in test)
    assert not {s.key() for s in train} & {s.key() for s in val}
    # every shape and every colour still occurs in training
    assert {o.shape for s in train for o in s.objects} == set(range(len(scenes.SHAPES)))
    assert {o.colour for s in train for o in s.objects} == set(range(len(scenes.COLOURS)))
    with pytest.raises(ConfigError, match="split"):
        scenes.sample_scene(random.Random(0), "dev")


def test_patchify_round_trip():
    img = scenes.render(_scenes(1, 0)[0], 16)
    p = scenes.patchify(img, 4)
    assert p.shape == (16, 48)
    assert np.array_equal(p[1], img[0:4, 4:8].reshape(-1))  # row-major, (p, p, C) flattened
    assert np.array_equal(scenes.unpatchify(p, 16, 4), img)


def test_too_small_image_size_is_a_config_error():
    with pytest.raises(ConfigError, match="image_size=8"):
        scenes.layout(8)


def _mentions(cap, obj, register):
    phrases = captions.attribute_phrases(register)
    w = obj.words
    return all(
        any(re.search(rf"\b{re.escape(p)}\b", cap) for p in phrases[attr][w[attr]])
        for attr in ("size", "colour", "shape", "position")
    )


@pytest.mark.parametrize("register", ["terse", "plain", "natural"])
def test_captions_name_every_attribute(register):
    rng = random.Random(register)
    for scene in _scenes(200, 3):
        cap = captions.caption(scene, register, rng)
        assert all(_mentions(cap, o, register) for o in scene.objects), cap
        assert scenes.BACKGROUNDS[scene.background] in cap


def test_registers_differ_and_mixed_mixes():
    rng = random.Random(0)
    scene_list = _scenes(300, 4)
    terse = {w for s in scene_list for w in captions.caption(s, "terse", rng).split()}
    natural = {w for s in scene_list for w in captions.caption(s, "natural", rng).split()}
    assert len(natural) > len(terse) + 10
    mixed = [captions.caption(s, "mixed", rng) for s in scene_list]
    assert any(c.endswith("background") or c.endswith("bg") for c in mixed)  # terse
    assert any("picture" in c or "drawn" in c for c in mixed)  # natural
    with pytest.raises(ConfigError, match="caption_register='fancy'"):
        captions.check_register("fancy")


def test_question_answers_are_right():
    rng = random.Random(0)
    for scene in _scenes(500, 5):
        q, a = captions.question_answer(scene, rng)
        objs = scene.objects
        if q.startswith("How many objects"):
            assert a == captions.NUMBER_WORDS[len(objs)]
        elif q.startswith("What colour is the "):
            shape = q[len("What colour is the ") : -1]
            assert [scenes.COLOURS[o.colour] for o in objs if o.words["shape"] == shape] == [a]
        elif q.startswith("Is there a "):
            colour, shape = q[len("Is there a ") : -1].split()
            hit = any(o.words["colour"] == colour and o.words["shape"] == shape for o in objs)
            assert a == ("yes" if hit else "no")
        elif q.startswith("Where is the "):
            colour, shape = q[len("Where is the ") : -1].split()
            cells = [o.words["position"] for o in objs if (o.words["colour"], o.words["shape"])
                     == (colour, shape)]  # fmt: skip
            assert a in cells


def test_general_text_is_broader_than_captions_and_ood_differs():
    rng = random.Random(0)
    gen = [text.general_document(rng) for _ in range(300)]
    ood = [text.ood_document(rng) for _ in range(300)]
    caps = [captions.caption(s, "mixed", rng) for s in _scenes(300, 6)]

    def vocab(docs):
        return {w.strip(".,;:!?").lower() for d in docs for w in d.split()}

    assert len(vocab(gen)) > 2 * len(vocab(caps))
    only_ood = vocab(ood) - vocab(gen)
    assert len(only_ood) > 30  # OOD topics bring their own words


def test_generator_registry_is_the_extension_point():
    assert {"text", "ood_text", "scene", "vqa"} <= set(generators.GENERATORS)
    rec = generators.GENERATORS["scene"](random.Random(0), "train", "plain", 16)
    assert rec.images[0].shape == (16, 16, 3) and rec.text and rec.scene is not None
    assert parse_scene(rec.images[0]).scene == rec.scene


# ------------------------------------------------------------------ data.max_objects


@pytest.mark.parametrize("max_objects, size", [(6, 16), (9, 16), (9, 32)])
def test_parser_exact_with_more_objects(max_objects, size):
    rng = random.Random(max_objects)
    truth = [scenes.sample_scene(rng, ("train", "val", "test")[i % 3], max_objects)
             for i in range(600)]  # fmt: skip
    counts = [len(s.objects) for s in truth]
    assert max(counts) == max_objects and min(counts) == 1
    parsed = parse_scenes(np.stack([scenes.render(s, size) for s in truth]), max_objects)
    assert [p.scene for p in parsed] == truth
    assert min(p.confidence for p in parsed) > 0.999


def test_more_objects_keep_splits_and_captions_whole():
    rng = random.Random(0)
    for split in ("train", "val", "test"):
        group = [scenes.sample_scene(rng, split, 7) for _ in range(300)]
        assert all(s.split() == split for s in group)
        for scene in group[:100]:
            cap = captions.caption(scene, "natural", rng)
            assert all(_mentions(cap, o, "natural") for o in scene.objects), cap


def test_max_objects_default_is_todays_world():
    a = [scenes.sample_scene(random.Random(i), "val") for i in range(200)]
    b = [scenes.sample_scene(random.Random(i), "val", scenes.MAX_OBJECTS) for i in range(200)]
    assert a == b and max(len(s.objects) for s in a) == 3


def test_max_objects_reaches_the_stream():
    from moesaic.config import load_config

    cfg = load_config("tiny", ["data.max_objects=8"]).data
    source = generators.WorldSource.from_config(cfg, "train")
    for kind in ("caption_image", "image_caption", "vqa", "image"):
        recs = [source.record(kind, i, random.Random(i)) for i in range(200)]
        assert max(len(r.scene.objects) for r in recs) == 8, kind
        assert all(parse_scene(r.images[0], 8).scene == r.scene for r in recs)


def test_default_parser_reads_the_background_from_the_median():
    """150 of 256 pixels black, the others a blue far from black: the median says black, a
    least-squares fit of the background says navy. Up to 4 objects the parser keeps the median
    rule."""
    far = scenes.to_unit(np.array([90.0, 90.0, 250.0], dtype=np.float32))
    black = np.random.default_rng(0).permutation(256) < 150
    img = np.where(black.reshape(16, 16, 1), scenes.BACKGROUND_UNIT[0], far)
    assert parse_scene(img).scene.background == 0
    assert parse_scene(img, 4).scene.background == 0
    assert parse_scene(img, 9).scene.background == scenes.BACKGROUNDS.index("navy")


@pytest.mark.parametrize("value", [0, 10])
def test_bad_max_objects_names_value_and_fix(value):
    from moesaic.config import load_config

    with pytest.raises(ConfigError, match=rf"data.max_objects={value} must be in \[1, 9\]"):
        load_config(None, [f"data.max_objects={value}"])
    with pytest.raises(ConfigError, match=rf"max_objects={value}"):
        scenes.sample_scene(random.Random(0), "train", value)
