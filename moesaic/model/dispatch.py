"""Dropless token dispatch for mixtures of experts: permute, grouped matmul, combine.

Every token picks `k` experts. The `T·k` (token, expert) assignments are sorted by expert with
a stable argsort, so each expert's rows are contiguous in a `[S, D]` buffer (`S = T·k`), and
the rows of one expert keep token order. All experts then run as one grouped matmul over those
contiguous groups (`torch._grouped_mm`), or as a loop over `torch.split` chunks where grouped
matmul is unavailable. Gates scale each row in fp32, and the k rows of each token are summed
back in fp32 in a fixed order with no atomics, so the result is deterministic on every device.

The expert computation sits behind one function boundary, `Experts.forward(x_SD, counts_E,
scale_S)`, which takes rows already sorted by expert, the number of rows per expert and the
rows' gates. Expert parallelism can wrap or replace that module (exchange rows all-to-all,
run the local experts, exchange back) without touching the router or the model.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.errors import ConfigError

BACKENDS = ("auto", "grouped_mm", "split")


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


def sort_by_expert(expert_TK: Tensor, num_experts: int) -> Routing:
    """Stable sort of the flattened assignments by expert id; no host synchronisation."""
    T, k = expert_TK.shape
    flat = expert_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    return Routing(order, order // k, inverse, counts, T, k)


def _wide(t: Tensor) -> Tensor:
    """At least fp32 (half precisions are widened, fp32/fp64 kept)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _sum_slots(y_SD: Tensor, token_S: Tensor, inverse_S: Tensor, k: int) -> Tensor:
    """Σ over each token's k rows of y, in fp32: [S, D] -> [T, D].

    On CPU a scatter-add in sorted-row order (index_add_ runs serially there, so the order of
    the k additions is fixed, and it streams through y instead of gathering it at random);
    elsewhere a gather to [T, k, D] and a sum, which needs no atomics.
    """
    T = inverse_S.numel() // k
    y_SD = _wide(y_SD)
    if y_SD.device.type == "cpu":
        return y_SD.new_zeros(T, y_SD.shape[-1]).index_add_(0, token_S, y_SD)
    return y_SD.index_select(0, inverse_S).view(T, k, -1).sum(1)


class _Permute(torch.autograd.Function):
    """x_SD = x_TD[token_S]; backward sums the k rows of each token (`_sum_slots`)."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, token_S: Tensor, inverse_S: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(token_S, inverse_S)
        ctx.k = k
        return x_TD.index_select(0, token_S)

    @staticmethod
    def backward(ctx, g_SD: Tensor):
        token_S, inverse_S = ctx.saved_tensors
        return _sum_slots(g_SD, token_S, inverse_S, ctx.k).to(g_SD.dtype), None, None, None


class _UnpermuteSum(torch.autograd.Function):
    """y_TD = Σ over each token's k rows of y_SD (fp32): the adjoint of `_Permute`."""

    @staticmethod
    def forward(ctx, y_SD: Tensor, token_S: Tensor, inverse_S: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(token_S)
        ctx.dtype = y_SD.dtype
        return _sum_slots(y_SD, token_S, inverse_S, k)

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        (token_S,) = ctx.saved_tensors
        return g_TD.index_select(0, token_S).to(ctx.dtype), None, None, None


def permute(x_TD: Tensor, routing: Routing) -> Tensor:
    """Rows of x gathered in expert order: [T, D] -> [S, D]."""
    return _Permute.apply(x_TD, routing.token_S, routing.inverse_S, routing.k)


def unpermute_sum(y_SD: Tensor, routing: Routing) -> Tensor:
    """Sorted expert outputs back to token order, summed over each token's k slots: [T, D] f32."""
    return _UnpermuteSum.apply(y_SD, routing.token_S, routing.inverse_S, routing.k)


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

    Saves only the inputs (not silu(gate)), and the backward writes both halves of one buffer
    instead of concatenating them as autograd would for `chunk` (the largest elementwise cost
    of a SwiGLU layer on CPU).
    """

    @staticmethod
    def forward(ctx, gate_up: Tensor, scale_N: Tensor | None) -> Tensor:
        ctx.save_for_backward(gate_up, scale_N)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        if scale_N is None:
            return act
        if _wide(act) is act:
            return act.mul_(scale_N.unsqueeze(-1).to(act.dtype))
        return (act.float() * scale_N.unsqueeze(-1)).to(act.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        gate_up, scale_N = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        H = gate.shape[-1]
        silu = F.silu(gate)
        grad_scale = None
        if scale_N is not None:
            if ctx.needs_input_grad[1]:
                act = _wide(silu * up)
                grad_scale = torch.bmm(act.unsqueeze(1), _wide(g).unsqueeze(2)).view(-1)
                grad_scale = grad_scale.to(scale_N.dtype)
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

    def forward(self, x_SD: Tensor, counts_E: Tensor, scale_S: Tensor | None = None) -> Tensor:
        """[S, D] rows sorted by expert -> [S, D]; `scale_S` (fp32 gates) multiplies each row's
        SwiGLU activation before the down projection (the same as scaling the output)."""
        grouped = self.use_grouped_mm(x_SD)
        x, w1, w2 = self._weights(x_SD)
        if grouped:
            offsets = counts_E.cumsum(0).to(torch.int32)
            h = swiglu(grouped_matmul(x, w1, offsets), scale_S)
            return grouped_matmul(h, w2, offsets)
        counts = counts_E.tolist()  # the fallback needs chunk sizes on the host
        h = swiglu(split_matmul(x, w1, counts), scale_S)
        return split_matmul(h, w2, counts)


def dispatch(x_TD: Tensor, expert_TK: Tensor, gate_TK: Tensor | None, experts: nn.Module) -> Tensor:
    """y_t = Σ_j gate[t, j] · expert[expert[t, j]](x_t), dropless and deterministic. [T, D].

    `experts` is any module with `num_experts` and `forward(x_SD, counts_E, scale_S)`. Gates
    (None: all 1) are applied in fp32 to the experts' activations, which equals scaling their
    outputs since the down projection is linear; the sum over k is in fp32 in a fixed order.
    """
    routing = sort_by_expert(expert_TK, experts.num_experts)
    gate_S = None
    if gate_TK is not None:
        gate_S = gate_TK.float().reshape(-1).index_select(0, routing.order_S)
    y_SD = experts(permute(x_TD, routing), routing.counts_E, gate_S)
    return unpermute_sum(y_SD, routing).to(x_TD.dtype)
