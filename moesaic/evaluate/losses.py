"""Held-out per-modality losses (design.md §3): deterministic given fixed eval batches.

Each eval set is a list of `Batch`es with fixed noise and flow times. Text sets report the mean
next-token cross-entropy over all their text targets (and its perplexity); image sets report
the mean flow-matching MSE over all their image elements, and the same MSE per flow-time bin
(`TIME_BINS` equal bins of t ∈ [0, 1], keys `<set>/image_t<i>`, bin i holding
i/TIME_BINS ≤ t < (i+1)/TIME_BINS); video sets report the flow-matching MSE over their
video-frame elements (`<set>/video`; the time bins count image positions only). Means are
weighted by the number of positions behind each
batch's mean, so the result does not depend on how the set was batched.

`EvalResult.batches` keeps every batch's own mean per key, from which the evaluation noise of a
mean (the standard error over batches, `eval_noise`) is estimated and set beside the seed-to-seed
spread of a study.

With several processes the batches are dealt out over the ranks (rank r evaluates batches r,
r+N, …) and the per-batch sums and counts are added by `all_reduce`, so every rank gets what
one process evaluating every batch would (up to float summation order). When a set has fewer
batches than ranks × rounds, the ranks left without one repeat batch 0 and discard the result
and its routing counts, so every rank runs the same number of forward passes, as FSDP and
expert parallelism need.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moesaic.batch import Batch
from moesaic.model import heads
from moesaic.model.moe import moe_layers

TIME_BINS = 8
# per batch: text loss sum, text targets, image loss sum, image positions, video loss sum,
# video positions, then per time bin image loss sum and positions
_COLUMNS = 6 + 2 * TIME_BINS


@dataclasses.dataclass
class EvalResult:
    """`means`: {"<set>/text", "<set>/text_ppl", "<set>/image", "<set>/image_t<i>",
    "<set>/video"}; `batches`: the same keys (but perplexity) → each batch's own mean (None
    where a batch has none)."""

    means: dict[str, float]
    batches: dict[str, list[float | None]]


def eval_noise(batches: dict[str, list[float | None]]) -> dict[str, float]:
    """Standard error over batches of each key's mean: sd(batch means) / √(batches)."""
    out = {}
    for key, values in batches.items():
        v = [x for x in values if x is not None and math.isfinite(x)]
        if len(v) > 1:
            m = sum(v) / len(v)
            out[key] = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v))
    return out


def _moe_buffers(model: nn.Module) -> list[Tensor]:
    """The MoE layers' buffers, which a forward pass adds routing counts to."""
    return [b for layer in moe_layers(model) for b in layer.buffers()]


def _batch_sums(model: nn.Module, batch: Batch, out) -> Tensor:
    """One batch's row of sums and counts (see `_COLUMNS`), in float64."""
    tn, im, vn = int(out.text_targets), int(out.image_positions), int(out.video_positions)
    row = [
        float(out.text_loss) * tn, tn, float(out.image_loss) * im, im,
        float(out.video_loss) * vn, vn,
    ]  # fmt: skip
    mask = batch.image_loss & batch.image_mask
    target = heads.flow_target(batch.patches, batch.noise, model.cfg.prediction)
    err_N = (out.image_pred[mask].float() - target[mask].float()).square().mean(-1)
    bin_N = (batch.t[mask] * TIME_BINS).long().clamp(0, TIME_BINS - 1)
    sums = torch.zeros(TIME_BINS, dtype=torch.float64).index_add_(0, bin_N, err_N.double())
    counts = torch.bincount(bin_N, minlength=TIME_BINS).double()
    return torch.cat(
        [torch.tensor(row, dtype=torch.float64), torch.stack([sums, counts], 1).flatten()]
    )


def _keys(name: str, sums: Tensor) -> dict[str, float]:
    """Means of one set (or one batch) from its summed row."""
    s = sums.tolist()
    out = {}
    if s[1]:
        out[f"{name}/text"] = s[0] / s[1]
    if s[3]:
        out[f"{name}/image"] = s[2] / s[3]
        for i in range(TIME_BINS):
            total, n = s[6 + 2 * i], s[7 + 2 * i]
            if n:
                out[f"{name}/image_t{i}"] = total / n
    if s[5]:
        out[f"{name}/video"] = s[4] / s[5]
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    sets: dict[str, list[Batch]],
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> EvalResult:
    """Means and per-batch means of every set (see the module doc).

    `rank`, `world_size` and `all_reduce` (a sum over ranks, in place) split the work over
    processes; the defaults evaluate everything in this process.
    """
    was_training = model.training
    model.eval()
    tables = []  # per set: [batches, _COLUMNS]
    try:
        for batches in sets.values():
            table = torch.zeros(len(batches), _COLUMNS, dtype=torch.float64)
            for start in range(0, len(batches), world_size):
                index = start + rank
                real = index < len(batches)
                saved = [] if real else [(b, b.clone()) for b in _moe_buffers(model)]
                batch = batches[index if real else 0].to(device)
                with autocast():
                    out = model(batch)
                if real:
                    table[index] = _batch_sums(model, batch, out)
                for buffer, copy in saved:
                    buffer.copy_(copy)
            tables.append(table)
    finally:
        model.train(was_training)
    if all_reduce is not None and tables:
        flat = all_reduce(torch.cat(tables))
        tables = list(flat.split([len(b) for b in sets.values()]))
    means: dict[str, float] = {}
    per_batch: dict[str, list[float | None]] = {}
    for name, table in zip(sets, tables, strict=True):
        set_means = _keys(name, table.sum(0))
        means |= set_means
        if f"{name}/text" in set_means:
            means[f"{name}/text_ppl"] = math.exp(min(set_means[f"{name}/text"], 50.0))
        rows = [_keys(name, row) for row in table]
        for key in set_means:
            per_batch[key] = [r.get(key) for r in rows]
    return EvalResult(means, per_batch)


def eval_losses(
    model: nn.Module,
    sets: dict[str, list[Batch]],
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """The means of `evaluate` (held-out loss per key)."""
    return evaluate(model, sets, device, autocast, rank, world_size, all_reduce).means
