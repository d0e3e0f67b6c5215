"""Dropless token dispatch for mixtures of experts: permute, grouped matmul, combine.

Every token picks `k` experts. The `T·k` (token, expert) assignments are sorted by expert with
a stable argsort, so each expert's rows are contiguous in a `[S, D]` buffer (`S = T·k`), and
the rows of one expert keep token order. All experts then run over those contiguous groups: on
CPU in moesaic's C++ kernel (`native.py`, one whole expert per thread), else as one grouped
matmul (`torch._grouped_mm`), padded into one batched matmul, or as a loop over `torch.split`
chunks where grouped matmul is unavailable. (The C++ kernel reads each expert's rows straight
from the token-order input instead of a gathered [S, D] copy, and sorts by counting; see
`_dispatch_native`.) Gates scale each row in fp32, and the k rows of each
token are summed back in fp32 in a fixed order with no atomics, so the result is deterministic
on every device.

The expert computation sits behind one function boundary, `Experts.forward(x_SD, counts_E,
scale_S)`, which takes rows already sorted by expert, the number of rows per expert and the
rows' gates. Expert parallelism can wrap or replace that module (exchange rows all-to-all,
run the local experts, exchange back) without touching the router or the model.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.errors import ConfigError
from moesaic.model import native

BACKENDS = ("auto", "native", "grouped_mm", "split", "padded")
# `auto` on CPU runs the C++ expert kernel (`native.py`: one whole expert per thread) when it
# builds; the rules below choose among the PyTorch paths when it does not, and on other devices.
# `auto` on a multi-threaded CPU pads the experts to a common capacity and runs one batched
# matmul per product (`torch.bmm`, which hands the experts to the threads whole) instead of
# grouped matmul (one matmul per expert, each split across the threads), when that adds at most
# PAD_MAX_WASTE − 1 padding rows, experts get PAD_MIN_ROWS rows on average (below that the
# largest count is far above the mean), and either
# * an expert's first product is small, at most PAD_MAX_EXPERT_MACS multiply-adds on average
#   (mean rows · D · 2H): such matmuls gain little from splitting across threads, and batching
#   them wins (fine-grained experts), or
# * OpenMP threads busy-wait (libgomp's default policy): grouped matmul opens one parallel
#   region per expert and product, and when the cores are shared and a spinning worker is
#   preempted each region can cost a scheduler time slice; fewer, larger regions win by far.
# Otherwise grouped matmul (no padding) is faster. The thresholds come from `moesaic bench moe`
# on a 2-core CPU: padded is faster at 8.4M multiply-adds per expert (fine: 256 rows, D 256,
# 2H 128), slower from 17M (the tiny preset's MoE) up.
PAD_MAX_WASTE = 1.25
PAD_MAX_EXPERT_MACS = 12 * 2**20
PAD_MIN_ROWS = 16


def _openmp_busy_waits() -> bool:
    """Whether OpenMP worker threads spin between parallel regions (libgomp's default)."""
    passive = os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive"
    return not passive and os.environ.get("GOMP_SPINCOUNT", "") != "0"


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
    expert_S: Tensor | None = None  # expert of each sorted row (non-decreasing)


def sort_by_expert(expert_TK: Tensor, num_experts: int, counting: bool = False) -> Routing:
    """Stable sort of the flattened assignments by expert id; no host synchronisation.

    `counting=True` (CPU, the C++ kernel loaded) runs one counting sort in the kernel instead
    of an argsort, an inverse scatter and a count: the same result, in one pass each way.
    """
    T, k = expert_TK.shape
    if counting:
        sorted_ = native.load().sort_by_expert(expert_TK, num_experts)
        order, token, inverse, counts, expert_S = sorted_
        return Routing(order, token, inverse, counts, T, k, expert_S)
    flat = expert_TK.reshape(-1)
    expert_S, order = torch.sort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    return Routing(order, order // k, inverse, counts, T, k, expert_S)


def _wide(t: Tensor) -> Tensor:
    """At least fp32 (half precisions are widened, fp32/fp64 kept)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclasses.dataclass
class PaddedRouting:
    """Sorted rows laid out in E equal blocks of `capacity` slots (P = E·capacity).

    Slot e·C + j holds expert e's j-th row (token order kept), so all experts run as one batched
    matmul over [E, C, ·]. Slots past an expert's count are padding: their gate is 0, so their
    activations, outputs and weight gradients are exactly 0 whatever row they read.

    gather_P:  token each slot reads (padding reads the last token: finite, then scaled by 0)
    flat_P:    flat assignment index (token·k + slot) of each slot (padding: T·k, no assignment)
    slot_F:    slot of each flat assignment (the inverse of flat_P on real slots)
    """

    gather_P: Tensor
    flat_P: Tensor
    slot_F: Tensor
    capacity: int
    k: int


def pad_routing(routing: Routing, capacity: int) -> PaddedRouting:
    """Padded slots for `routing`; `capacity` must be at least the largest expert count."""
    T, k, E = routing.num_tokens, routing.k, routing.counts_E.numel()
    expert_S, device = routing.expert_S, routing.order_S.device
    start_E = routing.counts_E.cumsum(0) - routing.counts_E
    slot_S = torch.arange(expert_S.numel(), device=device) - start_E[expert_S]
    slot_S += expert_S * capacity
    flat_P = torch.full((E * capacity,), T * k, dtype=torch.int64, device=device)
    flat_P.index_copy_(0, slot_S, routing.order_S)
    gather_P = (flat_P // k).clamp(max=max(T - 1, 0))
    return PaddedRouting(gather_P, flat_P, slot_S[routing.inverse_S], capacity, k)


@dataclasses.dataclass
class _Rows:
    """How rows move between token order [T, D] and expert order [N, D] (N = S or P)."""

    gather_N: Tensor  # token each row reads
    inverse_F: Tensor  # row of each flat assignment token·k + slot (never a padding row)
    num_tokens: int
    k: int


def _bag_sums(t: Tensor) -> bool:
    """Whether sums over each token's rows run as one `embedding_bag` (CPU), rather than a
    gather to [T, k, D] and a sum (elsewhere)."""
    return t.device.type == "cpu"


def _sum_rows(y_ND: Tensor, rows: _Rows) -> Tensor:
    """Σ of the rows of each token, in fp32: [N, D] -> [T, D], deterministic, no atomics.

    On CPU one `embedding_bag` over the [T, k] rows of the tokens: each token's rows are
    summed in slot order by one thread, without materialising the gathered [T, k, D] (it is
    several times faster than index_add_ there, whose multi-threaded path sorts the index);
    elsewhere a gather to [T, k, D] and a sum.
    """
    T, k, y_ND = rows.num_tokens, rows.k, _wide(y_ND)
    if _bag_sums(y_ND):
        return F.embedding_bag(rows.inverse_F.view(T, k), y_ND, mode="sum")
    return y_ND.index_select(0, rows.inverse_F).view(T, k, -1).sum(1)


class _Permute(torch.autograd.Function):
    """x_ND = x_TD[gather_N]; backward sums each token's rows (`_sum_rows`)."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, rows: _Rows) -> Tensor:
        ctx.rows = rows
        return x_TD.index_select(0, rows.gather_N)

    @staticmethod
    def backward(ctx, g_ND: Tensor):
        return _sum_rows(g_ND, ctx.rows).to(g_ND.dtype), None


class _UnpermuteSum(torch.autograd.Function):
    """y_TD = Σ of each token's rows of y_ND (fp32): the adjoint of `_Permute`."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, rows: _Rows) -> Tensor:
        ctx.rows, ctx.dtype = rows, y_ND.dtype
        return _sum_rows(y_ND, rows)

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        return g_TD.index_select(0, ctx.rows.gather_N).to(ctx.dtype), None


class _GatedSum(torch.autograd.Function):
    """y_TD = Σ_j gate_F[t·k + j] · y_ND[row of (t, j)] in fp32: the gates applied in the combine.

    `gate_N` is each row's gate (0 at padding), the same values as `gate_F` in row order; it is
    only used by the backward, which returns the gradient of `gate_F`.
    """

    @staticmethod
    def forward(ctx, y_ND: Tensor, gate_F: Tensor, gate_N: Tensor, rows: _Rows) -> Tensor:
        ctx.rows = rows
        ctx.save_for_backward(y_ND, gate_N)
        T, k, y = rows.num_tokens, rows.k, _wide(y_ND)
        if _bag_sums(y):
            bags = rows.inverse_F.view(T, k)
            weights = gate_F.to(y.dtype).view(T, k)
            return F.embedding_bag(bags, y, mode="sum", per_sample_weights=weights)
        y_TKD = y.index_select(0, rows.inverse_F).view(T, k, -1)
        return (y_TKD * gate_F.view(T, k, 1)).sum(1)

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        y_ND, gate_N = ctx.saved_tensors
        rows = ctx.rows
        g_ND = _wide(g_TD).index_select(0, rows.gather_N)
        grad_gate = None
        if ctx.needs_input_grad[1]:
            grad_gate_N = torch.linalg.vecdot(g_ND, _wide(y_ND))
            grad_gate = grad_gate_N.index_select(0, rows.inverse_F)
        grad_y = g_ND.mul_(gate_N.unsqueeze(-1)).to(y_ND.dtype)
        return grad_y, grad_gate, None, None


class _NativeTokens(torch.autograd.Function):
    """experts(x_TD[token_S]) · scale_S on the CPU kernel, which copies each expert's rows
    itself (`csrc/experts.cpp`). `summed`: returns each token's rows summed in fp32 ([T, D]),
    so the backward's gradient rows are copied per expert inside the kernel too, rather than
    gathered to [S, D]; else the rows ([S, D]) for a combine outside. The backward sums each
    token's rows of dx (`_sum_rows`)."""

    @staticmethod
    def forward(ctx, x_TD, w1, w2, counts_E, scale_S, rows: _Rows, summed: bool) -> Tensor:
        ext = native.load()
        y_SD, gate_up = ext.experts_forward(x_TD, w1, w2, counts_E, scale_S, rows.gather_N)
        ctx.rows, ctx.summed = rows, summed
        ctx.save_for_backward(x_TD, w1, w2, counts_E, scale_S, gate_up)
        return _sum_rows(y_SD, rows) if summed else y_SD

    @staticmethod
    def backward(ctx, g: Tensor):
        x_TD, w1, w2, counts_E, scale_S, gate_up = ctx.saved_tensors
        token_S = ctx.rows.gather_N
        dy_rows = token_S if ctx.summed else None  # g is [T, D] or already [S, D]
        dx_SD, dw1, dw2, dscale = native.load().experts_backward(
            g.contiguous(), x_TD, w1, w2, counts_E, scale_S, gate_up, token_S, dy_rows
        )
        dscale = dscale if ctx.needs_input_grad[4] else None
        return _sum_rows(dx_SD, ctx.rows).to(x_TD.dtype), dw1, dw2, None, dscale, None, None


def gates_in_combine(experts: nn.Module, native: bool = False) -> bool:
    """Whether the gates scale the experts' outputs in the combine ([N, D] work in the backward:
    a gather of the gradient's rows, one scaling pass and one dot product) rather than their
    SwiGLU activations ([N, H] work: a scaling pass each way and a dot product). The two give
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


def _sorted_rows(routing: Routing) -> _Rows:
    return _Rows(routing.token_S, routing.inverse_S, routing.num_tokens, routing.k)


def permute(x_TD: Tensor, routing: Routing) -> Tensor:
    """Rows of x gathered in expert order: [T, D] -> [S, D]."""
    return _Permute.apply(x_TD, _sorted_rows(routing))


def unpermute_sum(y_SD: Tensor, routing: Routing) -> Tensor:
    """Sorted expert outputs back to token order, summed over each token's k slots: [T, D] f32."""
    return _UnpermuteSum.apply(y_SD, _sorted_rows(routing))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g.contiguous()


def _aligned(t: Tensor) -> bool:
    size = t.element_size()
    strides = zip(t.stride()[:-1], t.shape[:-1], strict=True)
    strides_ok = all(s * size % 16 == 0 for s, n in strides if n > 1)
    return strides_ok and t.stride(-1) == 1 and t.data_ptr() % 16 == 0


def grouped_mm_supported(x: Tensor, *weights: Tensor) -> bool:
    """Whether `torch._grouped_mm` can run this product here (torch version, dtype, alignment).

    CPU kernels take fp32 and bf16; CUDA kernels take bf16. Row strides and base pointers must
    be 16-byte aligned, so the model and expert widths must be multiples of 16 bytes of dtype.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    dtypes = (torch.float32, torch.bfloat16) if x.device.type == "cpu" else (torch.bfloat16,)
    if x.dtype not in dtypes or any(w.dtype != x.dtype for w in weights):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    return all(_aligned(t) for t in (x, *weights))


def grouped_matmul(x_SD: Tensor, w_EDH: Tensor, offsets_E: Tensor) -> Tensor:
    """Grouped product: rows offsets[e-1]:offsets[e] of x times w[e]. [S, D] -> [S, H]."""
    return _ContiguousGrad.apply(torch._grouped_mm(x_SD, w_EDH, offs=offsets_E))


def split_matmul(x_SD: Tensor, w_EDH: Tensor, counts: list[int]) -> Tensor:
    """The fallback: one matmul per expert over its contiguous chunk (empty chunks allowed)."""
    chunks = torch.split(x_SD, counts)
    return torch.cat([c @ w_EDH[e] for e, c in enumerate(chunks)])


class _SwiGLU(torch.autograd.Function):
    """silu(gate) · up [· scale] on a fused [N, 2H] projection, scale [N] applied in fp32.

    Saves the input, silu(gate) and (with a scale) the unscaled product, which the backward
    needs and would otherwise recompute, and the backward writes both halves of one buffer
    instead of concatenating them as autograd would for `chunk` (the largest elementwise cost
    of a SwiGLU layer on CPU).
    """

    @staticmethod
    def forward(ctx, gate_up: Tensor, scale_N: Tensor | None) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        silu = F.silu(gate)
        act = silu * up
        if scale_N is None:
            ctx.save_for_backward(gate_up, silu, None, None)
            return act
        ctx.save_for_backward(gate_up, silu, scale_N, act if ctx.needs_input_grad[1] else None)
        scale = scale_N.unsqueeze(-1)
        if _wide(act) is act:
            return act * scale.to(act.dtype)
        return (act.float() * scale).to(act.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        gate_up, silu, scale_N, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        H = gate.shape[-1]
        grad_scale = None
        if scale_N is not None:
            if act is not None:
                grad_scale = torch.linalg.vecdot(_wide(act), _wide(g)).to(scale_N.dtype)
            g = (_wide(g) * scale_N.unsqueeze(-1)).to(gate_up.dtype)
        grad = torch.empty_like(gate_up)
        torch.mul(g, silu, out=grad[..., H:])
        torch.ops.aten.silu_backward.grad_input(g * up, gate, grad_input=grad[..., :H])
        return grad, grad_scale


def swiglu(gate_up: Tensor, scale_N: Tensor | None = None) -> Tensor:
    """SwiGLU on a fused [N, 2H] projection: silu(gate) · up, times scale [N] if given."""
    return _SwiGLU.apply(gate_up, scale_N)


class Experts(nn.Module):
    """E SwiGLU experts of width H with stacked weights, applied to rows sorted by expert.

    w_gate_up_EDH: [E, D, 2H] (gate and up fused into one grouped matmul), w_down_EHD: [E, H, D].
    `forward(x_SD, counts_E)`: rows of expert e are the e-th contiguous chunk of x (counts_E[e]
    rows, possibly zero). Returns [S, D] in the same row order.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ConfigError(f"model.ffn.dispatch='{backend}' is not one of {', '.join(BACKENDS)}")
        if backend == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
            raise ConfigError(
                "model.ffn.dispatch='grouped_mm' needs torch._grouped_mm (torch "
                f"{torch.__version__} lacks it); use model.ffn.dispatch=auto"
            )
        if backend == "native":
            native.require()
        self.num_experts, self.dim, self.hidden, self.backend = num_experts, dim, hidden, backend
        self.w_gate_up_EDH = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w_down_EHD = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_gate_up_EDH, std=std)
        nn.init.normal_(self.w_down_EHD, std=out_std)

    def _weights(self, x_SD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Cast to the autocast dtype by hand: autocast does not cover grouped matmul."""
        w1, w2 = self.w_gate_up_EDH, self.w_down_EHD
        if torch.is_autocast_enabled(x_SD.device.type):
            dtype = torch.get_autocast_dtype(x_SD.device.type)
            return x_SD.to(dtype), w1.to(dtype), w2.to(dtype)
        return x_SD, w1, w2

    def use_native(self, x: Tensor, w1: Tensor, w2: Tensor) -> bool:
        """The C++ kernel (see `native.chosen`), on the operands as `_weights` returns them."""
        return native.chosen(self.backend, x, w1, w2)

    def native_weights(self, x_TD: Tensor) -> tuple[Tensor, Tensor] | None:
        """The weights (autocast dtype) when these tokens run on the C++ kernel, else None.
        The kernel casts x's rows itself as it copies them, so x keeps its dtype."""
        x, w1, w2 = self._weights(x_TD[:0])
        return (w1, w2) if self.use_native(x, w1, w2) else None

    def use_grouped_mm(self, x_SD: Tensor) -> bool:
        if self.backend == "split":
            return False
        x, w1, w2 = self._weights(x_SD)
        ok = grouped_mm_supported(x, w1, w2)
        if self.backend == "grouped_mm" and not ok:
            raise ConfigError(
                f"model.ffn.dispatch='grouped_mm' cannot run {x.dtype} on {x.device} with dim="
                f"{self.dim}, expert width={self.hidden} (needs 16-byte aligned widths); "
                "use model.ffn.dispatch=auto"
            )
        return ok

    def path(self, x_SD: Tensor) -> str:
        """The expert path `forward` takes for these rows: native, grouped_mm or split."""
        if self.use_native(*self._weights(x_SD)):
            return "native"
        return "grouped_mm" if self.use_grouped_mm(x_SD) else "split"

    def forward(self, x_SD: Tensor, counts_E: Tensor, scale_S: Tensor | None = None) -> Tensor:
        """[S, D] rows sorted by expert -> [S, D]; `scale_S` (fp32 gates) multiplies each row's
        SwiGLU activation before the down projection (the same as scaling the output)."""
        x, w1, w2 = self._weights(x_SD)
        if self.use_native(x, w1, w2):
            return native.experts(x, w1, w2, counts_E, scale_S)
        if self.use_grouped_mm(x_SD):
            offsets = counts_E.cumsum(0).to(torch.int32)
            h = swiglu(grouped_matmul(x, w1, offsets), scale_S)
            return grouped_matmul(h, w2, offsets)
        counts = counts_E.tolist()  # the fallback needs chunk sizes on the host
        h = swiglu(split_matmul(x, w1, counts), scale_S)
        return split_matmul(h, w2, counts)

    def padded_capacity(self, x_TD: Tensor, routing: Routing) -> int | None:
        """Slots per expert for the padded batched-matmul path, or None to use `forward`.

        CPU only: it reads the largest expert count on the host, which is free there (no device
        to wait for), and lets every expert run in one `bmm` per product. See PAD_MAX_WASTE for
        when `auto` takes it.
        """
        if self.backend not in ("auto", "padded") or x_TD.device.type != "cpu":
            return None
        if self.backend == "auto" and native.available():  # forward takes the kernel
            return None
        rows, E = routing.order_S.numel(), self.num_experts
        if rows == 0:
            return None
        auto = self.backend == "auto"
        if auto and torch.get_num_threads() == 1:
            return None
        if auto and rows < PAD_MIN_ROWS * E:
            return None
        macs = rows * self.dim * 2 * self.hidden / E
        if auto and macs > PAD_MAX_EXPERT_MACS and not _openmp_busy_waits():
            return None
        capacity = int(routing.counts_E.max())
        if auto and E * capacity > PAD_MAX_WASTE * rows:
            return None
        return capacity

    def forward_padded(self, x_PD: Tensor, scale_P: Tensor | None) -> Tensor:
        """[E·C, D] rows in E blocks of C slots -> [E·C, D]; `scale_P` fp32, 0 at padding (None:
        unscaled, padding rows then hold finite values the caller must drop)."""
        x, w1, w2 = self._weights(x_PD)
        E, P = self.num_experts, x.shape[0]
        gate_up = torch.bmm(x.view(E, P // E, -1), w1).view(P, -1)
        h = swiglu(gate_up, scale_P)
        return torch.bmm(h.view(E, P // E, -1), w2).view(P, -1)


@torch.compiler.disable
def dispatch(x_TD: Tensor, expert_TK: Tensor, gate_TK: Tensor | None, experts: nn.Module) -> Tensor:
    """y_t = Σ_j gate[t, j] · expert[expert[t, j]](x_t), dropless and deterministic. [T, D].

    `experts` is any module with `num_experts` and `forward(x_SD, counts_E, scale_S)`. Gates
    (None: all 1) are applied in fp32, either to the experts' activations (`scale_S`) or to
    their outputs in the combine, whichever is cheaper (`gates_in_combine`; the two are equal
    since the down projection is linear); the sum over k is in fp32 in a fixed order.

    Under `torch.compile` it runs eagerly: its buffer sizes depend on the routing, and
    `torch._grouped_mm` has no fp32 kernel for the compiler to trace.
    """
    weights = experts.native_weights(x_TD) if isinstance(experts, Experts) else None
    routing = sort_by_expert(expert_TK, experts.num_experts, counting=weights is not None)
    if weights is not None:
        return _dispatch_native(x_TD, gate_TK, experts, weights, routing)
    capacity = None
    if isinstance(experts, Experts):
        capacity = experts.padded_capacity(x_TD, routing)
    if capacity is not None:
        return _dispatch_padded(x_TD, gate_TK, experts, pad_routing(routing, capacity))
    x_SD = permute(x_TD, routing)
    if gate_TK is None:
        return unpermute_sum(experts(x_SD, routing.counts_E), routing).to(x_TD.dtype)
    gate_F = _wide(gate_TK).reshape(-1)
    if gates_in_combine(experts):
        gate_S = gate_F.detach().index_select(0, routing.order_S)
        y_SD = experts(x_SD, routing.counts_E, None)
        return _GatedSum.apply(y_SD, gate_F, gate_S, _sorted_rows(routing)).to(x_TD.dtype)
    y_SD = experts(x_SD, routing.counts_E, gate_F.index_select(0, routing.order_S))
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
    rows = _sorted_rows(routing)
    if gate_TK is not None and gates_in_combine(experts, native=True):
        gate_F = _wide(gate_TK).reshape(-1)
        gate_S = gate_F.detach().index_select(0, routing.order_S)
        y_SD = _NativeTokens.apply(x_TD, w1, w2, routing.counts_E, None, rows, False)
        return _GatedSum.apply(y_SD, gate_F, gate_S, rows).to(x_TD.dtype)
    scale_S = None
    if gate_TK is not None:
        scale_S = _wide(gate_TK).reshape(-1).index_select(0, routing.order_S)
    y_TD = _NativeTokens.apply(x_TD, w1, w2, routing.counts_E, scale_S, rows, True)
    return y_TD.to(x_TD.dtype)


def _dispatch_padded(
    x_TD: Tensor, gate_TK: Tensor | None, experts: Experts, padded: PaddedRouting
) -> Tensor:
    """`dispatch` through [E, C] slots: the same rows, summed in fp32 in the same order."""
    T = x_TD.shape[0]
    rows = _Rows(padded.gather_P, padded.slot_F, T, padded.k)
    x_PD = _Permute.apply(x_TD, rows)
    combine = gate_TK is not None and gates_in_combine(experts)
    if gate_TK is None:  # every gate 1
        gate_F = x_TD.new_ones(padded.slot_F.numel(), dtype=torch.float32)
    else:
        gate_F = _wide(gate_TK).reshape(-1)
    gate = gate_F.detach() if combine else gate_F
    scale_P = torch.cat([gate, gate.new_zeros(1)]).index_select(0, padded.flat_P)  # 0: padding
    if combine:  # padding rows are left unscaled; the combine never reads them
        y_PD = experts.forward_padded(x_PD, None)
        return _GatedSum.apply(y_PD, gate_F, scale_P, rows).to(x_TD.dtype)
    y_PD = experts.forward_padded(x_PD, scale_P)
    return _UnpermuteSum.apply(y_PD, rows).to(x_TD.dtype)
