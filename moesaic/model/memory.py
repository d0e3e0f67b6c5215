"""Conditional lookup memory: hashed n-gram embeddings gated into the residual stream.

After Engram (arXiv 2601.07372). A block listed in `model.memory.layers` adds, before its
attention, a value retrieved by O(1) table lookups from the token ids alone:

    for each text position t, order n in `orders` (default 2, 3), hash head h < `heads`:
        j       = table of (n, h)                                           J = orders · heads
        e_j(t)  = T[offset_j + hash_j(w_{t-n+1} … w_t) mod p_j]              one row, width r
    e(t) = concat_j e_j(t)                                                   [J·r]
    k, v = W_k e(t), W_v e(t)                                                [D] each
    a(t) = sigmoid(ssqrt(RMSNorm(x_t) · RMSNorm(k) / √D))     ssqrt(z) = sign(z)·√|z|
    u(t) = a(t) · v
    y(t) = u(t) + SiLU(conv(RMSNorm(u))(t))    depthwise, kernel K, causal inside the document
    x_t  ← x_t + y(t)

* Hashes are multiplicative-XOR: hash_j(w_0 … w_{n-1}) = XOR_i (w_i · a_{j,i}), with odd
  multipliers a < 2³¹ drawn per layer, table and position from a fixed seed (so a checkpoint
  never needs them), and token ids < 2³¹, so products never overflow int64. Each table's
  modulus p_j is a distinct prime (`MemoryConfig.table_moduli`): two heads rarely collide on
  the same pair of n-grams, and the moduli share no factor with the structure of the ids.
* Row 0 of the table is the zero "no n-gram" row, never trained (`padding_idx`): it stands in
  where an n-gram would start before the sequence, cross a document boundary or contain a
  position that is not text (an image patch, padding).
* Only text positions of real documents take memory; image (and future video) positions and
  padding get y = 0. Token ids are hashed as they are: no canonical (lower-cased) id map, since
  the model sees ids, not the tokenizer.
* Why its own residual add at the start of the block: the retrieved n-gram knowledge is
  already there for the same block's attention and FFN (as in Engram), and the FFN variants
  under study stay untouched.
* Gradients: with `sparse_grads` (set by the optimizer, `train/optim.py`, when it can take
  them) the table's gradient is a sparse COO tensor holding only the looked-up rows, so a
  table of millions of rows costs no dense gradient pass; otherwise it is dense (FSDP).
* Decoding with a `KVCache`: the cache keeps the token ids, documents and memory flags of the
  last max(N, K) − 1 positions (`KVCache.memory`) and each memory layer the conv inputs of its
  last K − 1 positions (`LayerKV.memory`), so decoding chunk by chunk equals one full pass.
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.config import MemoryConfig, ModelConfig
from moesaic.model.norm import RMSNorm

NO_NGRAM = 0  # the zero row looked up where there is no n-gram


@dataclasses.dataclass
class NgramContext:
    """What the memory layers of one forward pass share, computed once from the batch.

    tokens_BLN: token id at offset i back (i = 0: the position itself), 0 where there is none
    valid_BLO:  bool, the n-gram of order `orders[o]` ending here exists: every position in
                it takes memory and lies in this position's document (and in the sequence or
                the cache)
    use_BL:     bool, positions that take memory (text of a real document)
    doc_BL:     document ids; prev_doc_BH: those of the H cached positions before (-1: none)
    """

    tokens_BLN: Tensor
    valid_BLO: Tensor
    use_BL: Tensor
    doc_BL: Tensor
    prev_doc_BH: Tensor


def history_length(cfg: MemoryConfig) -> int:
    """Positions before a chunk that its n-grams and convolution can reach."""
    return max(max(cfg.orders), cfg.conv_kernel, 1) - 1


def ngram_context(
    tokens_BL: Tensor, doc_BL: Tensor, use_BL: Tensor, cfg: MemoryConfig, cache=None
) -> NgramContext:
    """The suffix n-grams of every position. With a `KVCache` (decoding), the chunk continues
    the cached positions: their last ids are read from `cache.memory`, which is then advanced."""
    B, L = tokens_BL.shape
    H = history_length(cfg)
    if cache is not None and cache.memory is not None:
        prev_tok, prev_doc, prev_use = cache.memory
    else:
        prev_tok = tokens_BL.new_zeros(B, H)
        prev_doc = doc_BL.new_full((B, H), -1)
        prev_use = use_BL.new_zeros(B, H)
    tok = torch.cat([prev_tok, tokens_BL], dim=1)
    doc = torch.cat([prev_doc, doc_BL], dim=1)
    use = torch.cat([prev_use, use_BL], dim=1)
    if cache is not None:
        cache.memory = (tok[:, -H:], doc[:, -H:], use[:, -H:])
    columns, valid_by_order = [], {}
    ok_BL = use_BL
    for i in range(max(cfg.orders)):
        back = slice(H - i, H - i + L)
        columns.append(tok[:, back])
        if i:
            ok_BL = ok_BL & use[:, back] & (doc[:, back] == doc_BL)
        valid_by_order[i + 1] = ok_BL
    return NgramContext(
        tokens_BLN=torch.stack(columns, dim=-1),
        valid_BLO=torch.stack([valid_by_order[n] for n in cfg.orders], dim=-1),
        use_BL=use_BL,
        doc_BL=doc_BL,
        prev_doc_BH=prev_doc,
    )


def hash_multipliers(layer: int, cfg: MemoryConfig) -> list[list[int]]:
    """[J][N] odd multipliers of block `layer`'s tables; 0 beyond a table's order, so every
    table hashes the same N columns (XOR with 0 is the identity)."""
    rng = random.Random(f"moesaic-ngram-memory-{layer}")
    N = max(cfg.orders)
    return [
        [rng.randrange(1, 2**31, 2) if i < n else 0 for i in range(N)]
        for n in cfg.orders
        for _ in range(cfg.heads)
    ]


def causal_doc_conv(
    z_BLD: Tensor, w_DK: Tensor, doc_BL: Tensor, prev_doc_BH: Tensor, prev_z: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Depthwise causal convolution out_t = Σ_k w[:, k] ⊙ z_{t-k} over positions t-k of t's
    document. `prev_z` [B, K-1, D] holds the inputs of the cached positions before the chunk
    (None: there are none). Returns the output and the last K-1 inputs (for the next chunk).

    One `conv1d` over the whole row; then the outputs of the few positions with a tap in an
    earlier document (the first K-1 of each document) are replaced by sums over their own
    document's taps only, so no value or gradient crosses a document boundary."""
    B, L, D = z_BLD.shape
    K = w_DK.shape[1]
    if prev_z is None:
        prev_z = z_BLD.new_zeros(B, K - 1, D)
    z = torch.cat([prev_z.to(z_BLD.dtype), z_BLD], dim=1)  # [B, K-1+L, D]
    w_DK = w_DK.to(z.dtype)
    out_BLD = F.conv1d(z.transpose(1, 2), w_DK.flip(1).unsqueeze(1), groups=D).transpose(1, 2)
    doc = torch.cat([prev_doc_BH[:, prev_doc_BH.shape[1] - (K - 1) :], doc_BL], dim=1)
    pos = torch.arange(L, device=doc.device)
    src_LK = pos.unsqueeze(1) + (K - 1) - torch.arange(K, device=doc.device)  # tap k: t-k in z
    same_BLK = doc[:, src_LK] == doc_BL.unsqueeze(-1)
    b, t = (~same_BLK).any(-1).nonzero(as_tuple=True)
    if b.numel():
        taps_PKD = z[b.unsqueeze(1), src_LK[t]] * w_DK.T
        own_PKD = torch.where(same_BLK[b, t].unsqueeze(-1), taps_PKD, 0.0)
        out_BLD = out_BLD.index_put((b, t), own_PKD.sum(1).to(out_BLD.dtype))
    return out_BLD, z[:, L:]


class NgramMemory(nn.Module):
    """One block's memory: its table, projections, gate and convolution (see module doc)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        mem = cfg.memory
        moduli = mem.table_moduli()
        offsets = [1 + sum(moduli[:j]) for j in range(mem.tables)]
        self.lazy_adam = mem.lazy_adam  # how the optimizer treats the table (train/optim.py)
        self.sparse_grads = False
        self.table = nn.Parameter(torch.empty(1 + sum(moduli), mem.dim))
        self.register_buffer(
            "mult_JN", torch.tensor(hash_multipliers(layer, mem), dtype=torch.int64), False
        )
        self.register_buffer("modulus_J", torch.tensor(moduli, dtype=torch.int64), False)
        self.register_buffer("offset_J", torch.tensor(offsets, dtype=torch.int64), False)
        order_J = [o for o in range(len(mem.orders)) for _ in range(mem.heads)]
        self.register_buffer("order_J", torch.tensor(order_J, dtype=torch.int64), False)
        self.w_kv = nn.Linear(mem.tables * mem.dim, 2 * cfg.dim, bias=False)
        self.x_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.conv_norm = RMSNorm(cfg.dim, cfg.norm_eps) if mem.conv_kernel else None
        self.conv_DK = (
            nn.Parameter(torch.empty(cfg.dim, mem.conv_kernel)) if mem.conv_kernel else None
        )

    @property
    def tables(self) -> int:
        return self.offset_J.numel()

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Table and key projection normal(std); the value projection writes into the residual
        stream, so it takes `out_std` like the other output projections."""
        nn.init.normal_(self.table, std=std)
        with torch.no_grad():
            self.table[NO_NGRAM].zero_()
        w_k, w_v = self.w_kv.weight.chunk(2, dim=0)
        nn.init.normal_(w_k, std=std)
        nn.init.normal_(w_v, std=out_std)
        if self.conv_DK is not None:
            nn.init.normal_(self.conv_DK, std=std)
        for norm in (self.x_norm, self.k_norm, self.conv_norm):
            if norm is not None:
                nn.init.ones_(norm.weight)

    def rows(self, ctx: NgramContext) -> Tensor:
        """Table rows [B, L, J] of every position's n-grams (NO_NGRAM where there is none)."""
        prod_BLJN = ctx.tokens_BLN.unsqueeze(2) * self.mult_JN
        h_BLJ = prod_BLJN[..., 0]
        for i in range(1, prod_BLJN.shape[-1]):
            h_BLJ = h_BLJ ^ prod_BLJN[..., i]
        rows_BLJ = h_BLJ % self.modulus_J + self.offset_J
        valid_BLJ = ctx.valid_BLO.index_select(-1, self.order_J)
        return torch.where(valid_BLJ, rows_BLJ, NO_NGRAM)

    def forward(self, x_BLD: Tensor, ctx: NgramContext, cache=None) -> Tensor:
        """The residual update y [B, L, D] (0 where memory is not used). `cache`: the block's
        `LayerKV` when decoding (its `memory` holds the conv inputs of the last positions)."""
        B, L, D = x_BLD.shape
        sparse = self.sparse_grads and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        e_BLJr = F.embedding(self.rows(ctx), self.table, padding_idx=NO_NGRAM, sparse=sparse)
        k_BLD, v_BLD = self.w_kv(e_BLJr.reshape(B, L, -1)).chunk(2, dim=-1)
        score_BL1 = (self.x_norm(x_BLD) * self.k_norm(k_BLD)).sum(-1, keepdim=True) / math.sqrt(D)
        gate_BL1 = torch.sigmoid(score_BL1.sign() * score_BL1.abs().clamp_min(1e-6).sqrt())
        u_BLD = gate_BL1 * v_BLD
        y_BLD = u_BLD
        if self.conv_DK is not None:
            prev = cache.memory if cache is not None else None
            conv_BLD, tail = causal_doc_conv(
                self.conv_norm(u_BLD), self.conv_DK, ctx.doc_BL, ctx.prev_doc_BH, prev
            )
            if cache is not None:
                cache.memory = tail
            y_BLD = u_BLD + F.silu(conv_BLD)
        return torch.where(ctx.use_BL.unsqueeze(-1), y_BLD, 0.0)


def memory_layers(model: nn.Module) -> list[NgramMemory]:
    return [m for m in model.modules() if isinstance(m, NgramMemory)]
