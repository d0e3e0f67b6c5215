"""Feed-forward layers: dense SwiGLU and one SwiGLU per modality (design.md §4).

Every FFN takes the flattened residual stream `x_TD` and the per-token metadata, and returns
`(y_TD, aux)` where `aux` is a 0-d auxiliary loss or None; the MoE layer in `moe.py` has the
same signature, so blocks do not care which kind they hold.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from moesaic.batch import Modality
from moesaic.model.dispatch import dispatch
from moesaic.model.experts import Experts, swiglu

NUM_MODALITIES = len(Modality)  # rows of the per-modality routing statistics


@dataclasses.dataclass
class TokenMeta:
    """Per-token facts the FFNs need, flattened over [B, L] to T = B·L tokens.

    modality_T: int64 `Modality` ids; doc_kind_T: int64 `DocKind` ids; t_T: f32 flow time;
    valid_T: bool, False at padding (excluded from balancing losses and routing statistics).
    """

    modality_T: Tensor
    doc_kind_T: Tensor
    t_T: Tensor
    valid_T: Tensor


class DenseFFN(nn.Module):
    """SwiGLU: w_down(silu(x W_gate) · x W_up), gate and up fused into one [D, 2F] matmul."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_gate_up.weight, std=std)
        nn.init.normal_(self.w_down.weight, std=out_std)

    def forward(self, x_TD: Tensor, meta: TokenMeta | None = None) -> tuple[Tensor, None]:
        return self.w_down(swiglu(self.w_gate_up(x_TD))), None


def modality_slot(modality_T: Tensor, slots: int) -> Tensor:
    """Which modality's FFN weights a token uses: text 0, image 1, video 2 with three slots
    (`video_ffn: own`), or 1 — the image's — with two (`video_ffn: image`)."""
    return modality_T.clamp(0, slots - 1)


class ModalityFFN(nn.Module):
    """One SwiGLU of width F per modality slot; a token runs only its own slot's FFN.

    Slots: text and image, plus video when it has its own FFN (`model.ffn.video_ffn: own`;
    otherwise video frames use the image FFN). The FFNs are stacked as "experts" with a fixed
    routing (expert = slot, gate 1), so tokens are permuted once and all FFNs run as one
    grouped matmul: each token costs exactly one FFN, with no masked dense compute of the
    others.
    """

    def __init__(self, dim: int, hidden: int, backend: str = "auto", slots: int = 2):
        super().__init__()
        self.slots = slots
        self.experts = Experts(slots, dim, hidden, backend)

    def reset_parameters(self, std: float, out_std: float) -> None:
        self.experts.reset_parameters(std, out_std)

    def forward(self, x_TD: Tensor, meta: TokenMeta) -> tuple[Tensor, None]:
        expert_T1 = modality_slot(meta.modality_T, self.slots).unsqueeze(1)
        return dispatch(x_TD, expert_T1, None, self.experts), None
