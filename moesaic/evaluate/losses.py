"""Held-out per-modality losses (design.md §3): deterministic given fixed eval batches.

Each eval set is a list of `Batch`es with fixed noise and flow times. Text sets report the mean
next-token cross-entropy over all their text targets (and its perplexity); image sets report
the mean flow-matching MSE over all their image elements. Means are weighted by the number of
positions behind each batch's mean, so the result does not depend on how the set was batched.

With several processes the batches are dealt out over the ranks (rank r evaluates batches r,
r+N, …) and the sums and counts are added by `all_reduce`, so every rank gets the result one
process evaluating every batch would (up to float summation order). When a set has fewer
batches than ranks × rounds, the ranks left without one repeat batch 0 and discard the result
and its routing counts, so every rank runs the same number of forward passes, as FSDP and
expert parallelism need.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moesaic.batch import Batch
from moesaic.model.moe import moe_layers


def _moe_buffers(model: nn.Module) -> list[Tensor]:
    """The MoE layers' buffers, which a forward pass adds routing counts to."""
    return [b for layer in moe_layers(model) for b in layer.buffers()]


@torch.no_grad()
def eval_losses(
    model: nn.Module,
    sets: dict[str, list[Batch]],
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """{"<set>/text": CE, "<set>/text_ppl": ..., "<set>/image": MSE} for each set that has them.

    `rank`, `world_size` and `all_reduce` (a sum over ranks, in place) split the work over
    processes; the defaults evaluate everything in this process.
    """
    was_training = model.training
    model.eval()
    totals = []  # per set: text loss sum, text targets, image loss sum, image positions
    try:
        for batches in sets.values():
            acc = torch.zeros(4, dtype=torch.float64)
            for start in range(0, len(batches), world_size):
                index = start + rank
                real = index < len(batches)
                saved = [] if real else [(b, b.clone()) for b in _moe_buffers(model)]
                with autocast():
                    out = model(batches[index if real else 0].to(device))
                if real:
                    tn, im = int(out.text_targets), int(out.image_positions)
                    acc += torch.tensor(
                        [float(out.text_loss) * tn, tn, float(out.image_loss) * im, im],
                        dtype=torch.float64,
                    )
                for buffer, copy in saved:
                    buffer.copy_(copy)
            totals.append(acc)
    finally:
        model.train(was_training)
    summed = torch.stack(totals) if totals else torch.zeros(0, 4, dtype=torch.float64)
    if all_reduce is not None:
        summed = all_reduce(summed)
    out: dict[str, float] = {}
    for name, (text_sum, text_n, image_sum, image_n) in zip(sets, summed.tolist(), strict=True):
        if text_n:
            out[f"{name}/text"] = text_sum / text_n
            out[f"{name}/text_ppl"] = math.exp(min(out[f"{name}/text"], 50.0))
        if image_n:
            out[f"{name}/image"] = image_sum / image_n
    return out
