"""Held-out per-modality losses (design.md §3): deterministic given fixed eval batches.

Each eval set is a list of `Batch`es with fixed noise and flow times. Text sets report the mean
next-token cross-entropy over all their text targets (and its perplexity); image sets report
the mean flow-matching MSE over all their image elements, video sets the same over their
video-frame elements. Means are weighted by the number of positions behind each batch's mean,
so the result does not depend on how the set was batched.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from moesaic.batch import Batch


@torch.no_grad()
def eval_losses(
    model: nn.Module,
    sets: dict[str, list[Batch]],
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """{"<set>/text": CE, "<set>/text_ppl": ..., "<set>/image": MSE, "<set>/video": MSE} for
    each set that has them."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for name, batches in sets.items():
            text_sum = image_sum = video_sum = 0.0
            text_n = image_n = video_n = 0
            for batch in batches:
                with autocast():
                    res = model(batch.to(device))
                tn, im, vn = int(res.text_count), int(res.image_count), int(res.video_count)
                text_sum += float(res.text_loss) * tn
                image_sum += float(res.image_loss) * im
                video_sum += float(res.video_loss) * vn
                text_n += tn
                image_n += im
                video_n += vn
            if text_n:
                out[f"{name}/text"] = text_sum / text_n
                out[f"{name}/text_ppl"] = math.exp(min(out[f"{name}/text"], 50.0))
            if image_n:
                out[f"{name}/image"] = image_sum / image_n
            if video_n:
                out[f"{name}/video"] = video_sum / video_n
    finally:
        model.train(was_training)
    return out
