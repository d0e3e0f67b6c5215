"""How rows move between token order `[T, D]` and expert order `[S, D]` (S = T·k), and the
deterministic fp32 sum of each token's k rows that every combine and every backward gather uses.

Suffix A indexes the T·k assignments in token order (flat index token·k + slot); S indexes the
same assignments sorted by expert.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclasses.dataclass
class Rows:
    """gather_S: token each expert-order row reads; inverse_A: the expert-order row of each
    assignment token·k + slot."""

    gather_S: Tensor
    inverse_A: Tensor
    num_tokens: int
    k: int


def wide(t: Tensor) -> Tensor:
    """At least fp32 (half precisions are widened, fp32/fp64 kept)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def bag_sums(t: Tensor) -> bool:
    """Whether sums over each token's rows run as one `embedding_bag` (CPU), rather than a
    gather to [T, k, D] and a sum (elsewhere)."""
    return t.device.type == "cpu"


def sum_rows(y_SD: Tensor, rows: Rows) -> Tensor:
    """Σ of the rows of each token, in fp32: [S, D] -> [T, D], deterministic, no atomics.

    On CPU one `embedding_bag` over the [T, k] rows of the tokens: each token's rows are summed
    in slot order by one thread, without materialising the gathered [T, k, D] (several times
    faster than index_add_ there, whose multi-threaded path sorts the index); elsewhere a gather
    to [T, k, D] and a sum.
    """
    T, k, y_SD = rows.num_tokens, rows.k, wide(y_SD)
    if bag_sums(y_SD):
        return F.embedding_bag(rows.inverse_A.view(T, k), y_SD, mode="sum")
    return y_SD.index_select(0, rows.inverse_A).view(T, k, -1).sum(1)
