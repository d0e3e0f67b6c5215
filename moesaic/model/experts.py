"""E SwiGLU experts with stacked weights, run over rows already sorted by expert.

`Experts.forward(x_SD, counts_E, scale_S)` is the one function boundary of the expert
computation: rows of expert e are the e-th contiguous chunk of x (counts_E[e] rows, possibly
zero), and `scale_S` (fp32 gates, or None) multiplies each row's SwiGLU activation before the
down projection. Three backends compute it and give the same numbers (tested):

- `native` (CPU): moesaic's C++ kernel (`native.py`, `csrc/experts.cpp`), one whole expert per
  thread; it can also read each expert's rows straight from token order (`rows`), which
  `dispatch.py` uses to skip the gathered [S, D] copy;
- `grouped_mm`: one `torch._grouped_mm` per product (CPU fp32/bf16, CUDA bf16; 16-byte
  aligned widths);
- `split`: a loop of ordinary matmuls over `torch.split` chunks (needs the counts on the host).

`auto` takes native on CPU when the kernel builds, else grouped_mm where supported, else split.
Expert parallelism subclasses `Experts` and runs its local experts through `Experts.compute`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.errors import ConfigError
from moesaic.model import native
from moesaic.model.rows import Rows, sum_rows, wide

BACKENDS = ("auto", "native", "grouped_mm", "split")


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
        if wide(act) is act:
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
                grad_scale = torch.linalg.vecdot(wide(act), wide(g)).to(scale_N.dtype)
            g = (wide(g) * scale_N.unsqueeze(-1)).to(gate_up.dtype)
        grad = torch.empty_like(gate_up)
        torch.mul(g, silu, out=grad[..., H:])
        torch.ops.aten.silu_backward.grad_input(g * up, gate, grad_input=grad[..., :H])
        return grad, grad_scale


def swiglu(gate_up: Tensor, scale_N: Tensor | None = None) -> Tensor:
    """SwiGLU on a fused [N, 2H] projection: silu(gate) · up, times scale [N] if given."""
    return _SwiGLU.apply(gate_up, scale_N)


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


class _NativeExperts(torch.autograd.Function):
    """The experts on the CPU kernel, [·, D] -> [S, D] (or [T, D] when `summed`).

    `rows` None: x is sorted [S, D]. Otherwise x is in token order [T, D] and the kernel copies
    each expert's rows (`rows.gather_S`) into a buffer that stays in cache; the backward sums
    each token's rows of dx. `summed` (with rows): returns each token's rows summed in fp32, so
    the backward copies the gradient's rows per expert inside the kernel too instead of
    gathering them to [S, D].
    """

    @staticmethod
    def forward(ctx, x, w1_EDH, w2_EHD, counts_E, scale_S, rows: Rows | None, summed: bool):
        gather = None if rows is None else rows.gather_S
        y_SD, gate_up = native.load().experts_forward(x, w1_EDH, w2_EHD, counts_E, scale_S, gather)
        ctx.rows, ctx.summed = rows, summed
        ctx.save_for_backward(x, w1_EDH, w2_EHD, counts_E, scale_S, gate_up)
        return sum_rows(y_SD, rows) if summed else y_SD

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w1, w2, counts_E, scale_S, gate_up = ctx.saved_tensors
        rows = ctx.rows
        token_S = None if rows is None else rows.gather_S
        dy_rows = token_S if ctx.summed else None  # g is [T, D], or already [S, D]
        dx, dw1, dw2, dscale = native.load().experts_backward(
            g.contiguous(), x, w1, w2, counts_E, scale_S, gate_up, token_S, dy_rows
        )
        if rows is not None:
            dx = sum_rows(dx, rows).to(x.dtype)
        dscale = dscale if ctx.needs_input_grad[4] else None
        return dx, dw1, dw2, None, dscale, None, None


def native_experts(
    x: Tensor,
    w1_EDH: Tensor,
    w2_EHD: Tensor,
    counts_E: Tensor,
    scale_S: Tensor | None,
    rows: Rows | None = None,
    summed: bool = False,
) -> Tensor:
    """SwiGLU experts on the CPU kernel (see `_NativeExperts`). w1 [E, D, 2H] (gate | up),
    w2 [E, H, D], counts_E rows per expert, scale_S (fp32 or wider, or None)."""
    counts = counts_E.to(device="cpu", dtype=torch.int64)
    return _NativeExperts.apply(x, w1_EDH, w2_EHD, counts, scale_S, rows, summed)


class Experts(nn.Module):
    """E SwiGLU experts of width H with stacked weights, applied to rows sorted by expert.

    w_gate_up_EDH: [E, D, 2H] (gate and up fused into one grouped matmul), w_down_EHD: [E, H, D].
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

    @staticmethod
    def cast(x: Tensor, *weights: Tensor) -> tuple[Tensor, ...]:
        """Operands in the autocast dtype, cast by hand: autocast does not cover grouped
        matmul or the kernel."""
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            return tuple(t.to(dtype) for t in (x, *weights))
        return (x, *weights)

    def weights(self) -> tuple[Tensor, Tensor]:
        """The weights as this module computes with them (local shards under expert
        parallelism)."""
        return self.w_gate_up_EDH, self.w_down_EHD

    def native_weights(self, x_TD: Tensor) -> tuple[Tensor, Tensor] | None:
        """The weights (autocast dtype) when these tokens run on the C++ kernel, else None.
        The kernel casts x's rows itself as it copies them, so x keeps its dtype."""
        x, w1, w2 = self.cast(x_TD[:0], *self.weights())
        return (w1, w2) if native.chosen(self.backend, x, w1, w2) else None

    def path(self, x_SD: Tensor) -> str:
        """The backend `forward` takes for these rows: native, grouped_mm or split."""
        return self._path(*self.cast(x_SD, *self.weights()))

    def _path(self, x: Tensor, w1: Tensor, w2: Tensor) -> str:
        if native.chosen(self.backend, x, w1, w2):
            return "native"
        if self.backend == "split" or x.shape[0] == 0:
            return "split"
        ok = grouped_mm_supported(x, w1, w2)
        if self.backend == "grouped_mm" and not ok:
            raise ConfigError(
                f"model.ffn.dispatch='grouped_mm' cannot run {x.dtype} on {x.device} with dim="
                f"{self.dim}, expert width={self.hidden} (needs 16-byte aligned widths); "
                "use model.ffn.dispatch=auto"
            )
        return "grouped_mm" if ok else "split"

    def compute(
        self, x_SD: Tensor, w1_EDH: Tensor, w2_EHD: Tensor, counts_E: Tensor, scale_S: Tensor | None
    ) -> Tensor:
        """The experts with the given weights over rows sorted by expert: [S, D] -> [S, D]."""
        x, w1, w2 = self.cast(x_SD, w1_EDH, w2_EHD)
        path = self._path(x, w1, w2)
        if path == "native":
            return native_experts(x, w1, w2, counts_E, scale_S)
        if path == "grouped_mm":
            offsets = counts_E.cumsum(0).to(torch.int32)
            h = swiglu(grouped_matmul(x, w1, offsets), scale_S)
            return grouped_matmul(h, w2, offsets)
        counts = counts_E.tolist()  # the fallback needs chunk sizes on the host
        return split_matmul(swiglu(split_matmul(x, w1, counts), scale_S), w2, counts)

    def forward(self, x_SD: Tensor, counts_E: Tensor, scale_S: Tensor | None = None) -> Tensor:
        return self.compute(x_SD, *self.weights(), counts_E, scale_S)
