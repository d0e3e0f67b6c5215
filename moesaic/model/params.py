"""Parameter and FLOP accounting for every FFN variant and the n-gram memory.

* Total parameters: every parameter once (tied embeddings counted once).
* Active parameters: those one token uses in one forward pass. Everything is active except the
  experts a token does not run: of a MoE layer's E routed experts only its k routed ones, of a
  per-modality FFN (or per-modality shared expert) only its own modality's (one of two, or of
  three with a video FFN of its own, `video_ffn: own`) — and of a memory
  table only the rows a text token looks up (one per table: orders × heads rows of width
  `memory.dim` per memory layer). Embeddings, heads, routers, norms and the memory's
  projections and convolution count as active. Image positions take no memory; they are
  counted like text positions (active parameters are those of a text token, an upper bound).
* FLOPs per token (training, forward + backward):
  `6·N_matmul + 12·layers·dim·seq_len + 6·dim·memory_layers`.
  N_matmul = active parameters that take part in a matmul: the token-embedding lookup, the
  memory's table lookups and the norm weights are excluded (Kaplan et al. also exclude
  embeddings), the text head is included (with tied embeddings the shared matrix is counted
  once, as the head); the memory's depthwise convolution counts as one multiply-add per weight.
  The attention term is QKᵀ and AV over the full `seq_len` context without the
  causal/document discount (as in PaLM's MFU formula), so it is an upper bound for packed,
  masked sequences; the memory term is its gate's query–key dot product.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from moesaic.config import ModelConfig
from moesaic.errors import ConfigError
from moesaic.model.ffn import ModalityFFN
from moesaic.model.memory import NgramMemory
from moesaic.model.moe import MoE
from moesaic.model.norm import RMSNorm
from moesaic.primes import largest_primes, nth_prime


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _lookup(m: NgramMemory) -> int:
    """Table parameters one text token reads: one row per table."""
    return m.tables * m.table.shape[1]


def inactive_params(model: nn.Module) -> int:
    """Parameters of experts/FFNs a token does not run, and memory rows it does not read."""
    n = 0
    for m in model.modules():
        if isinstance(m, ModalityFFN):
            n += _numel(m.experts) * (m.slots - 1) // m.slots
        elif isinstance(m, MoE):
            n += _numel(m.experts) * (m.num_experts - m.top_k) // m.num_experts
        elif isinstance(m, NgramMemory):
            n += m.table.numel() - _lookup(m)
    return n


def count_params(model: nn.Module, active: bool = True) -> int:
    total = sum(p.numel() for p in model.parameters())
    return total - inactive_params(model) if active else total


def norm_params(model: nn.Module) -> int:
    return sum(_numel(m) for m in model.modules() if isinstance(m, RMSNorm))


def _memories(model: nn.Module) -> list[NgramMemory]:
    return [b.memory for b in model.blocks if b.memory is not None]


def param_breakdown(model: nn.Module) -> dict[str, int]:
    """Active parameters per token by part, plus total FFN and memory parameters
    (`ffn_total`, `memory_total`).

    `ffn_active` counts expert / FFN weights a token runs (routed + shared); routers are
    listed separately, so dense, modality and matched MoE layers have equal `ffn_active`.
    `memory_active` is what a text token uses of the memory (its looked-up rows, projections,
    gate norms and convolution); the memory's norms are also part of `norms`.
    """
    ffn_active = ffn_total = router = 0
    for block in model.blocks:
        ffn = block.ffn
        if isinstance(ffn, MoE):
            router += ffn.router.weight.numel()
            ffn_total += _numel(ffn) - ffn.router.weight.numel()
        else:
            ffn_total += _numel(ffn)
    memories = _memories(model)
    memory_total = sum(_numel(m) for m in memories)
    memory_inactive = sum(m.table.numel() - _lookup(m) for m in memories)
    ffn_active = ffn_total - (inactive_params(model) - memory_inactive)
    attention = sum(_numel(b.attn) for b in model.blocks)
    return {
        "embedding": model.tok_embed.weight.numel(),
        "image_in": _numel(model.image_in) + (_numel(model.patch_pos) if model.patch_pos else 0),
        "attention": attention,
        "ffn_active": ffn_active,
        "ffn_total": ffn_total,
        "router": router,
        "memory_active": memory_total - memory_inactive,
        "memory_total": memory_total,
        "heads": _numel(model.image_head)
        + (0 if model.cfg.tie_embeddings else model.text_head.weight.numel()),
        "norms": norm_params(model),
    }


def matmul_params(model: nn.Module) -> int:
    """Active parameters used in a matmul for every token (see the module docstring)."""
    n = count_params(model, active=True) - norm_params(model)
    n -= sum(_lookup(m) for m in _memories(model))
    if not model.cfg.tie_embeddings:
        n -= model.tok_embed.weight.numel()
    return n


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    cfg = model.cfg
    attention = 12.0 * cfg.layers * cfg.dim * seq_len
    gates = 6.0 * cfg.dim * len(_memories(model))
    return 6.0 * matmul_params(model) + attention + gates


# ------------------------------------------------------------------ experts vs memory (ρ)


def memory_params(cfg: ModelConfig, table_rows: int | None = None) -> int:
    """Parameters of all memory layers of `cfg` (with `table_rows` instead of the config's):
    per layer `(1 + Σ_j p_j)·r` table parameters (the zero row and one prime-sized table per
    order and head) plus `2·J·r·D` projections, `2·D` gate norms and `(K + 1)·D` for the
    convolution and its norm (none when K = 0)."""
    mem = cfg.memory
    if not mem.layers:
        return 0
    rows = table_rows if table_rows is not None else mem.table_rows
    J, r, D, K = mem.tables, mem.dim, cfg.dim, mem.conv_kernel
    table = (1 + sum(largest_primes(rows, J))) * r
    per_layer = table + 2 * J * r * D + 2 * D + ((K + 1) * D if K else 0)
    return len(mem.layers) * per_layer


def expert_unit_params(cfg: ModelConfig) -> int:
    """Parameters one more routed expert adds: its SwiGLU and its router column, in every MoE
    block."""
    f = cfg.ffn
    moe_blocks = cfg.layers // f.every
    return moe_blocks * (3 * cfg.dim * f.expert_hidden + cfg.dim)


@dataclasses.dataclass(frozen=True)
class MemorySplit:
    """Routed experts and memory table rows for one allocation ratio ρ (`memory_split`)."""

    rho: float  # asked share of the sparse parameters given to routed experts
    experts: int  # routed experts per MoE block
    table_rows: int  # memory.table_rows (the largest modulus); 0 = no memory
    expert_params: int  # routed experts and their router columns, all MoE blocks
    memory_params: int  # the whole memory: tables, projections, norms, convolution
    leftover: int  # sparse parameters given to neither (< one step of the table sizes)

    @property
    def realized_rho(self) -> float:
        return self.expert_params / (self.expert_params + self.memory_params)

    def apply(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` with this split's expert count and memory (layers cleared when none)."""
        if self.table_rows:
            memory = dataclasses.replace(cfg.memory, table_rows=self.table_rows)
        else:
            memory = dataclasses.replace(cfg.memory, layers=[])
        ffn = dataclasses.replace(cfg.ffn, experts=self.experts)
        return dataclasses.replace(cfg, ffn=ffn, memory=memory)


def _fits(cfg: ModelConfig, experts: int) -> bool:
    try:
        dataclasses.replace(cfg.ffn, experts=experts).validate()
    except ConfigError:
        return False
    return True


def _max_table_rows(cfg: ModelConfig, budget: int) -> int:
    """The largest table_rows (a prime) whose memory fits in `budget` parameters; 0 if none."""
    J = cfg.memory.tables
    lo = nth_prime(J)
    if memory_params(cfg, lo) > budget:
        return 0
    hi = lo
    while memory_params(cfg, hi) <= budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # memory_params(lo) <= budget < memory_params(hi); it grows with rows
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if memory_params(cfg, mid) <= budget else (lo, mid)
    return largest_primes(lo, J)[0]


def memory_split(cfg: ModelConfig, sparse_params: int, rho: float) -> MemorySplit:
    """Split `sparse_params` between routed experts (share ρ) and the memory (1 − ρ).

    `cfg` is a MoE model whose `memory` gives the memory's layout (layers, orders, heads, row
    width, conv); its expert count and table rows are what this chooses. The experts get
    round(ρ·S / u) experts of u = `expert_unit_params` each; the memory gets the largest tables
    whose whole memory (tables, projections, norms, conv) fits in the rest. So at every ρ < 1
    the total parameters are `rest of the model + S − leftover`, leftover being less than one
    step of the prime table sizes, and the active parameters differ only by the routers'
    `dim` per expert per MoE block (expert FFNs active per token and the memory's active
    parts do not depend on the split). ρ = 1 is the pure MoE (no memory): its active
    parameters lack the memory's, and with S a multiple of u nothing is left over.
    """
    if cfg.ffn.kind != "moe":
        raise ConfigError(f"memory_split needs a MoE model (model.ffn.kind='{cfg.ffn.kind}')")
    if not 0.0 < rho <= 1.0:
        raise ConfigError(
            f"rho={rho} must be in (0, 1] (the share of sparse parameters for experts)"
        )
    if rho < 1.0 and not cfg.memory.layers:
        raise ConfigError(
            f"rho={rho} gives parameters to a memory, but model.memory.layers is empty; "
            "set the memory layout (e.g. model.memory.layers=[1])"
        )
    unit = expert_unit_params(cfg)
    step = cfg.ffn.modality_slots if cfg.ffn.groups == "modality" else 1
    experts = min(round(rho * sparse_params / (unit * step)), sparse_params // (unit * step))
    experts *= step
    if not _fits(cfg, experts):
        raise ConfigError(
            f"rho={rho} leaves {experts} routed experts for {sparse_params:,} sparse parameters "
            f"({unit:,} per expert), too few for top_k={cfg.ffn.active_experts}; raise rho or "
            "the sparse budget"
        )
    budget = sparse_params - experts * unit
    rows = _max_table_rows(cfg, budget) if rho < 1.0 else 0
    if rho < 1.0 and not rows:
        raise ConfigError(
            f"rho={rho} leaves {budget:,} parameters for the memory, less than its smallest "
            f"size ({memory_params(cfg, nth_prime(cfg.memory.tables)):,}); lower rho or use "
            "rho=1"
        )
    used = memory_params(cfg, rows) if rows else 0
    return MemorySplit(rho, experts, rows, experts * unit, used, budget - used)
