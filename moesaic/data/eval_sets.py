"""Fixed held-out evaluation sets, independent of `data.mix` (the same for every arm of a study).

    text      in-distribution general text (val split of the source, if it has text)
    ood_text  the world's held-out out-of-distribution generator
    image     caption → image: flow loss on the image at a fixed grid of flow times
              (`EVAL_TIME_GRID` midpoints of (0, 1), cycled over images) with fixed noise;
              the caption is context only (no text loss, never dropped)
    image_uncond  the same images, noise and flow times with the caption dropped (the
              unconditional generation classifier-free guidance uses)
    caption   image → caption: clean image, text loss on the caption (and boi / eos)

Everything — documents, noise, flow times — derives from the `seed` argument (the config's
`eval.seed`), not from `data.seed`, so runs that differ only in training data are scored on
identical batches. Captions use the run's `data.caption_register`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from moesaic.batch import Batch
from moesaic.config import DataConfig
from moesaic.data.documents import eval_time_grid
from moesaic.data.packing import DocOptions, Source, Stream
from moesaic.data.world.generators import WorldSource

EVAL_TIME_GRID = 8
# set name -> (mix key, salt)
EVAL_SETS = {
    "text": ("text", 1),
    "ood_text": ("ood_text", 2),
    "image": ("caption_image", 3),
    "image_uncond": ("caption_image", 3),  # the same documents as "image", captions dropped
    "caption": ("image_caption", 4),
}


def build_eval_sets(
    cfg: DataConfig,
    tok,
    seed: int,
    n_batches: int,
    split: str = "val",
    source_factory: Callable[[DataConfig, str], Source] | None = None,
) -> dict[str, list[Batch]]:
    """{"text", "ood_text", "image", "image_uncond", "caption"} → `n_batches` Batches each
    ("text" only when the source has text, the image sets only when it has images)."""
    from moesaic.data import make_source

    world = WorldSource(split, cfg.caption_register, max(cfg.image_size, 15))
    source = (source_factory or make_source)(cfg, split)
    out: dict[str, list[Batch]] = {}
    for name, (kind, salt) in EVAL_SETS.items():
        src = world if kind == "ood_text" else source
        if kind not in src.kinds:
            continue
        opts = DocOptions(
            caption_loss=False,
            caption_dropout=1.0 if name == "image_uncond" else 0.0,
            time_shift=cfg.time_shift,
            understanding_noise=0.0,
            t_grid=tuple(eval_time_grid(EVAL_TIME_GRID)) if kind == "caption_image" else (),
            salt=salt,
        )
        stream = Stream(
            dataclasses.replace(cfg, mix={}), tok, src, split, mix={kind: 1.0}, opts=opts,
            seed=seed,
        )  # fmt: skip
        out[name] = [next(stream) for _ in range(n_batches)]
    return out
