"""World-model evaluation and sampling: rollouts, the metric (truth 1.0, random near chance,
copy baseline), `moesaic sample --action` and `moesaic eval --tasks world`."""

import dataclasses
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from moesaic.cli import main
from moesaic.data.world import clips as world_clips_mod
from moesaic.data.world.clips import Action
from moesaic.data.world.scenes import Scene, SceneObject, patchify, render, sample_scene
from moesaic.evaluate.sampling import ImageSampling, Sampler
from moesaic.evaluate.tasks import run_tasks
from moesaic.evaluate.world_model import (
    METRICS,
    effect_done,
    score_rollouts,
    world_baselines,
    world_clips,
    world_scores,
)
from moesaic.model import heads
from tests.sampling_utils import micro_run, micro_run_dir

STEPS = 3


@pytest.fixture(scope="module")
def run():
    return micro_run("data.seq_len=128")


# ---------------------------------------------------------------------------- the metric


def test_effect_by_hand():
    circle = SceneObject(cell=4, shape=1, colour=0, size=1)
    before = Scene((circle,), 0)
    move = Action("move", circle, direction="up")
    after = world_clips_mod.apply(before, move)
    assert effect_done(after, move) and not effect_done(before, move)
    both = Scene(tuple(sorted((circle, after.objects[0]))), 0)
    assert not effect_done(both, move)  # a copy left behind in the old cell
    paint = Action("paint", circle, colour=2)
    assert effect_done(world_clips_mod.apply(before, paint), paint)
    assert not effect_done(before, paint)
    square = SceneObject(cell=0, shape=0, colour=2, size=0)
    two = Scene((square, circle), 1)
    remove = Action("remove", square)
    assert effect_done(world_clips_mod.apply(two, remove), remove) and not effect_done(two, remove)
    add = Action("add", SceneObject(cell=8, shape=2, colour=3, size=1))
    assert effect_done(world_clips_mod.apply(two, add), add) and not effect_done(two, add)


def test_truth_scores_one_random_near_chance_copy_keeps_only_untouched_objects():
    clips = world_clips(300, 0, "test", STEPS)
    assert all(len(c.scenes) == STEPS + 1 and c.split() == "test" for c in clips)
    truth = score_rollouts([list(c.scenes[1:]) for c in clips], clips)
    assert set(truth) == {f"world/step{k}/{m}" for k in (1, 2, 3) for m in METRICS}
    assert all(v == 1.0 for v in truth.values()), truth
    rng = random.Random(5)
    rand = score_rollouts([[sample_scene(rng, "test") for _ in range(STEPS)] for _ in clips], clips)
    base = world_baselines(300, 0, "test", STEPS)
    chance, copy = base["random"], base["copy"]
    for key, value in rand.items():
        assert value == pytest.approx(chance[key], abs=0.07), key
        assert value < 0.65, key
    assert rand["world/step1/exact"] < 0.02 and rand["world/step1/effect"] < 0.3  # removes: often
    assert copy["world/step1/exact"] == 0.0 and copy["world/step1/effect"] == 0.0
    for attr in ("shape", "colour", "size", "position", "background"):
        assert copy[f"world/step1/{attr}"] > chance[f"world/step1/{attr}"] + 0.2, attr
    assert copy["world/step1/background"] == 1.0
    assert world_clips(5, 1, "val", 2) == world_clips(5, 1, "val", 2)


# ---------------------------------------------------------------------------- rollouts


class WorldOracle(nn.Module):
    """Knows each row's true next frames [N, K, m, P]: predicts the exact velocity toward
    frame k of its row at rollout step k (`steps` Euler steps per frame), and records the
    context frames it was given."""

    def __init__(self, targets_NKmP, steps, prediction="velocity"):
        super().__init__()
        self.targets, self.steps = targets_NKmP, steps
        self.cfg = SimpleNamespace(prediction=prediction)
        self.calls, self.contexts = 0, []

    def forward(self, batch, **kw):
        k = self.calls // self.steps
        self.calls += 1
        tgt = batch.image_loss
        B, L, P = batch.patches.shape
        N = self.targets.shape[0]
        x0 = self.targets[:, k].repeat(B // N, 1, 1).reshape(-1, P)
        x_t = heads.flow_input(batch.patches, batch.noise, batch.t)[tgt]
        t = batch.t[tgt].unsqueeze(-1)
        pred = torch.zeros(B, L, P)
        pred[tgt] = x0 if self.cfg.prediction == "x0" else (x0 - x_t) / (1 - t)
        ctx = batch.video_mask & ~tgt
        self.contexts.append((batch.patches[ctx].reshape(B, -1, P), batch.t[ctx]))
        return SimpleNamespace(image_pred=pred)


@pytest.mark.parametrize(
    "prediction,kind", [("velocity", "euler"), ("x0", "euler"), ("velocity", "stochastic")]
)
def test_a_perfect_world_model_scores_one(run, prediction, kind):
    """Checks the rollout end to end: the layout, the target block, the time grid, that each
    predicted frame is fed back as clean context, and the parse + score of every step."""
    data = run.cfg.data
    clips = world_clips(6, 2, "test", STEPS)
    targets = np.stack(
        [[patchify(render(s, data.image_size), data.patch_size) for s in c.scenes[1:]]
         for c in clips]
    )  # fmt: skip
    oracle = WorldOracle(torch.from_numpy(targets), steps=4, prediction=prediction)
    sampler = Sampler(oracle, run.tokenizer, data)
    opts = ImageSampling(steps=4, cfg_scale=None, sampler=kind)
    scores = world_scores(sampler, clips, opts)
    assert oracle.calls == 4 * STEPS
    assert all(v == 1.0 for k, v in scores.items() if not k.endswith("confidence")), scores
    assert min(v for k, v in scores.items() if k.endswith("confidence")) > 0.99
    # at step 3 the context is the start frame and the two frames predicted before, all clean
    patches, t = oracle.contexts[-1]
    start = np.stack([patchify(render(c.scenes[0], data.image_size), data.patch_size)
                      for c in clips])  # fmt: skip
    m = data.patches_per_image
    expected = np.concatenate([start, targets[:, 0], targets[:, 1]], axis=1)
    np.testing.assert_allclose(patches.numpy(), expected, atol=1e-4)
    assert patches.shape[1] == 3 * m and bool((t == 1).all())


def test_rollout_context_window_and_fit(run):
    data = run.cfg.data
    frame = np.zeros((data.patches_per_image, data.patch_dim), dtype=np.float32)
    ids = run.tokenizer.encode("move the red circle left")

    def doc(seq_len, n, actions=True):
        sampler = Sampler(run.model, run.tokenizer, dataclasses.replace(data, seq_len=seq_len))
        return sampler._world_doc([frame] * n, [ids] * n if actions else [], data.patches_per_image)

    long = doc(512, 12)  # the last max_frames − 1 frames as context, then the target
    assert len(long.images) == data.video.max_frames == 8 and long.kind == "action_video"
    assert [im.loss for im in long.images] == [False] * 7 + [True]
    assert all(im.t == 1.0 for im in long.images[:-1])
    fit = doc(64, 12)  # what fits the run's seq_len
    assert len(fit) <= 64 and len(fit.images) == 2
    assert len(doc(128, 2).images) == 3
    uncond = doc(512, 3, actions=False)
    assert uncond.kind == "video" and len(uncond.images) == 4


def test_rollout_is_deterministic_and_shaped(run):
    sampler = Sampler.from_run(run)
    clips = world_clips(3, 4, "val", 2)
    starts = np.stack([render(c.scenes[0], 16) for c in clips])
    acts = [list(c.texts) for c in clips]
    a = sampler.rollout(starts, acts, ImageSampling(steps=2, cfg_scale=None, seed=1))
    b = sampler.rollout(starts, acts, ImageSampling(steps=2, cfg_scale=None, seed=1, batch_size=2))
    c = sampler.rollout(starts, acts, ImageSampling(steps=2, cfg_scale=2.0, seed=1))
    assert a.shape == (3, 2, 16, 16, 3) and np.array_equal(a, b)
    assert not np.allclose(a, c)  # guidance mixes in the action-free branch
    with pytest.raises(Exception, match="action lists"):
        sampler.rollout(starts, acts[:2])


# ---------------------------------------------------------------------------- CLI


def test_sample_cli_writes_a_strip_and_a_gif(tmp_path, capsys):
    from PIL import Image

    run_dir = micro_run_dir(tmp_path / "runs", "data.seq_len=128")
    start = tmp_path / "start.png"
    pixels = np.round((render(sample_scene(random.Random(0), "val"), 16) + 1) * 127.5)
    Image.fromarray(pixels.astype(np.uint8)).save(start)
    out = tmp_path / "world.png"
    actions = ["--action", "move the red circle left", "--action", "remove it"]
    args = ["sample", str(run_dir), "--image", str(start), "--out", str(out), "--steps", "2",
            "--scale", "2", *actions]  # fmt: skip
    assert main(args) == 0
    with Image.open(out) as im:
        assert im.size == (3 * 32, 32)  # start + 2 predicted frames, 16 px × 2
    with Image.open(tmp_path / "world.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (32, 32)
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--prompt", "x", "--action", "move left"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--action needs --image" in err


def test_eval_cli_reports_world_scores_with_chance_and_copy(tmp_path, capsys):
    run_dir = micro_run_dir(tmp_path / "runs", "data.seq_len=128")
    args = ["eval", str(run_dir), "--tasks", "world", "--n", "3", "--steps", "2",
            "--world-steps", "2", "--split", "val"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    keys = {f"world/step{k}/{m}" for k in (1, 2) for m in METRICS}
    assert set(result["tasks"]) == keys | {"world/step1/parser_confidence",
                                           "world/step2/parser_confidence"}  # fmt: skip
    assert set(result["chance"]) == set(result["copy"]) == keys
    assert result["copy"]["world/step1/effect"] == 0.0
    assert {"video/video", "action_video/video"} <= set(result["losses"])
    out = capsys.readouterr().out
    assert "world/step1/exact" in out and "copy 0.0000" in out
    assert main([*args[:-2], "--world-steps", "0"]) == 2


def test_world_task_on_real_clips_reports_the_held_out_loss(tmp_path):
    from tests.test_clip_source import _write_clips

    _write_clips(tmp_path / "clips", "txt")
    run = micro_run("data.source=clips", f"data.paths=[{tmp_path / 'clips'}]",
                    "data.vocab_size=300", "data.seq_len=128")  # fmt: skip
    out = run_tasks(run, ["world"], n=2)
    assert set(out) == {"world/video_loss"} and out["world/video_loss"] > 0


def test_stochastic_sampler_renoises_the_clean_estimate(run):
    from moesaic.evaluate.sampling import advance
    from tests.sampling_utils import FlowOracle

    x, v, fresh = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(advance(x, v, 0.2, 0.5, None), x + 0.3 * v)
    x0 = x + 0.8 * v  # the clean estimate at t = 0.2
    torch.testing.assert_close(advance(x, v, 0.2, 0.5, fresh), 0.5 * x0 + 0.5 * fresh)
    torch.testing.assert_close(advance(x, v, 0.2, 1.0, fresh), x0)
    data = run.cfg.data
    scenes = [sample_scene(random.Random(i), "val") for i in range(2)]
    target = np.stack([patchify(render(s, 16), data.patch_size) for s in scenes])
    sampler = Sampler(FlowOracle(torch.from_numpy(target), "velocity"), run.tokenizer, data)
    images = sampler.images(["a", "b"], ImageSampling(steps=5, cfg_scale=None,
                                                      sampler="stochastic"))  # fmt: skip
    np.testing.assert_allclose(images, np.stack([render(s, 16) for s in scenes]), atol=1e-4)
    real = Sampler.from_run(run)
    opts = ImageSampling(steps=3, cfg_scale=None, sampler="stochastic", seed=2)
    a, b = real.images(["x", "y"], opts), real.images(["x", "y"], opts)
    euler = real.images(["x", "y"], ImageSampling(steps=3, cfg_scale=None, seed=2))
    assert np.array_equal(a, b) and not np.allclose(a, euler)
    with pytest.raises(Exception, match="--sampler=heun"):
        ImageSampling(sampler="heun").check()
