"""Autoregressive text decoding after a packed prefix: greedy or temperature / top-p sampling.

The prefix rows are right-aligned (left padding forms its own document, so the mask keeps it
out of attention) and every row continues at the same column; each row stops at its own `eos`.
With `use_cache` the prefix is run once and every new token is a one-column forward pass
against the model's KV cache (`moesaic.model.transformer.KVCache`), so the cost per token does
not grow with a full re-forward; without it the whole sequence is re-run per token (the
reference the cache is tested against: both give identical greedy outputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moesaic.batch import Batch, Modality
from moesaic.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TextSampling:
    """How text is decoded. temperature 0 = greedy (top_p is then unused)."""

    max_new_tokens: int | None = None  # None: up to the run's seq_len
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    use_cache: bool = True
    batch_size: int = 64

    def check(self) -> TextSampling:
        if self.temperature < 0:
            raise ConfigError(f"--temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        return self


def pick_tokens(logits_BV: Tensor, opts: TextSampling, gen: torch.Generator) -> Tensor:
    """Next token per row [B]: argmax, or a draw from the top-p nucleus of softmax(logits/T).

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p
    (the most likely token is always in it).
    """
    if opts.temperature == 0:
        return logits_BV.argmax(-1)
    probs = torch.softmax(logits_BV.float() / opts.temperature, dim=-1)
    if opts.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        sorted_p = torch.where(before < opts.top_p, sorted_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    draw = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1)
    return draw.to(logits_BV.device)


def right_align(batch: Batch, lengths: list[int]) -> tuple[Batch, Tensor]:
    """Shift each row so its document (the first `lengths[b]` columns, padding after it) ends
    at the last column. Returns the batch and rotary positions [B, L] counted from the
    document's first token (0 over the padding)."""
    L = batch.shape[1]
    rolled = [batch.rows(b, b + 1).map(lambda x, s=L - n: x.roll(s, dims=1))
              for b, n in enumerate(lengths)]  # fmt: skip
    col = torch.arange(L, device=batch.tokens.device)
    starts = torch.tensor([L - n for n in lengths], device=col.device)
    positions = (col.unsqueeze(0) - starts.unsqueeze(1)).clamp_min(0)
    return Batch.cat(rolled), positions


def _text_column(tokens_B: Tensor, last: Batch) -> Batch:
    """One text position per row that continues the document of the row's last column."""
    B, P = tokens_B.shape[0], last.patch_dim
    zeros = last.patches.new_zeros(B, 1, P)
    return Batch(
        tokens=tokens_B.unsqueeze(1),
        targets=torch.full_like(last.targets, -1),
        patches=zeros,
        noise=zeros,
        t=torch.ones_like(last.t),
        image_loss=torch.zeros_like(last.image_loss),
        modality=torch.full_like(last.modality, int(Modality.TEXT)),
        image_id=torch.full_like(last.image_id, -1),
        doc_id=last.doc_id.clone(),
        doc_kind=last.doc_kind.clone(),
    )


def _append(batch: Batch, col: Batch) -> Batch:
    a, b = batch.tensors(), col.tensors()
    return Batch(**{k: torch.cat([a[k], b[k]], dim=1) for k in a})


@torch.no_grad()
def decode(
    model: nn.Module,
    batch: Batch,
    positions: Tensor,
    opts: TextSampling,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[list[int]]:
    """Continue right-aligned prefix rows (`right_align`); the new tokens of each row, up to
    and excluding its eos (or `max_new_tokens` of them)."""
    B = batch.shape[0]
    gen = torch.Generator().manual_seed(opts.seed)
    cache = None
    if opts.use_cache:
        from moesaic.model.transformer import KVCache

        cache = KVCache()
    kw = {} if cache is None else {"cache": cache}
    last = batch.map(lambda x: x[:, -1:])
    with autocast():
        logits_BV = model(batch, positions=positions, **kw).logits[:, -1].float()
    done = torch.zeros(B, dtype=torch.bool, device=batch.tokens.device)
    out: list[list[int]] = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        next_B = torch.where(done, pad_id, pick_tokens(logits_BV, opts, gen))
        finished = done | (next_B == eos_id)
        for b in (~finished).nonzero().flatten().tolist():
            out[b].append(int(next_B[b]))
        done = finished
        if bool(done.all()):
            break
        col = _text_column(next_B, last)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        with autocast():
            if cache is not None:
                res = model(col, positions=positions[:, -1:], **kw)
            else:
                batch = _append(batch, col)
                res = model(batch, positions=positions)
        logits_BV = res.logits[:, -1].float()
    return out
