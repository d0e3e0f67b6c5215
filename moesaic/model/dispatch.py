"""Dropless token dispatch for mixtures of experts: sort by expert, run the experts, combine.

Every token picks `k` experts. The `T·k` (token, expert) assignments are sorted by expert with
a stable sort, so each expert's rows are contiguous (`S = T·k` rows) and the rows of one expert
keep token order. The experts (`experts.py`) run over those contiguous groups. Gates scale each
row in fp32, either the experts' SwiGLU activations or their outputs in the combine, whichever
is cheaper (`gates_in_combine`), and the k rows of each token are summed back in fp32 in a fixed
order with no atomics (`rows.sum_rows`), so the result is deterministic on every device.

On CPU with moesaic's C++ kernel, the kernel reads each expert's rows straight from the
token-order input instead of a gathered [S, D] copy, and the sort is one counting sort
(`_dispatch_native`); elsewhere the rows are gathered (`permute`) and handed to
`Experts.forward(x_SD, counts_E, scale_S)`, the one boundary expert parallelism replaces.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.model import native
from moesaic.model.experts import Experts, native_experts
from moesaic.model.rows import Rows, bag_sums, sum_rows, wide


@dataclasses.dataclass
class Routing:
    """Where each (token, slot) assignment goes. S = T·k rows sorted by expert.

    order_S:  flat assignment index (token·k + slot) of each sorted row
    token_S:  token of each sorted row (order_S // k)
    inverse_S: sorted row of each flat assignment (the inverse permutation of order_S)
    counts_E: rows per expert (int64, stays on device)
    """

    order_S: Tensor
    token_S: Tensor
    inverse_S: Tensor
    counts_E: Tensor
    num_tokens: int
    k: int

    def rows(self) -> Rows:
        return Rows(self.token_S, self.inverse_S, self.num_tokens, self.k)


def sort_by_expert(expert_TK: Tensor, num_experts: int, counting: bool = False) -> Routing:
    """Stable sort of the flattened assignments by expert id; no host synchronisation.

    `counting=True` (CPU, the C++ kernel loaded) runs one counting sort in the kernel instead
    of an argsort, an inverse scatter and a count: the same result, in one pass each way.
    """
    T, k = expert_TK.shape
    if counting:
        order, token, inverse, counts, _ = native.load().sort_by_expert(expert_TK, num_experts)
        return Routing(order, token, inverse, counts, T, k)
    flat = expert_TK.reshape(-1)
    _, order = torch.sort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    return Routing(order, order // k, inverse, counts, T, k)


class _Permute(torch.autograd.Function):
    """x_SD = x_TD[gather_S]; backward sums each token's rows (`sum_rows`)."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, rows: Rows) -> Tensor:
        ctx.rows = rows
        return x_TD.index_select(0, rows.gather_S)

    @staticmethod
    def backward(ctx, g_SD: Tensor):
        return sum_rows(g_SD, ctx.rows).to(g_SD.dtype), None


class _UnpermuteSum(torch.autograd.Function):
    """y_TD = Σ of each token's rows of y_SD (fp32): the adjoint of `_Permute`."""

    @staticmethod
    def forward(ctx, y_SD: Tensor, rows: Rows) -> Tensor:
        ctx.rows, ctx.dtype = rows, y_SD.dtype
        return sum_rows(y_SD, rows)

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        return g_TD.index_select(0, ctx.rows.gather_S).to(ctx.dtype), None


class _GatedSum(torch.autograd.Function):
    """y_TD = Σ_j gate_A[t·k + j] · y_SD[row of (t, j)] in fp32: the gates applied in the combine.

    `gate_S` is each row's gate, the same values as `gate_A` in row order; only the backward
    uses it, and returns the gradient of `gate_A`.
    """

    @staticmethod
    def forward(ctx, y_SD: Tensor, gate_A: Tensor, gate_S: Tensor, rows: Rows) -> Tensor:
        ctx.rows = rows
        ctx.save_for_backward(y_SD, gate_S)
        T, k, y = rows.num_tokens, rows.k, wide(y_SD)
        if bag_sums(y):
            bags = rows.inverse_A.view(T, k)
            weights = gate_A.to(y.dtype).view(T, k)
            return F.embedding_bag(bags, y, mode="sum", per_sample_weights=weights)
        y_TKD = y.index_select(0, rows.inverse_A).view(T, k, -1)
        return (y_TKD * gate_A.view(T, k, 1)).sum(1)

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        y_SD, gate_S = ctx.saved_tensors
        rows = ctx.rows
        g_SD = wide(g_TD).index_select(0, rows.gather_S)
        grad_gate = None
        if ctx.needs_input_grad[1]:
            grad_gate_S = torch.linalg.vecdot(g_SD, wide(y_SD))
            grad_gate = grad_gate_S.index_select(0, rows.inverse_A)
        grad_y = g_SD.mul_(gate_S.unsqueeze(-1)).to(y_SD.dtype)
        return grad_y, grad_gate, None, None


def gates_in_combine(experts: nn.Module, native: bool = False) -> bool:
    """Whether the gates scale the experts' outputs in the combine ([S, D] work in the backward:
    a gather of the gradient's rows, one scaling pass and one dot product) rather than their
    SwiGLU activations ([S, H] work: a scaling pass each way and a dot product). The two give
    the same result; the cheaper side is the combine when 2·D ≤ 3·H. On the C++ kernel
    (`native`) the activations are scaled in cache inside each expert, and the gradient's rows
    are copied per expert only when the gates are not in the combine, so there the combine wins
    only when the activations are at least twice as wide, 2·D ≤ H (`moesaic bench moe` on a
    2-core CPU: the tiny preset's layer, D = H = 128, is 2–3 % faster with the activations
    scaled; the coarse layer, H = 2·D, about 1 % faster with the combine)."""
    dim, hidden = getattr(experts, "dim", None), getattr(experts, "hidden", None)
    if dim is None or hidden is None:
        return False
    return 2 * dim <= hidden if native else 2 * dim <= 3 * hidden


def permute(x_TD: Tensor, routing: Routing) -> Tensor:
    """Rows of x gathered in expert order: [T, D] -> [S, D]."""
    return _Permute.apply(x_TD, routing.rows())


def unpermute_sum(y_SD: Tensor, routing: Routing) -> Tensor:
    """Sorted expert outputs back to token order, summed over each token's k slots: [T, D] f32."""
    return _UnpermuteSum.apply(y_SD, routing.rows())


@torch.compiler.disable
def dispatch(x_TD: Tensor, expert_TK: Tensor, gate_TK: Tensor | None, experts: nn.Module) -> Tensor:
    """y_t = Σ_j gate[t, j] · expert[expert[t, j]](x_t), dropless and deterministic. [T, D].

    `experts` is any module with `num_experts` and `forward(x_SD, counts_E, scale_S)` (an
    `Experts`, or its expert-parallel subclass). Gates (None: all 1) are applied in fp32, to
    the experts' activations (`scale_S`) or to their outputs in the combine, whichever is
    cheaper (`gates_in_combine`; the two are equal since the down projection is linear); the
    sum over k is in fp32 in a fixed order.

    Under `torch.compile` it runs eagerly: its buffer sizes depend on the routing, and
    `torch._grouped_mm` has no fp32 kernel for the compiler to trace.
    """
    weights = experts.native_weights(x_TD) if isinstance(experts, Experts) else None
    routing = sort_by_expert(expert_TK, experts.num_experts, counting=weights is not None)
    if weights is not None:
        return _dispatch_native(x_TD, gate_TK, experts, weights, routing)
    x_SD = permute(x_TD, routing)
    if gate_TK is None:
        return unpermute_sum(experts(x_SD, routing.counts_E), routing).to(x_TD.dtype)
    gate_A = wide(gate_TK).reshape(-1)
    if gates_in_combine(experts):
        gate_S = gate_A.detach().index_select(0, routing.order_S)
        y_SD = experts(x_SD, routing.counts_E, None)
        return _GatedSum.apply(y_SD, gate_A, gate_S, routing.rows()).to(x_TD.dtype)
    y_SD = experts(x_SD, routing.counts_E, gate_A.index_select(0, routing.order_S))
    return unpermute_sum(y_SD, routing).to(x_TD.dtype)


def _dispatch_native(
    x_TD: Tensor,
    gate_TK: Tensor | None,
    experts: Experts,
    weights: tuple[Tensor, Tensor],
    routing: Routing,
) -> Tensor:
    """`dispatch` on the CPU kernel, which reads each expert's rows straight from x_TD (and, with
    the gates scaling activations, the gradient's rows from g_TD): the same products and sums."""
    w1, w2 = weights
    rows, counts_E = routing.rows(), routing.counts_E
    if gate_TK is not None and gates_in_combine(experts, native=True):
        gate_A = wide(gate_TK).reshape(-1)
        gate_S = gate_A.detach().index_select(0, routing.order_S)
        y_SD = native_experts(x_TD, w1, w2, counts_E, None, rows, summed=False)
        return _GatedSum.apply(y_SD, gate_A, gate_S, rows).to(x_TD.dtype)
    scale_S = None
    if gate_TK is not None:
        scale_S = wide(gate_TK).reshape(-1).index_select(0, routing.order_S)
    y_TD = native_experts(x_TD, w1, w2, counts_E, scale_S, rows, summed=True)
    return y_TD.to(x_TD.dtype)
