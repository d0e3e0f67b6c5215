"""Peer MoE layers for `moesaic bench moe`, all built on one moesaic `MoE` layer's weights.

* `SplitLoopMoE`: the classic per-expert loop — for each expert, find its tokens with a boolean
  mask, run the expert on them and `index_add_` the gated output back.
* `OneHotMoE`: the capacity-factor formulation of GShard / Switch / Mesh-TensorFlow — one-hot
  dispatch and combine tensors [G, S, E, C] over groups of tokens and dense einsums; assignments
  past an expert's capacity C = ceil(cf · S · k / E) are dropped, so it is not dropless (its
  output differs from the others once an expert overflows).
* Hugging Face transformers' Qwen3-MoE sparse block (`hf_block`), with whichever expert
  implementations the installed version offers (`eager`, `grouped_mm`).

All take and return [T, D] (the HF block is given [1, T, D]) and use the same router: fp32
softmax over E, top-k, gates renormalised to sum to 1 (moesaic `score: softmax,
renormalize: true, shared: none`; Qwen3-MoE `norm_topk_prob=True`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.model.moe import MoE


def _route(x_TD: Tensor, w_router_ED: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(expert_TK, gate_TK): softmax top-k, renormalised, gates in fp32."""
    probs = F.linear(x_TD.float(), w_router_ED.float()).softmax(-1)
    gate_TK, expert_TK = probs.topk(k, dim=-1)
    return expert_TK, gate_TK / gate_TK.sum(-1, keepdim=True)


class SplitLoopMoE(nn.Module):
    """Per-expert boolean-mask loop (the usual small-codebase MoE)."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.k, self.hidden = moe.top_k, moe.hidden
        self.router = nn.Parameter(moe.router.weight.detach().clone())
        self.w1_EDH = nn.Parameter(moe.experts.w_gate_up_EDH.detach().clone())
        self.w2_EHD = nn.Parameter(moe.experts.w_down_EHD.detach().clone())

    def forward(self, x_TD: Tensor) -> Tensor:
        expert_TK, gate_TK = _route(x_TD, self.router, self.k)
        y_TD = torch.zeros_like(x_TD)
        for e in range(self.w1_EDH.shape[0]):
            token, slot = torch.where(expert_TK == e)
            if token.numel() == 0:
                continue
            gate, up = (x_TD[token] @ self.w1_EDH[e]).chunk(2, dim=-1)
            out = (F.silu(gate) * up) @ self.w2_EHD[e]
            y_TD = y_TD.index_add(0, token, out * gate_TK[token, slot].unsqueeze(-1).to(out.dtype))
        return y_TD


class OneHotMoE(nn.Module):
    """Capacity-factor MoE with one-hot dispatch/combine einsums over token groups."""

    def __init__(self, moe: MoE, capacity_factor: float = 1.25, group_size: int = 2048):
        super().__init__()
        self.k, self.cf, self.group_size = moe.top_k, capacity_factor, group_size
        self.router = nn.Parameter(moe.router.weight.detach().clone())
        self.w1_EDH = nn.Parameter(moe.experts.w_gate_up_EDH.detach().clone())
        self.w2_EHD = nn.Parameter(moe.experts.w_down_EHD.detach().clone())

    def forward(self, x_TD: Tensor) -> Tensor:
        T, D = x_TD.shape
        E = self.w1_EDH.shape[0]
        S = min(self.group_size, T)
        G = math.ceil(T / S)
        x_GSD = F.pad(x_TD, (0, 0, 0, G * S - T)).view(G, S, D)
        expert_TK, gate_TK = _route(x_GSD.view(-1, D), self.router, self.k)
        k, C = self.k, math.ceil(self.cf * S * self.k / E)
        expert_GSK = expert_TK.view(G, S, k)
        # positions in slot-major order, so that first choices claim capacity first
        mask = F.one_hot(expert_GSK.transpose(1, 2).reshape(G, k * S), E)  # [G, k·S, E]
        position = ((mask.cumsum(1) - 1) * mask).sum(-1).view(G, k, S).transpose(1, 2)
        index = torch.where(position < C, expert_GSK * C + position, E * C)  # E·C: dropped
        zeros = x_TD.new_zeros(G, S, E * C + 1)
        gate = gate_TK.view(G, S, k).to(x_TD.dtype)
        combine_GSEC = zeros.scatter(2, index, gate)[..., :-1].view(G, S, E, C)
        dispatch_GSEC = zeros.scatter(2, index, 1.0)[..., :-1].view(G, S, E, C)
        x_GECD = torch.einsum("gsec,gsd->gecd", dispatch_GSEC, x_GSD)
        gate_up = torch.einsum("gecd,edh->gech", x_GECD, self.w1_EDH)
        g, u = gate_up.chunk(2, dim=-1)
        y_GECD = torch.einsum("gech,ehd->gecd", F.silu(g) * u, self.w2_EHD)
        y_GSD = torch.einsum("gsec,gecd->gsd", combine_GSEC, y_GECD)
        return y_GSD.reshape(G * S, D)[:T]

    @staticmethod
    def memory_bytes(T: int, E: int, k: int, elem: int, cf: float = 1.25, group: int = 2048):
        """Bytes of the two one-hot [G, S, E, C] tensors (what limits this formulation)."""
        S = min(group, T)
        return 2 * math.ceil(T / S) * S * E * math.ceil(cf * S * k / E) * elem


def hf_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def hf_implementations() -> list[str]:
    """Expert implementations of the installed transformers usable here (eager always)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return ["eager"]
    return ["eager"] + [n for n in ("grouped_mm",) if n in ALL_EXPERTS_FUNCTIONS]


def hf_block(moe: MoE, implementation: str = "eager") -> nn.Module:
    """Qwen3-MoE sparse block with moesaic's router and expert weights (same numbers)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    E, H, D = moe.num_experts, moe.hidden, moe.dim
    cfg = Qwen3MoeConfig(
        hidden_size=D,
        moe_intermediate_size=H,
        num_experts=E,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=True,
        hidden_act="silu",
    )
    cfg._experts_implementation = implementation
    block = Qwen3MoeSparseMoeBlock(cfg)
    w1, w2 = moe.experts.w_gate_up_EDH.detach(), moe.experts.w_down_EHD.detach()
    with torch.no_grad():
        router = block.gate.weight
        router.copy_(moe.router.weight)
        if hasattr(block.experts, "gate_up_proj"):  # transformers >= 5: stacked [E, 2H, D]
            block.experts.gate_up_proj.copy_(w1.transpose(1, 2))
            block.experts.down_proj.copy_(w2.transpose(1, 2))
        else:  # 4.x: a ModuleList of Qwen3MoeMLP
            for e, mlp in enumerate(block.experts):
                mlp.gate_proj.weight.copy_(w1[e, :, :H].t())
                mlp.up_proj.weight.copy_(w1[e, :, H:].t())
                mlp.down_proj.weight.copy_(w2[e].t())
    return block


class HFBlock(nn.Module):
    """[T, D] -> [T, D] adapter around the [B, L, D] HF block (4.x also returns logits)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x_TD: Tensor) -> Tensor:
        y = self.block(x_TD.unsqueeze(0))
        y = y[0] if isinstance(y, tuple) else y
        return y.squeeze(0)
