"""Expert parallelism: each MoE layer's experts sharded over P ranks, rows exchanged all-to-all.

The model computes experts behind one function boundary, `moe.experts(x_SD, counts_E,
scale_S)`: rows already sorted by (global) expert, the number of rows per expert and each
row's gate (`model/experts.py`).
`apply_expert_parallel` swaps that module for `ExpertParallelExperts`, which keeps E/P experts
per rank and, per call,

1. exchanges `counts_E` all-to-all, so every rank learns how many rows each peer sends to
   each of its local experts (`recv_PL`, P peers × L = E/P local experts);
2. reads the split sizes on the host (the one synchronisation of the layer);
3. sends every row, and its gate, to the rank owning its expert (all-to-all, variable splits);
4. regroups the received rows by local expert (stable, so within an expert rows keep peer
   order), runs the local experts through `Experts.compute` (the C++ kernel on CPU, one
   grouped matmul on GPU), and restores the received order;
5. sends the outputs back with the reverse all-to-all; autograd runs the same exchanges in
   reverse for the backward pass.

Every rank takes part in every exchange even when it sends or receives no rows (zero-length
splits), and a rank whose experts receive nothing still produces (zero) gradients for its
expert weights, so collectives never mismatch and FSDP's gradient reductions stay aligned.

The expert weights become DTensors sharded along the expert dimension on the `ep` mesh: their
state-dict names and global shapes are those of the single-process model, so checkpoints
written with any expert-parallel size load with any other (and in one process).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moesaic.errors import ConfigError
from moesaic.model.experts import Experts


class _AllToAll(torch.autograd.Function):
    """Rows of `x` split by `send` go to the ranks of `group`; `recv` rows arrive from each."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        grad = g.new_empty((sum(ctx.send), *g.shape[1:]))
        dist.all_to_all_single(grad, g.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return grad, None, None, None


def all_to_all(x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
    """Differentiable variable-split all-to-all over the first dimension of `x`."""
    return _AllToAll.apply(x, send, recv, group)


def _local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class ExpertParallelExperts(Experts):
    """`Experts` with E/P experts per rank; same parameter names, global shapes.

    w_gate_up_EDH: DTensor [E, D, 2H] sharded Shard(0) over `ep_mesh` (local [E/P, D, 2H]);
    w_down_EHD: DTensor [E, H, D] likewise. `forward(x_SD, counts_E, scale_S) -> y_SD` as
    `Experts`; the local experts run through `Experts.compute`, as on one process.
    """

    def __init__(self, experts: Experts, ep_mesh):
        nn.Module.__init__(self)
        from torch.distributed.tensor import Shard, distribute_tensor

        P, E = ep_mesh.size(), experts.num_experts
        if E % P:
            raise ConfigError(
                f"model.ffn.experts={E} is not divisible by dist.expert_parallel={P}; "
                "pick an expert-parallel size that divides the number of experts"
            )
        self.num_experts, self.dim, self.hidden = E, experts.dim, experts.hidden
        self.backend, self.num_local, self.ep_size = experts.backend, E // P, P
        self.ep_mesh = ep_mesh
        self.group = ep_mesh.get_group()
        for name in ("w_gate_up_EDH", "w_down_EHD"):
            full = getattr(experts, name)
            shard = distribute_tensor(full.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(self, name, nn.Parameter(shard, requires_grad=full.requires_grad))

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(_local(self.w_gate_up_EDH), std=std)
        nn.init.normal_(_local(self.w_down_EHD), std=out_std)

    def weights(self) -> tuple[Tensor, Tensor]:
        return _local(self.w_gate_up_EDH), _local(self.w_down_EHD)

    def native_weights(self, x_TD: Tensor) -> None:
        """Rows are exchanged before the local experts see them: no token-order kernel path."""
        return None

    def forward(self, x_SD: Tensor, counts_E: Tensor, scale_S: Tensor | None = None) -> Tensor:
        P, L = self.ep_size, self.num_local
        counts_E = counts_E.to(torch.int64)
        recv_E = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_E, counts_E, group=self.group)  # E/P counts per peer
        recv_PL = recv_E.view(P, L)
        splits = torch.stack([counts_E.view(P, L).sum(1), recv_PL.sum(1)]).tolist()
        send, recv = splits
        x_RD = all_to_all(x_SD, send, recv, self.group)  # rows ordered (peer, local expert)
        scale_R = None if scale_S is None else all_to_all(scale_S, send, recv, self.group)
        n = x_RD.shape[0]
        expert_R = torch.arange(L, device=x_SD.device).repeat(P)
        expert_R = expert_R.repeat_interleave(recv_PL.reshape(-1), output_size=n)
        order_R = torch.argsort(expert_R, stable=True)
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(n, device=order_R.device)
        if scale_R is not None:
            scale_R = scale_R.index_select(0, order_R)
        x_RD = x_RD.index_select(0, order_R)
        y_RD = self.compute(x_RD, *self.weights(), recv_PL.sum(0), scale_R)
        y_RD = y_RD.index_select(0, inverse_R)
        return all_to_all(y_RD, recv, send, self.group)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, local={self.num_local}, ep={self.ep_size}"


def apply_expert_parallel(model: nn.Module, ep_mesh) -> int:
    """Swap every MoE layer's experts for an expert-parallel shard; returns the layer count."""
    from moesaic.model.moe import moe_layers

    layers = moe_layers(model)
    if not layers:
        raise ConfigError(
            f"dist.expert_parallel={ep_mesh.size()} needs MoE layers but model.ffn.kind is not "
            "moe; use dist.expert_parallel=1"
        )
    for moe in layers:
        moe.experts = ExpertParallelExperts(moe.experts, ep_mesh)
    return len(layers)
