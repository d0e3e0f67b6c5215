"""FlexAttention path for the packed multimodal mask (CUDA; optional, guarded).

The same mask as `transformer.attention_mask`, expressed as a `mask_mod` so FlexAttention can
skip fully masked blocks instead of materialising an [L, L] boolean mask per row. Used when
`model.attention` is `flex`, or `auto` on CUDA. The eager (uncompiled) FlexAttention also runs
on CPU, which the tests use to check it equals the SDPA path.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - old torch
    BlockMask = create_block_mask = flex_attention = None


def flex_available() -> bool:
    return flex_attention is not None


def block_mask(doc_id_BL: Tensor, image_id_BL: Tensor) -> BlockMask:
    """Causal, bidirectional inside an image block, nothing across documents."""

    def mask_mod(b, h, q, kv):
        same_doc = doc_id_BL[b, q] == doc_id_BL[b, kv]
        same_image = (image_id_BL[b, q] == image_id_BL[b, kv]) & (image_id_BL[b, q] >= 0)
        return same_doc & ((kv <= q) | same_image)

    B, L = doc_id_BL.shape
    return create_block_mask(mask_mod, B, None, L, L, device=doc_id_BL.device)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask) -> Tensor:
    """Attention with a block mask: [B, H, L, d] -> [B, H, L, d]; compiled on CUDA."""
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=mask)
