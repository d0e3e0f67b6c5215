"""The unified decoder-only transformer over packed text + image sequences (design.md §2–4).

    tokens ──tok_embed──┐                                    ┌─ text_head ─► logits   [B, L, V]
                        ├─ where(visual) ─► blocks ─► norm ──┤
    x_t, t ──image_in───┘                                    └─ image_head ► pred     [B, L, P]

Pre-norm blocks (RMSNorm) with rotary attention (optional QK-norm) and a feed-forward layer
that is dense, per-modality or a mixture of experts (`ffn.py`, `moe.py`); no biases anywhere.
Blocks listed in `memory.layers` first add a hashed n-gram lookup memory (`memory.py`).
Attention is causal across the sequence, bidirectional inside an image block and blocked
across documents. Video frames are image blocks of their own (modality VIDEO, own `image_id`
and flow time): they enter and leave through the same patch projections as images, see every
patch of their own frame and everything before it — earlier frames and actions — and nothing
after. Positions are passed explicitly to attention, so decoding can run one new
position at a time against a `KVCache` of the keys and values of everything before it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.batch import Batch, DocKind
from moesaic.config import FFNConfig, ModelConfig
from moesaic.errors import ConfigError
from moesaic.model import flex, heads, memory
from moesaic.model.ffn import DenseFFN, ModalityFFN, TokenMeta
from moesaic.model.moe import MoE
from moesaic.model.norm import RMSNorm
from moesaic.model.params import count_params, flops_per_token


@dataclasses.dataclass
class ModelOutput:
    """Losses (0-d tensors) and outputs of one forward pass. Counts stay on device until read."""

    loss: Tensor  # text_loss + λ·(image_loss + video_loss) + aux_loss
    text_loss: Tensor  # mean CE over targets >= 0 (0 if none)
    image_loss: Tensor  # mean MSE over elements of image-loss positions of images (0 if none)
    aux_loss: Tensor  # MoE balancing terms summed over layers (0 if none)
    logits: Tensor  # [B, L, V]
    image_pred: Tensor  # [B, L, P] (at image and video-frame positions)
    text_targets: Tensor  # 0-d int64: number of text targets
    image_positions: Tensor  # 0-d int64: number of image-loss positions of images
    video_loss: Tensor  # mean MSE over elements of image-loss positions of video frames
    video_positions: Tensor  # 0-d int64: number of image-loss positions of video frames
    hidden_states: list[Tensor] | None = None  # [B, L, D] after each block, when asked for

    @property
    def text_count(self) -> int:
        return int(self.text_targets)

    @property
    def image_count(self) -> int:
        return int(self.image_positions)

    @property
    def video_count(self) -> int:
        return int(self.video_positions)


class Rotary(nn.Module):
    """Rotary position embedding tables: positions [B, L] -> (cos, sin) [B, L, 1, d/2].

    Channel i of each head's first half rotates with channel i of its second half by angle
    position · theta^(−2i/d).
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions_BL: Tensor) -> tuple[Tensor, Tensor]:
        angles = positions_BL.float().unsqueeze(-1) * self.inv_freq
        return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def apply_rotary(x_BLHd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate q or k in fp32: [B, L, H, d] with tables [B, L, 1, d/2]."""
    x1, x2 = x_BLHd.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x_BLHd.dtype)


def index_in_block(image_id_BL: Tensor) -> Tensor:
    """Each position's index inside its image / frame block (0 at the first patch, 0 at text):
    [B, L] int64. Blocks are contiguous, so it is the distance to the block's first position."""
    B, L = image_id_BL.shape
    pos = torch.arange(L, device=image_id_BL.device).expand(B, L)
    before = F.pad(image_id_BL[:, :-1], (1, 0), value=-1)
    start = (image_id_BL >= 0) & (image_id_BL != before)
    first = torch.where(start, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return torch.where(image_id_BL >= 0, pos - first, torch.zeros_like(pos))


class PatchPosition(nn.Module):
    """Where a patch sits inside its image or frame (`model.patch_positions`): sinusoidal
    features of its index in the block → Linear, [B, L] -> [B, L, D]. The same patch of two
    frames gets the same vector whatever lies between them (rotary positions only give the
    offset, which varies with the action text), so attention can match a patch to its
    counterpart in the frame before."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, index_BL: Tensor) -> Tensor:
        # timestep_features embeds t·TIME_SCALE: pass index / TIME_SCALE to embed the index
        return self.proj(heads.timestep_features(index_BL.float() / heads.TIME_SCALE, self.dim))


def attention_mask(doc_id_BL: Tensor, image_id_BL: Tensor, first_query: int = 0) -> Tensor:
    """Boolean [B, 1, L - first_query, L], True = may attend: same document and (causal or same
    image). Query rows start at `first_query` (> 0 when earlier positions are in a KV cache)."""
    L = doc_id_BL.shape[1]
    pos = torch.arange(L, device=doc_id_BL.device)
    causal = pos[first_query:].unsqueeze(1) >= pos.unsqueeze(0)
    doc_q, img_q, img = doc_id_BL[:, first_query:], image_id_BL[:, first_query:], image_id_BL
    same_doc = doc_q.unsqueeze(2) == doc_id_BL.unsqueeze(1)
    same_image = (img_q.unsqueeze(2) == img.unsqueeze(1)) & (img_q >= 0).unsqueeze(2)
    return (same_doc & (causal | same_image)).unsqueeze(1)


class LayerKV:
    """One block's cached keys and values: [B, H, L_cached, d] each."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.memory: Tensor | None = None  # the n-gram memory's conv inputs (memory.py)

    def extend(self, k_BHLd: Tensor, v_BHLd: Tensor) -> tuple[Tensor, Tensor]:
        """Append a new chunk's keys and values; return all of them so far."""
        if self.k is not None:
            k_BHLd = torch.cat([self.k, k_BHLd], dim=2)
            v_BHLd = torch.cat([self.v, v_BHLd], dim=2)
        self.k, self.v = k_BHLd, v_BHLd
        return k_BHLd, v_BHLd


class KVCache:
    """Keys and values of the positions run so far, for decoding one chunk at a time.

    Pass the same cache (empty at first) to successive forward passes over consecutive chunks
    of the same rows: each chunk attends to the cached positions and itself under the packed
    mask (the document and image ids of cached positions are kept for it), and is appended.
    Running a sequence in chunks this way gives the same outputs as one full forward pass,
    provided no chunk boundary splits an image block (its attention is bidirectional).
    """

    def __init__(self) -> None:
        self.layers: list[LayerKV] = []
        self.doc_id: Tensor | None = None  # [B, L_cached]
        self.image_id: Tensor | None = None
        self.memory: tuple[Tensor, ...] | None = None  # last ids for n-gram memory (memory.py)

    def layer(self, i: int) -> LayerKV:
        while len(self.layers) <= i:
            self.layers.append(LayerKV())
        return self.layers[i]

    def __len__(self) -> int:
        return 0 if self.doc_id is None else self.doc_id.shape[1]

    def extend_mask(self, doc_id_BL: Tensor, image_id_BL: Tensor) -> Tensor:
        """Record a new chunk's ids; its mask [B, 1, L_new, L_cached + L_new]."""
        first = len(self)
        if self.doc_id is not None:
            doc_id_BL = torch.cat([self.doc_id, doc_id_BL], dim=1)
            image_id_BL = torch.cat([self.image_id, image_id_BL], dim=1)
        self.doc_id, self.image_id = doc_id_BL, image_id_BL
        return attention_mask(doc_id_BL, image_id_BL, first)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(
        self, x_BLD: Tensor, rope: tuple[Tensor, Tensor], mask, kv: LayerKV | None = None
    ) -> Tensor:
        """`mask` is a boolean [B, 1, L, L] tensor (SDPA) or a FlexAttention BlockMask; with a
        cache `kv` the new keys and values are appended to it and the boolean mask is
        [B, 1, L, L_cached + L]."""
        B, L, D = x_BLD.shape
        q, k, v = self.wqkv(x_BLD).view(B, L, 3, self.heads, self.head_dim).unbind(2)
        q, k = apply_rotary(self.q_norm(q), *rope), apply_rotary(self.k_norm(k), *rope)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, L, d]
        if kv is not None:
            k, v = kv.extend(k, v)
        if isinstance(mask, Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = flex.flex_sdpa(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(B, L, D))


def build_ffn(cfg: FFNConfig, dim: int, layer: int) -> nn.Module:
    """Block `layer`'s FFN; with kind moe, blocks every-1, 2·every-1, … are MoE, others dense."""
    if cfg.kind == "modality":
        return ModalityFFN(dim, cfg.hidden, cfg.dispatch, cfg.modality_slots)
    if cfg.kind == "moe" and (layer + 1) % cfg.every == 0:
        return MoE(cfg, dim)
    return DenseFFN(dim, cfg.hidden)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        in_memory = layer in cfg.memory.layers
        self.memory = memory.NgramMemory(cfg, layer) if in_memory else None
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = build_ffn(cfg.ffn, cfg.dim, layer)

    def forward(
        self,
        x_BLD: Tensor,
        rope,
        mask,
        meta: TokenMeta,
        kv: LayerKV | None = None,
        ngrams: memory.NgramContext | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if self.memory is not None:  # its own residual add, first: attention and FFN see it
            x_BLD = x_BLD + self.memory(x_BLD, ngrams, kv)
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), rope, mask, kv)
        B, L, D = x_BLD.shape
        y_TD, aux = self.ffn(self.ffn_norm(x_BLD).reshape(B * L, D), meta)
        return x_BLD + y_TD.view(B, L, D), aux


def check_model_config(cfg: ModelConfig) -> None:
    cfg.validate()
    for name in ("vocab_size", "patch_dim"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(
                f"model.{name}={getattr(cfg, name)} must be resolved (> 0) before building the "
                "model; the trainer takes it from the tokenizer and data"
            )
    if cfg.ffn.kind == "moe" and cfg.ffn.every > cfg.layers:
        raise ConfigError(
            f"model.ffn.every={cfg.ffn.every} > model.layers={cfg.layers} leaves no MoE block; "
            f"use every <= {cfg.layers} or ffn.kind=dense"
        )
    if cfg.attention == "flex" and not flex.flex_available():
        raise ConfigError(
            f"model.attention='flex' needs FlexAttention (torch {torch.__version__} lacks it); "
            "use model.attention=sdpa"
        )


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.image_in = heads.ImageInput(cfg.patch_dim, cfg.dim)
        self.patch_pos = PatchPosition(cfg.dim) if cfg.patch_positions else None
        self.rotary = Rotary(cfg.dim // cfg.heads, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.text_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.image_head = nn.Linear(cfg.dim, cfg.patch_dim, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.text_head.weight = self.tok_embed.weight

    def reset_parameters(self) -> None:
        """normal(0, init_std); residual output projections scaled by 1/sqrt(2·layers)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.layers)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            nn.init.normal_(block.attn.wo.weight, std=out_std)
            block.ffn.reset_parameters(std, out_std)
            if block.memory is not None:
                block.memory.reset_parameters(std, out_std)

    def uses_flex(self, device: torch.device) -> bool:
        """`auto` picks FlexAttention on CUDA; on CPU it has no backward (inference only)."""
        if self.cfg.attention == "auto":
            return device.type == "cuda" and flex.flex_available()
        if self.cfg.attention == "flex" and device.type != "cuda" and torch.is_grad_enabled():
            raise ConfigError(
                f"model.attention='flex' cannot train on {device.type} (FlexAttention has no "
                "CPU backward); use model.attention=auto or sdpa"
            )
        return self.cfg.attention == "flex"

    def embed(self, batch: Batch) -> Tensor:
        """Token embeddings at text positions, projected noised patches + t at image and video
        positions: [B, L, D]."""
        x_t = heads.flow_input(batch.patches, batch.noise, batch.t)
        image = self.image_in(x_t, batch.t)
        if self.patch_pos is not None:
            image = image + self.patch_pos(index_in_block(batch.image_id))
        text = self.tok_embed(batch.tokens)
        return torch.where(batch.visual_mask.unsqueeze(-1), image.to(text.dtype), text)

    def forward(
        self,
        batch: Batch,
        output_hidden_states: bool = False,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """Forward pass and losses. `positions` [B, L] default to 0..L-1 in every row (after
        the cached positions, with a `cache`). With `cache`, `batch` is the next chunk of the
        cached rows: it attends to them and is added to the cache (decoding)."""
        B, L = batch.shape
        if positions is None:
            start = len(cache) if cache is not None else 0
            positions = torch.arange(start, start + L, device=batch.tokens.device).expand(B, L)
        rope = self.rotary(positions)
        ngrams = None
        if self.cfg.memory.layers:
            use_BL = batch.text_mask & (batch.doc_kind != DocKind.PAD)
            ngrams = memory.ngram_context(
                batch.tokens, batch.doc_id, use_BL, self.cfg.memory, cache
            )
        if cache is not None:
            mask = cache.extend_mask(batch.doc_id, batch.image_id)
        elif self.uses_flex(batch.tokens.device):
            mask = flex.block_mask(batch.doc_id, batch.image_id)
        else:
            mask = attention_mask(batch.doc_id, batch.image_id)
        meta = TokenMeta(
            modality_T=batch.modality.reshape(-1),
            doc_kind_T=batch.doc_kind.reshape(-1),
            t_T=batch.t.reshape(-1),
            valid_T=(batch.doc_kind != DocKind.PAD).reshape(-1),
        )
        x = self.embed(batch)
        hidden, aux_terms = [], []
        for i, block in enumerate(self.blocks):
            x, aux = block(x, rope, mask, meta, None if cache is None else cache.layer(i), ngrams)
            if aux is not None:
                aux_terms.append(aux)
            if output_hidden_states:
                hidden.append(x)
        x = self.norm(x)
        logits = self.text_head(x)
        image_pred = self.image_head(x)

        text_loss, text_targets = heads.text_loss(logits, batch.targets)
        target = heads.flow_target(batch.patches, batch.noise, self.cfg.prediction)
        flow = batch.image_loss
        image_loss, image_positions = heads.image_loss(image_pred, target, flow & batch.image_mask)
        video_loss, video_positions = heads.image_loss(image_pred, target, flow & batch.video_mask)
        aux_loss = torch.stack(aux_terms).sum() if aux_terms else text_loss.new_zeros(())
        flow_loss = image_loss + video_loss  # each a per-modality mean, like the text loss
        loss = text_loss + self.cfg.image_loss_weight * flow_loss + aux_loss
        return ModelOutput(
            loss=loss,
            text_loss=text_loss,
            image_loss=image_loss,
            aux_loss=aux_loss,
            logits=logits,
            image_pred=image_pred,
            text_targets=text_targets,
            image_positions=image_positions,
            video_loss=video_loss,
            video_positions=video_positions,
            hidden_states=hidden if output_hidden_states else None,
        )

    # ------------------------------------------------------------------ accounting, statistics

    def num_params(self, active: bool = True) -> int:
        """All parameters (tied counted once); `active`: only those one token uses."""
        return count_params(self, active)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N_matmul + 12·layers·dim·seq_len (see params.py)."""
        return flops_per_token(self, seq_len)

    def moe_blocks(self) -> dict[int, MoE]:
        return {i: b.ffn for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoE)}

    def routing_stats(self) -> dict[int, dict[str, Tensor]]:
        """Per MoE block: int64 counters accumulated since the last reset (see moe.py)."""
        return {i: moe.routing_stats() for i, moe in self.moe_blocks().items()}

    def reset_routing_stats(self) -> None:
        for moe in self.moe_blocks().values():
            moe.reset_routing_stats()
