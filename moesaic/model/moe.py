"""Mixture-of-experts feed-forward layer: router, experts, shared experts, balancing, statistics.

Per token (T tokens of width D, E routed experts of width H = F/G):

1. Router logits `x W_r` in fp32 ([T, E]). With `groups: modality` the experts are split in
   equal groups — experts [0, E/2) for text, [E/2, E) for image (MoMa); thirds for text,
   image and video with `video_ffn: own` (otherwise video tokens route in the image group) —
   and the logits of the other groups are masked to −inf, so routing is learned only inside
   the token's own group.
2. Scores: softmax over the visible logits, or elementwise sigmoid.
3. Selection: top-k of `scores + router_bias` (the bias is the auxiliary-loss-free balancing
   term and only ever affects *which* experts are chosen); gates are the unbiased scores of the
   chosen experts, renormalised to sum to 1 when `renormalize`.
4. Dropless dispatch (`dispatch.py`), plus the always-on shared expert when configured
   (`global`: one expert of width H for all tokens; `per_modality`: one per modality slot,
   video sharing the image's unless `video_ffn: own`).

k counts the routed experts only: `active_experts` (top_k, or G when 0) includes the shared
expert, so routed k = active_experts − 1 with a shared expert. Then every token runs
active_experts experts of width F/G: the same FFN FLOPs as a dense FFN of width F.

Balancing terms are computed per layer over non-padding tokens only, on the routed pool each
token can see (all E experts, or its group's E/2):

* Switch loss `α · E_pool · Σ_i f_i · P_i`, f_i = assignments to i / (k · N_pool), P_i = mean
  router probability of i over the pool's tokens. For softmax scores the probabilities are the
  scores; for sigmoid scores they are the scores normalised to sum to 1 over the visible
  experts. With groups the per-group losses are averaged weighted by their token counts, so a
  perfectly balanced layer gives exactly α in every configuration.
* z-loss `β · mean_t logsumexp(visible logits_t)²`.
* Bias balancing: selection counts accumulate over forward passes in training mode; once per
  optimizer step `update_router_biases` applies `b_i += γ · sign(mean_pool − count_i)` (the mean
  over the expert's pool) and clears the counts.

Routing statistics (`stats_*` buffers, int64, never synchronised with the host) count routed
assignments of non-padding tokens in every forward pass, training and evaluation alike, with
one row per `Modality` (text, image, video) whatever the FFN slots; the flow-time bins count
image tokens only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.batch import NUM_DOC_KINDS, Modality
from moesaic.config import FFNConfig
from moesaic.model.dispatch import dispatch
from moesaic.model.experts import Experts
from moesaic.model.ffn import NUM_MODALITIES, DenseFFN, ModalityFFN, TokenMeta, modality_slot

TIME_BINS = 10


class MoE(nn.Module):
    """A routed SwiGLU mixture of experts; `forward(x_TD, meta) -> (y_TD, aux_loss)`."""

    def __init__(self, cfg: FFNConfig, dim: int):
        super().__init__()
        E, H = cfg.experts, cfg.expert_hidden
        self.num_experts, self.dim, self.hidden = E, dim, H
        self.num_shared = 0 if cfg.shared == "none" else 1
        self.top_k = cfg.routed_experts
        self.score, self.renormalize, self.grouped = cfg.score, cfg.renormalize, cfg.groups
        self.aux_weight, self.z_weight, self.bias_rate = cfg.aux_loss, cfg.z_loss, cfg.bias_rate
        self.router = nn.Linear(dim, E, bias=False)
        self.experts = Experts(E, dim, H, cfg.dispatch)
        self.shared: nn.Module | None = None
        if cfg.shared == "global":
            self.shared = DenseFFN(dim, H)
        elif cfg.shared == "per_modality":
            self.shared = ModalityFFN(dim, H, cfg.dispatch, cfg.modality_slots)
        # Pool (group) of each expert: all 0, or the modality slot its equal share belongs to
        # (text experts first, then image, then video with video_ffn=own).
        self.num_groups = cfg.modality_slots if cfg.groups == "modality" else 1
        group_E = torch.arange(E, dtype=torch.int64) // (E // self.num_groups)
        self.register_buffer("group_E", group_E, persistent=False)
        self.pool_size = E // self.num_groups
        self.register_buffer("router_bias", torch.zeros(E))
        self.register_buffer("bias_counts", torch.zeros(E, dtype=torch.int64), persistent=False)
        for name, shape in self.stat_shapes().items():
            self.register_buffer(f"stats_{name}", torch.zeros(shape, dtype=torch.int64), False)

    def stat_shapes(self) -> dict[str, tuple[int, ...]]:
        E = self.num_experts
        return {
            "modality": (NUM_MODALITIES, E),
            "tokens": (NUM_MODALITIES,),
            "doc_kind": (NUM_DOC_KINDS, E),
            "time": (TIME_BINS, E),
        }

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        self.experts.reset_parameters(std, out_std)
        if self.shared is not None:
            self.shared.reset_parameters(std, out_std)
        self.router_bias.zero_()

    # ------------------------------------------------------------------ routing

    def route(self, x_TD: Tensor, meta: TokenMeta) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(logits_TE fp32 with invisible experts at −inf, scores_TE, expert_TK, gate_TK)."""
        with torch.autocast(x_TD.device.type, enabled=False):
            logits = F.linear(x_TD.float(), self.router.weight.float())
        if self.grouped == "modality":
            group_T = modality_slot(meta.modality_T, self.num_groups)
            hidden_TE = self.group_E.unsqueeze(0) != group_T.unsqueeze(1)
            logits = logits.masked_fill(hidden_TE, float("-inf"))
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        select = scores.detach()
        if self.bias_rate > 0:
            select = select + self.router_bias
        if self.grouped == "modality":
            select = select.masked_fill(hidden_TE, float("-inf"))
        expert_TK = select.topk(self.top_k, dim=-1, sorted=False).indices
        gate_TK = scores.gather(1, expert_TK)
        if self.renormalize:
            gate_TK = gate_TK / gate_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        return logits, scores, expert_TK, gate_TK

    def forward(self, x_TD: Tensor, meta: TokenMeta) -> tuple[Tensor, Tensor]:
        logits, scores, expert_TK, gate_TK = self.route(x_TD, meta)
        y_TD = dispatch(x_TD, expert_TK, gate_TK, self.experts)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD, meta)[0]
        aux = self.balance_loss(logits, scores, expert_TK, meta)
        with torch.no_grad():
            self.count(expert_TK, meta)
        return y_TD, aux

    # ------------------------------------------------------------------ balancing

    def balance_loss(
        self, logits_TE: Tensor, scores_TE: Tensor, expert_TK: Tensor, meta: TokenMeta
    ) -> Tensor:
        """α·Switch + β·z-loss of this layer over non-padding tokens (0-d fp32 tensor)."""
        with torch.autocast(logits_TE.device.type, enabled=False):  # fp32 under mixed precision
            return self._balance_loss(logits_TE, scores_TE, expert_TK, meta)

    def _balance_loss(
        self, logits_TE: Tensor, scores_TE: Tensor, expert_TK: Tensor, meta: TokenMeta
    ) -> Tensor:
        aux = logits_TE.new_zeros(())
        valid_T = meta.valid_T.float()
        n = valid_T.sum().clamp_min(1.0)
        if self.z_weight > 0:
            z_T = torch.logsumexp(logits_TE, dim=-1)
            aux = aux + self.z_weight * (z_T.square() * valid_T).sum() / n
        if self.aux_weight > 0:
            probs = scores_TE
            if self.score == "sigmoid":
                probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-20)
            prob_sum_E = valid_T @ probs  # one matrix-vector product: [T] · [T, E]
            k = self.top_k
            counts_E = torch.zeros_like(prob_sum_E).index_add_(
                0, expert_TK.reshape(-1), valid_T.repeat_interleave(k)
            )
            group_T = self._group_of_tokens(meta)
            # tokens per group (a 2-row one-hot product: compiles, unlike a 2-bucket scatter)
            groups_G = torch.arange(self.num_groups, device=n.device)
            tokens_G = (group_T.unsqueeze(0) == groups_G.unsqueeze(1)).float() @ valid_T
            pool_tokens_E = tokens_G[self.group_E].clamp_min(1.0)
            switch = (counts_E * prob_sum_E / pool_tokens_E).sum() * self.pool_size / (k * n)
            aux = aux + self.aux_weight * switch
        return aux

    def _group_of_tokens(self, meta: TokenMeta) -> Tensor:
        return modality_slot(meta.modality_T, self.num_groups)

    # ------------------------------------------------------------------ statistics

    def count(self, expert_TK: Tensor, meta: TokenMeta) -> None:
        """Accumulate routing statistics (and, in training, bias-balancing counts) on device."""
        T, k = expert_TK.shape
        E = self.num_experts
        e = expert_TK.reshape(-1)

        def per_slot(v_T: Tensor) -> Tensor:
            return v_T.unsqueeze(1).expand(T, k).reshape(-1)

        valid = meta.valid_T.long()
        modality = meta.modality_T.clamp(0, NUM_MODALITIES - 1)
        v = per_slot(valid)
        self.stats_tokens.index_add_(0, modality, valid)
        self.stats_modality.view(-1).index_add_(0, per_slot(modality) * E + e, v)
        doc_kind = meta.doc_kind_T.clamp(0, NUM_DOC_KINDS - 1)
        self.stats_doc_kind.view(-1).index_add_(0, per_slot(doc_kind) * E + e, v)
        time_bin = (meta.t_T * TIME_BINS).long().clamp(0, TIME_BINS - 1)
        image = per_slot(valid * (meta.modality_T == Modality.IMAGE).long())
        self.stats_time.view(-1).index_add_(0, per_slot(time_bin) * E + e, image)
        if self.training and self.bias_rate > 0:
            self.bias_counts.index_add_(0, e, v)

    def routing_stats(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"stats_{name}").clone() for name in self.stat_shapes()}

    def reset_routing_stats(self) -> None:
        for name in self.stat_shapes():
            getattr(self, f"stats_{name}").zero_()

    @torch.no_grad()
    def apply_bias_update(self, counts_E: Tensor) -> None:
        """b_i += γ·sign(mean count of i's pool − count_i), exact in integers."""
        counts_E = counts_E.to(torch.int64)
        pool_sum_G = torch.zeros(self.num_groups, dtype=torch.int64, device=counts_E.device)
        pool_sum_G.index_add_(0, self.group_E, counts_E)
        direction = torch.sign(pool_sum_G[self.group_E] - self.pool_size * counts_E)
        self.router_bias.add_(self.bias_rate * direction.to(self.router_bias.dtype))


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_router_biases(
    model: nn.Module,
    all_reduce: Callable[[Tensor], Tensor | None] | None = None,
    skip: bool = False,
) -> None:
    """Once per optimizer step: update selection biases from the counts since the last call.

    Counts accumulate over all micro-batches of the step (training-mode forwards only). With
    `all_reduce` (e.g. `torch.distributed.all_reduce`, in place or returning the sum) the counts
    of all layers are summed across ranks in one call, so every rank applies the same update.
    `skip=True` discards the counts without updating (a skipped, non-finite step).
    """
    layers = [m for m in moe_layers(model) if m.bias_rate > 0]
    if not layers:
        return
    if not skip:
        counts = torch.cat([m.bias_counts for m in layers])
        if all_reduce is not None:
            reduced = all_reduce(counts)
            counts = reduced if isinstance(reduced, Tensor) else counts
        for m, c in zip(layers, counts.split([m.num_experts for m in layers]), strict=True):
            m.apply_bias_update(c)
    for m in layers:
        m.bias_counts.zero_()
