"""World-model accuracy: roll a trained model forward under held-out actions, parse every
predicted frame with the exact scene parser, and compare it with the true scene.

Held-out clips (`world_clips`): `n` world clips of `steps + 1` frames from a split (`test` by
default: every clip starts from a scene with a held-out (shape, colour) pair; `val`: unseen
start scenes of the training distribution), a pure function of (n, seed, split, steps).

Rollout (`Sampler.rollout`): from the clip's true first frame the model generates frame 1 from
action 1, then frame 2 from its own frame 1 and action 2, and so on. Step k's frame is scored
against the true scene after k actions, so `step1` is one-step prediction from a true frame and
later steps include the model's own errors. Keys `world/step{k}/{metric}`, k = 1..steps:

    shape colour size position count background exact
                the scene scores of `scene_scores.score_scenes` (matched objects,
                Σ max(#true, #pred) slots; exact = the whole scene, background included)
    effect      the k-th action did what it says: the object it acts on is in the predicted
                scene exactly as the action leaves it (cell, shape, colour, size) — for `move`
                with its old cell empty — and after `remove` its cell is empty
    parser_confidence   the parser's mean confidence in the predicted frames

Baselines with the same keys (`world_baselines`), over the same clips:

    random  a predictor that outputs an independent random scene of the split at every step
            (the chance level, as for captioning and text-to-image)
    copy    a predictor that repeats the last frame it has: in a rollout, the start frame at
            every step. It keeps every object the actions do not touch, so its attribute
            scores are high, while its `effect` and `exact` at step 1 are 0 (every action
            changes the scene); the natural trivial world model to beat.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moesaic.data.packing import KIND_IDS, SPLIT_IDS
from moesaic.data.world import clips as world_clips_mod
from moesaic.data.world.clips import Action, Clip
from moesaic.data.world.parser import parse_scenes
from moesaic.data.world.scenes import Scene, derive_seed, render, sample_scene
from moesaic.errors import ConfigError
from moesaic.evaluate.caption_parser import ObjectGuess
from moesaic.evaluate.sampling import ImageSampling, Sampler
from moesaic.evaluate.scene_scores import SCENE_METRICS, score_scenes

WORLD_SALT = 0x3D0C
METRICS = (*SCENE_METRICS, "effect")


def world_clips(n: int, seed: int, split: str = "test", steps: int = 3) -> list[Clip]:
    """n held-out clips of `steps + 1` frames (module doc)."""
    if split not in SPLIT_IDS:
        raise ConfigError(f"split='{split}' is not one of {', '.join(SPLIT_IDS)}")
    if steps < 1:
        raise ConfigError(f"--world-steps={steps} must be >= 1 (actions per rollout)")
    out = []
    for i in range(n):
        s = derive_seed(seed, SPLIT_IDS[split], KIND_IDS["action_video"], i, WORLD_SALT)
        out.append(world_clips_mod.sample_clip(random.Random(s), split, steps + 1))
    return out


def effect_done(scene: Scene, action: Action) -> bool:
    """Whether `scene` shows the result of `action` on the object it acts on (module doc)."""
    after = action.target()
    if after is None:
        return all(o.cell != action.obj.cell for o in scene.objects)
    if after not in scene.objects:
        return False
    return action.kind != "move" or all(o.cell != action.obj.cell for o in scene.objects)


def score_rollouts(predicted: Sequence[Sequence[Scene]], clips: Sequence[Clip]) -> dict:
    """Scores of predicted scenes [n clips][k steps] against the clips (module doc keys)."""
    if len(predicted) != len(clips):
        raise ValueError(f"{len(predicted)} rollouts for {len(clips)} clips")
    steps = len(clips[0].actions) if clips else 0
    out: dict[str, float] = {}
    for k in range(steps):
        pred = [p[k] for p in predicted]
        true = [c.scenes[k + 1] for c in clips]
        guesses = [([ObjectGuess.of(o) for o in s.objects], s.background) for s in pred]
        scores = score_scenes(guesses, true)
        effect = [effect_done(p, c.actions[k]) for p, c in zip(pred, clips, strict=True)]
        scores["effect"] = float(np.mean(effect)) if effect else 0.0
        out |= {f"world/step{k + 1}/{m}": scores[m] for m in METRICS}
    return out


def world_scores(
    sampler: Sampler, clips: Sequence[Clip], opts: ImageSampling | None = None
) -> dict[str, float]:
    """Roll the sampler's model forward on every clip and score it (module doc)."""
    if not clips:
        return {}
    size = sampler.data.image_size
    starts = np.stack([render(c.scenes[0], size) for c in clips])
    frames = sampler.rollout(starts, [list(c.texts) for c in clips], opts)
    n, k = frames.shape[:2]
    parsed = parse_scenes(frames.reshape(n * k, *frames.shape[2:]))
    scenes = [[parsed[i * k + j].scene for j in range(k)] for i in range(n)]
    out = score_rollouts(scenes, clips)
    for j in range(k):
        conf = [parsed[i * k + j].confidence for i in range(n)]
        out[f"world/step{j + 1}/parser_confidence"] = float(np.mean(conf))
    return out


def rollout_to_files(
    sampler: Sampler,
    start_HWC: np.ndarray,
    actions: Sequence[str],
    out: Path,
    scale: int = 16,
    opts: ImageSampling | None = None,
) -> tuple[Path, Path]:
    """Roll the model forward from one start frame under `actions` and write the start frame
    and every predicted frame as a strip (`out`, left to right, in the format its suffix names;
    PNG for an unknown one) and an animated GIF (`out` with suffix .gif, half a second per
    frame), upscaled `scale`× with nearest-neighbour."""
    from PIL import Image

    frames = sampler.rollout(start_HWC[None], [list(actions)], opts)[0]
    pixels = np.clip(np.round((np.concatenate([start_HWC[None], frames]) + 1) * 127.5), 0, 255)
    images = [Image.fromarray(p.astype(np.uint8).squeeze(-1) if p.shape[-1] == 1 else
                              p.astype(np.uint8)) for p in pixels]  # fmt: skip
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
                  for im in images]  # fmt: skip
    w, h = images[0].size
    strip = Image.new(images[0].mode, (len(images) * w, h))
    for i, im in enumerate(images):
        strip.paste(im, (i * w, 0))
    out = Path(out)
    gif = out.with_suffix(".gif")
    out.parent.mkdir(parents=True, exist_ok=True)
    strip.save(out, format=Image.registered_extensions().get(out.suffix.lower(), "PNG"))
    images[0].save(gif, format="GIF", save_all=True, append_images=images[1:], duration=500,
                   loop=0)  # fmt: skip
    print(f"wrote {out} and {gif} (start frame + {len(actions)} predicted)")
    return out, gif


def world_baselines(n: int, seed: int, split: str = "test", steps: int = 3) -> dict:
    """{"random": scores, "copy": scores} on the clips `world_clips(n, seed, split, steps)`."""
    clips = world_clips(n, seed, split, steps)
    rng = random.Random(derive_seed(seed, WORLD_SALT, 1))
    rand = [[sample_scene(rng, split) for _ in range(steps)] for _ in clips]
    copy = [[c.scenes[0]] * steps for c in clips]
    return {"random": score_rollouts(rand, clips), "copy": score_rollouts(copy, clips)}
