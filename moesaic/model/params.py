"""Parameter and FLOP accounting for every FFN variant.

* Total parameters: every parameter once (tied embeddings counted once).
* Active parameters: those one token uses in one forward pass. Everything is active except the
  experts a token does not run: of a MoE layer's E routed experts only its k routed ones, of a
  per-modality FFN (or per-modality shared expert) only its own modality's — one of two, or of
  three with a video FFN of its own (`video_ffn: own`). Embeddings, heads,
  routers and norms count as active.
* FLOPs per token (training, forward + backward): `6·N_matmul + 12·layers·dim·seq_len`.
  N_matmul = active parameters that take part in a matmul: the token-embedding lookup and the
  norm weights are excluded (Kaplan et al. also exclude embeddings), the text head is included
  (with tied embeddings the shared matrix is counted once, as the head). The attention term is
  QKᵀ and AV over the full `seq_len` context without the causal/document discount (as in PaLM's
  MFU formula), so it is an upper bound for packed, masked sequences.
"""

from __future__ import annotations

from torch import nn

from moesaic.model.ffn import ModalityFFN
from moesaic.model.moe import MoE
from moesaic.model.norm import RMSNorm


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def inactive_params(model: nn.Module) -> int:
    """Parameters of experts/FFNs a token does not run."""
    n = 0
    for m in model.modules():
        if isinstance(m, ModalityFFN):
            n += _numel(m.experts) * (m.slots - 1) // m.slots
        elif isinstance(m, MoE):
            n += _numel(m.experts) * (m.num_experts - m.top_k) // m.num_experts
    return n


def count_params(model: nn.Module, active: bool = True) -> int:
    total = sum(p.numel() for p in model.parameters())
    return total - inactive_params(model) if active else total


def norm_params(model: nn.Module) -> int:
    return sum(_numel(m) for m in model.modules() if isinstance(m, RMSNorm))


def param_breakdown(model: nn.Module) -> dict[str, int]:
    """Active parameters per token by part, plus total FFN parameters (`ffn_total`).

    `ffn_active` counts expert / FFN weights a token runs (routed + shared); routers are
    listed separately, so dense, modality and matched MoE layers have equal `ffn_active`.
    """
    ffn_active = ffn_total = router = 0
    for block in model.blocks:
        ffn = block.ffn
        if isinstance(ffn, MoE):
            router += ffn.router.weight.numel()
            ffn_total += _numel(ffn) - ffn.router.weight.numel()
        else:
            ffn_total += _numel(ffn)
    ffn_active = ffn_total - inactive_params(model)
    attention = sum(_numel(b.attn) for b in model.blocks)
    return {
        "embedding": model.tok_embed.weight.numel(),
        "image_in": _numel(model.image_in) + (_numel(model.patch_pos) if model.patch_pos else 0),
        "attention": attention,
        "ffn_active": ffn_active,
        "ffn_total": ffn_total,
        "router": router,
        "heads": _numel(model.image_head)
        + (0 if model.cfg.tie_embeddings else model.text_head.weight.numel()),
        "norms": norm_params(model),
    }


def matmul_params(model: nn.Module) -> int:
    """Active parameters used in a matmul for every token (see the module docstring)."""
    n = count_params(model, active=True) - norm_params(model)
    if not model.cfg.tie_embeddings:
        n -= model.tok_embed.weight.numel()
    return n


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    cfg = model.cfg
    return 6.0 * matmul_params(model) + 12.0 * cfg.layers * cfg.dim * seq_len
