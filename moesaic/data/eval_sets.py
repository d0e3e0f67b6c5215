"""Fixed held-out evaluation sets, independent of `data.mix` (the same for every arm of a study).

    text      in-distribution general text (val split of the source, if it has text)
    ood_text  the world's held-out out-of-distribution generator
    image     caption → image: flow loss on the image at a fixed grid of flow times
              (`EVAL_TIME_GRID` midpoints of (0, 1), cycled over images) with fixed noise;
              the caption is context only (no text loss, never dropped)
    caption   image → caption: clean image, text loss on the caption (and boi / eos)
    video         bare clips: next-frame flow loss — frames 1..k−1 clean, frame k noised at
                  a fixed grid time with fixed noise (k drawn per clip, as in training with
                  `data.video.context: clean`, whatever the run's context mode)
    action_video  the same with the actions between the frames (world modelling)

Loss keys (`evaluate.losses`): `text/text`, `ood_text/text`, `image/image`, `caption/text`,
`video/video` and `action_video/video` (flow MSE of video-frame positions). The video sets exist
when the source has clips (the world always) and `data.seq_len` holds a two-frame clip.

Everything — documents, noise, flow times — derives from the `seed` argument (the config's
`eval.seed`), not from `data.seed`, so runs that differ only in training data are scored on
identical batches. Captions use the run's `data.caption_register`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from moesaic.batch import Batch
from moesaic.config import DataConfig
from moesaic.data.documents import eval_time_grid, video_doc_len
from moesaic.data.packing import VIDEO_KINDS, DocOptions, Source, Stream
from moesaic.data.world.generators import WorldSource

EVAL_TIME_GRID = 8
# set name -> (mix key, salt)
EVAL_SETS = {
    "text": ("text", 1),
    "ood_text": ("ood_text", 2),
    "image": ("caption_image", 3),
    "caption": ("image_caption", 4),
    "video": ("video", 5),
    "action_video": ("action_video", 6),
}
FLOW_KINDS = ("caption_image", *VIDEO_KINDS)  # sets scored at the fixed flow-time grid


def build_eval_sets(
    cfg: DataConfig,
    tok,
    seed: int,
    n_batches: int,
    split: str = "val",
    source_factory: Callable[[DataConfig, str], Source] | None = None,
) -> dict[str, list[Batch]]:
    """{"text", "ood_text", "image", "caption", "video", "action_video"} → `n_batches`
    Batches each, for the kinds the source has ("video" sets only when a clip fits)."""
    from moesaic.data import make_source

    world = WorldSource(split, cfg.caption_register, max(cfg.image_size, 15))
    source = (source_factory or make_source)(cfg, split)
    out: dict[str, list[Batch]] = {}
    for name, (kind, salt) in EVAL_SETS.items():
        src = world if kind == "ood_text" else source
        if kind not in src.kinds:
            continue
        if kind in VIDEO_KINDS and cfg.seq_len < video_doc_len(2, cfg.patches_per_image):
            continue
        opts = DocOptions(
            caption_loss=False,
            caption_dropout=0.0,
            time_shift=cfg.time_shift,
            understanding_noise=0.0,
            t_grid=tuple(eval_time_grid(EVAL_TIME_GRID)) if kind in FLOW_KINDS else (),
            salt=salt,
            video_context="clean",
        )
        stream = Stream(
            dataclasses.replace(cfg, mix={}), tok, src, split, mix={kind: 1.0}, opts=opts,
            seed=seed,
        )  # fmt: skip
        out[name] = [next(stream) for _ in range(n_batches)]
    return out
