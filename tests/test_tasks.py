import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesaic.cli import main
from moesaic.data.world import captions
from moesaic.data.world.captions import REGISTERS
from moesaic.data.world.scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, SceneObject
from moesaic.errors import ConfigError
from moesaic.evaluate.caption_parser import ObjectGuess, parse_caption
from moesaic.evaluate.scene_scores import SCENE_METRICS, match_objects, score_scenes
from moesaic.evaluate.tasks import (
    caption_scores,
    chance_levels,
    held_out,
    normalize_answer,
    run_tasks,
    t2i_scores,
    vqa_scores,
)
from tests.sampling_utils import micro_run, micro_run_dir

# ---------------------------------------------------------------------------- caption parser


@st.composite
def scenes(draw):
    n = draw(st.integers(1, 3))
    cells = draw(st.lists(st.integers(0, 8), min_size=n, max_size=n, unique=True))
    objs = [
        SceneObject(
            c,
            draw(st.integers(0, len(SHAPES) - 1)),
            draw(st.integers(0, len(COLOURS) - 1)),
            draw(st.integers(0, len(SIZES) - 1)),
        )
        for c in cells
    ]
    return Scene(tuple(sorted(objs)), draw(st.integers(0, len(BACKGROUNDS) - 1)))


@settings(max_examples=300, deadline=None)
@given(scenes(), st.sampled_from(["terse", "plain", "natural", "mixed"]), st.integers(0, 2**32))
def test_caption_parser_inverts_every_register(scene, register, seed):
    text = captions.caption(scene, register, random.Random(seed))
    assert parse_caption(text).scene == scene, text


class RecordingRandom(random.Random):
    """Remembers every option `choice` picked."""

    def __init__(self, seed):
        super().__init__(seed)
        self.picked = set()

    def choice(self, seq):
        x = super().choice(seq)
        self.picked.add(x)
        return x


def test_caption_parser_inverts_every_template():
    """Every sentence template, object template and joiner of every register is exercised
    (and inverted) by a fixed sweep."""
    rng = RecordingRandom(0)
    for i in range(600):
        n = 1 + i % 3
        cells = rng.sample(range(9), n)
        objs = [
            SceneObject(c, rng.randrange(6), rng.randrange(10), rng.randrange(2)) for c in cells
        ]
        scene = Scene(tuple(sorted(objs)), rng.randrange(3))
        register = ("terse", "plain", "natural")[i % 3]
        text = captions.caption(scene, register, rng)
        assert parse_caption(text).scene == scene, text
    for reg in REGISTERS.values():
        parts = (*reg.templates, *reg.object_templates, *reg.joiners, *reg.last_joiners)
        assert set(parts) <= rng.picked, reg.name
        for phrases in (*reg.sizes.values(), *reg.positions.values()):
            assert set(phrases) <= rng.picked, reg.name


def test_caption_parser_on_imperfect_captions():
    p = parse_caption(
        "small red circle top left, large blue bar, small green square bottom; black bg"
    )
    assert p.background == BACKGROUNDS.index("black")
    assert [o.complete for o in p.objects] == [True, False, True]
    assert p.objects[1] == ObjectGuess(SHAPES.index("bar"), COLOURS.index("blue"), 1, None)
    assert p.scene is None
    assert parse_caption("").objects == () and parse_caption("").background is None
    assert parse_caption("on black or navy").background is None  # conflicting backgrounds


# ---------------------------------------------------------------------------- scoring


def test_matching_and_scores_by_hand():
    true = Scene((SceneObject(0, 1, 0, 0), SceneObject(4, 5, 2, 1)), 0)
    # Predicted in the other order, one attribute wrong on one object, plus an extra object.
    pred = [ObjectGuess(5, 2, 1, 4), ObjectGuess(1, 0, 1, 0), ObjectGuess(0, 0, 0, 8)]
    assert sorted(match_objects([ObjectGuess.of(o) for o in true.objects], pred)) == [
        (0, 1),
        (1, 0),
    ]
    s = score_scenes([(pred, 0)], [true])
    assert s["shape"] == s["colour"] == s["position"] == pytest.approx(2 / 3)
    assert s["size"] == pytest.approx(1 / 3)
    assert (s["count"], s["background"], s["exact"]) == (0.0, 1.0, 0.0)
    exact = [ObjectGuess.of(o) for o in reversed(true.objects)]
    assert score_scenes([(exact, 0)], [true])["exact"] == 1.0
    assert score_scenes([(exact, 1)], [true])["exact"] == 0.0
    assert score_scenes([([], None)], [true]) == dict.fromkeys(SCENE_METRICS, 0.0)


class Oracle:
    """Stands in for a sampler: returns the true caption / image / answer of each record, or
    those of other records (`shuffle`): a perfect and a chance-level model."""

    def __init__(self, records, shuffle=False):
        order = (
            np.random.default_rng(0).permutation(len(records)) if shuffle else range(len(records))
        )
        self.src = [records[i] for i in order]
        self.records = records

    def captions(self, images, opts):
        idx = [self._index_of_image(im) for im in images]
        return [self.src[i].text for i in idx]

    def images(self, prompts, opts):
        idx = [[r.text for r in self.records].index(p) for p in prompts]
        return np.stack([self.src[i].images[0] for i in idx])

    def answers(self, images, questions, opts):
        return [" " + self.src[i].answer.upper() + "." for i in range(len(questions))]

    def _index_of_image(self, im):
        return next(i for i, r in enumerate(self.records) if np.array_equal(r.images[0], im))


def test_metric_pipeline_scores_truth_at_100_and_random_near_chance():
    n = 300
    caps = held_out("image_caption", n, 0, "test", "mixed", 16)
    gens = held_out("caption_image", n, 0, "test", "mixed", 16)
    qa = held_out("vqa", n, 0, "test", "mixed", 16)
    perfect = {**caption_scores(Oracle(caps), caps, None), **t2i_scores(Oracle(gens), gens, None)}
    perfect |= vqa_scores(Oracle(qa), qa, None)
    assert all(v == 1.0 for v in perfect.values()), perfect
    chance = chance_levels(n, seed=1, split="test")
    rand = {
        **caption_scores(Oracle(caps, True), caps, None),
        **t2i_scores(Oracle(gens, True), gens, None),
    }
    for key, value in rand.items():
        if key.endswith("parser_confidence"):
            continue
        assert value == pytest.approx(chance[key], abs=0.07), key
        assert value < 0.6
    assert rand["caption/exact"] < 0.02 and rand["t2i/exact"] < 0.02
    assert 0.1 < chance["vqa/accuracy"] < 0.6


def test_noise_images_score_near_zero():
    recs = held_out("caption_image", 50, 0, "test", "terse", 16)

    class Noise(Oracle):
        def images(self, prompts, opts):
            return np.random.default_rng(0).uniform(-1, 1, (len(prompts), 16, 16, 3))

    s = t2i_scores(Noise(recs), recs, None)
    assert s["t2i/exact"] == 0.0 and s["t2i/shape"] < 0.3 and s["t2i/parser_confidence"] < 0.5


def test_answers_are_normalised():
    assert normalize_answer("  Three.\n") == "three"
    assert normalize_answer("top left?") == "top left"


def test_held_out_examples_are_deterministic_and_from_the_split():
    a = held_out("image_caption", 20, 3, "test", "terse", 16)
    b = held_out("image_caption", 20, 3, "test", "terse", 16)
    assert [r.text for r in a] == [r.text for r in b]
    assert all(r.scene.split() == "test" for r in a)
    assert all(r.scene.split() == "val" for r in held_out("vqa", 10, 3, "val", "terse", 16))


# ---------------------------------------------------------------------------- runs and CLI


def test_run_tasks_on_a_micro_model():
    from moesaic.evaluate.sampling import ImageSampling, TextSampling

    run = micro_run()
    text = TextSampling(max_new_tokens=4)
    out = run_tasks(run, ["caption", "t2i", "vqa"], n=3, image_opts=ImageSampling(steps=2),
                    text_opts=text)  # fmt: skip
    expected = {f"{t}/{m}" for t in ("caption", "t2i") for m in SCENE_METRICS}
    assert set(out) == expected | {"t2i/parser_confidence", "vqa/accuracy"}
    assert all(0.0 <= v <= 1.0 for v in out.values())
    with pytest.raises(ConfigError, match="choose from caption,t2i,vqa"):
        run_tasks(run, ["captions"], n=3)


def test_eval_cli_writes_tasks_and_keeps_losses(tmp_path, capsys):
    from moesaic.evaluate.sampling import ImageSampling, TextSampling
    from moesaic.evaluate.tasks import chance_levels
    from moesaic.train.runs import load_run

    run_dir = micro_run_dir(tmp_path)
    args = ["eval", str(run_dir), "--tasks", "caption,vqa", "--n", "2", "--steps", "2"]
    assert main(args) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    run = load_run(run_dir, "cpu")
    assert result["step"] == run.step and result["checkpoint"] == str(run.checkpoint)
    assert result["losses"] == pytest.approx(run.eval_losses())
    seed = run.cfg.eval.seed
    image_opts = ImageSampling(steps=2, cfg_scale=3.0, seed=seed)
    want = run_tasks(run, ["caption", "vqa"], 2, seed, "test", image_opts, TextSampling(seed=seed))
    assert result["tasks"] == pytest.approx(want)
    chance = chance_levels(2, seed, "test", run.cfg.data.caption_register)
    assert result["chance"] == pytest.approx({k: chance[k] for k in want if k in chance})
    assert main(["eval", str(run_dir)]) == 0
    again = json.loads((run_dir / "eval.json").read_text())
    assert "tasks" not in again and again["losses"] == result["losses"]
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--tasks", "cap"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_real_data_reports_held_out_losses_only(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    lines = []
    for i in range(24):
        Image.new("RGB", (20, 20), (i * 10, 80, 200)).save(root / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "caption": f"a picture number {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    run = micro_run("data.source=folder", f"data.paths=[{root}]", "data.vocab_size=300")
    out = run_tasks(run, ["caption", "t2i"], n=5)
    assert set(out) == {"caption/text_loss", "t2i/image_loss"}
    assert all(v > 0 for v in out.values())
    with pytest.raises(ConfigError, match="needs the built-in world"):
        run_tasks(run, ["vqa"], n=5)
