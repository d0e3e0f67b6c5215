"""Task accuracy of a trained run: captioning, text-to-image, visual question answering and
world modelling.

On the built-in world (held-out scenes of the `test` split by default: every test scene holds
a (shape, colour) pair never seen in training, so these are compositional generalisation
scores; `split="val"` gives unseen scenes of the training distribution):

    caption  caption held-out images (greedy), parse the caption back into a scene
             (`caption_parser`), compare with the true scene
    t2i      generate an image for each held-out caption (Euler + CFG), parse it with the
             world's exact scene parser, compare with the scene the caption describes
    vqa      answer held-out visual questions (greedy); exact match of the short answer
             (lowercased, surrounding spaces and final punctuation removed)
    world    roll the model forward from held-out clips' first frames under their actions,
             parse every predicted frame and compare it with the true scene after each action
             (`world_model`: keys `world/step{k}/…`, random and copy-the-previous-frame
             baselines)

Scene comparison: `scene_scores.score_scenes`.

Chance (`chance_levels`): the same scores for a predictor that outputs an independent random
scene of the same split (captioning and text-to-image share it), and for VQA a uniform guess
over the answers seen for questions that begin with the same two words.

Real data (a source without a scene parser): `caption/text_loss` (held-out caption CE),
`t2i/image_loss` (held-out flow MSE) and `world/video_loss` (held-out next-frame flow MSE of
action-conditioned clips) — losses, lower is better — and no VQA.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from moesaic.data.packing import KIND_IDS, SPLIT_IDS
from moesaic.data.world.generators import Record, WorldSource
from moesaic.data.world.parser import parse_scenes
from moesaic.data.world.scenes import Scene, derive_seed, sample_scene
from moesaic.errors import ConfigError
from moesaic.evaluate.caption_parser import ObjectGuess, parse_caption
from moesaic.evaluate.sampling import ImageSampling, Sampler, TextSampling
from moesaic.evaluate.scene_scores import score_scenes

TASKS = ("caption", "t2i", "vqa", "world")
TASK_SALT = 0x7A5C


def _scene_guess(scene: Scene) -> tuple[list[ObjectGuess], int]:
    return [ObjectGuess.of(o) for o in scene.objects], scene.background


def normalize_answer(text: str) -> str:
    return re.sub(r"[.?!,;:]+$", "", text.strip().lower()).strip()


# ---------------------------------------------------------------------------- held-out data


def held_out(kind: str, n: int, seed: int, split: str, register: str, size: int) -> list[Record]:
    """n world records of mix key `kind` (caption pairs: "image_caption"; questions: "vqa")
    from `split`, a pure function of the arguments."""
    if split not in SPLIT_IDS:
        raise ConfigError(f"split='{split}' is not one of {', '.join(SPLIT_IDS)}")
    source = WorldSource(split, register, size)
    out = []
    for i in range(n):
        s = derive_seed(seed, SPLIT_IDS[split], KIND_IDS[kind], i, TASK_SALT)
        out.append(source.record(kind, i, random.Random(s)))
    return out


def chance_levels(n: int, seed: int, split: str = "test", register: str = "terse") -> dict:
    """Scores of random predictors (module doc) with the same keys as `run_tasks`."""
    recs = held_out("image_caption", n, seed, split, register, 16)
    rng = random.Random(derive_seed(seed, TASK_SALT, 1))
    guesses = [_scene_guess(sample_scene(rng, split)) for _ in recs]
    scores = score_scenes(guesses, [r.scene for r in recs])
    out = {f"{task}/{k}": v for task in ("caption", "t2i") for k, v in scores.items()}
    qa = held_out("vqa", max(n, 2000), seed + 1, split, register, 16)
    answers: dict[str, set[str]] = defaultdict(set)
    for r in qa:
        answers[" ".join(r.text.split()[:2])].add(normalize_answer(r.answer))
    test = held_out("vqa", n, seed, split, register, 16)
    out["vqa/accuracy"] = float(np.mean([1 / len(answers[" ".join(r.text.split()[:2])])
                                         for r in test])) if test else 0.0  # fmt: skip
    return out


# ---------------------------------------------------------------------------- tasks


def check_tasks(tasks: Sequence[str]) -> list[str]:
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ConfigError(
            f"--tasks={','.join(tasks)} names no task or an unknown one ({', '.join(bad)}); "
            f"choose from {','.join(TASKS)}"
        )
    return list(dict.fromkeys(tasks))


def caption_scores(sampler: Sampler, records: list[Record], opts: TextSampling) -> dict:
    images = np.stack([r.images[0] for r in records])
    parsed = [parse_caption(c) for c in sampler.captions(images, opts)]
    scores = score_scenes([(p.objects, p.background) for p in parsed], [r.scene for r in records])
    return {f"caption/{k}": v for k, v in scores.items()}


def t2i_scores(sampler: Sampler, records: list[Record], opts: ImageSampling) -> dict:
    images = sampler.images([r.text for r in records], opts)
    parsed = parse_scenes(images)
    guesses = [(list(map(ObjectGuess.of, p.scene.objects)), p.scene.background) for p in parsed]
    scores = score_scenes(guesses, [r.scene for r in records])
    out = {f"t2i/{k}": v for k, v in scores.items()}
    out["t2i/parser_confidence"] = float(np.mean([p.confidence for p in parsed]))
    return out


def vqa_scores(sampler: Sampler, records: list[Record], opts: TextSampling) -> dict:
    images = np.stack([r.images[0] for r in records])
    answers = sampler.answers(images, [r.text for r in records], opts)
    ok = [
        normalize_answer(a) == normalize_answer(r.answer)
        for a, r in zip(answers, records, strict=True)
    ]
    return {"vqa/accuracy": float(np.mean(ok))}


def run_tasks(
    run,
    tasks: Sequence[str] = TASKS,
    n: int = 500,
    seed: int = 0,
    split: str = "test",
    image_opts: ImageSampling | None = None,
    text_opts: TextSampling | None = None,
    world_opts: ImageSampling | None = None,
    world_steps: int = 3,
) -> dict[str, float]:
    """Task scores of a `LoadedRun` as flat keys: `caption/{shape,colour,size,position,count,
    background,exact}`, `t2i/{same…, parser_confidence}`, `vqa/accuracy`,
    `world/step{k}/{same…, effect, parser_confidence}` (higher is better), each over `n`
    held-out examples; on real data `caption/text_loss`, `t2i/image_loss`, `world/video_loss`.
    World rollouts are unguided unless `world_opts` says otherwise."""
    tasks = check_tasks(tasks)
    if n < 1:
        raise ConfigError(f"--n={n} must be >= 1 (held-out examples per task)")
    data = run.cfg.data
    if not data.world_only:
        return _real_data_losses(run, tasks)
    sampler = Sampler.from_run(run)
    image_opts = image_opts or ImageSampling(seed=seed)
    text_opts = text_opts or TextSampling(seed=seed)
    out: dict[str, float] = {}
    size, reg = data.image_size, data.caption_register
    if "caption" in tasks:
        recs = held_out("image_caption", n, seed, split, reg, size)
        out |= caption_scores(sampler, recs, text_opts)
    if "t2i" in tasks:
        recs = held_out("caption_image", n, seed, split, reg, size)
        out |= t2i_scores(sampler, recs, image_opts)
    if "vqa" in tasks:
        out |= vqa_scores(sampler, held_out("vqa", n, seed, split, reg, size), text_opts)
    if "world" in tasks:
        from moesaic.evaluate.world_model import world_clips, world_scores

        opts = world_opts or ImageSampling(
            steps=image_opts.steps, cfg_scale=None, seed=seed, sampler=image_opts.sampler
        )
        out |= world_scores(sampler, world_clips(n, seed, split, world_steps), opts)
    return out


def _real_data_losses(run, tasks: list[str]) -> dict[str, float]:
    """Sources without a scene parser: held-out caption CE and image flow MSE only."""
    if "vqa" in tasks:
        raise ConfigError(
            f"task 'vqa' needs the built-in world (data.source={run.cfg.data.source}); "
            "use --tasks caption,t2i for held-out caption and image losses"
        )
    losses = run.eval_losses()
    out = {}
    if "caption" in tasks and "caption/text" in losses:
        out["caption/text_loss"] = losses["caption/text"]
    if "t2i" in tasks and "image/image" in losses:
        out["t2i/image_loss"] = losses["image/image"]
    if "world" in tasks and "action_video/video" in losses:
        out["world/video_loss"] = losses["action_video/video"]
    return out
