"""The n-gram memory module: hashing, causality, documents, images, the KV cache, every option,
invalid settings, parameter accounting and the expert/memory split."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from moesaic.batch import DocKind, Modality
from moesaic.config import MemoryConfig, ModelConfig, load_config
from moesaic.errors import ConfigError
from moesaic.model import Transformer
from moesaic.model.memory import NO_NGRAM, NgramMemory, ngram_context
from moesaic.model.params import (
    expert_unit_params,
    memory_params,
    memory_split,
    param_breakdown,
)
from moesaic.model.transformer import KVCache
from moesaic.train.optim import build_optimizer
from tests.memory_utils import build, memory_config, memory_outputs
from tests.model_utils import BOI, BOS, EOI, EOS, moe_config, random_batch, tiny_config
from tests.test_model import expected_params


def _context(tokens_BL, doc_BL, cfg: MemoryConfig, use_BL=None):
    use_BL = torch.ones_like(tokens_BL, dtype=torch.bool) if use_BL is None else use_BL
    return ngram_context(tokens_BL, doc_BL, use_BL, cfg)


def _memory(layer: int = 0, **memory) -> NgramMemory:
    cfg = memory_config(**{"layers": [layer], **memory})
    torch.manual_seed(0)
    return NgramMemory(cfg, layer)


# ------------------------------------------------------------------ hashing


def test_hashing_is_deterministic_per_ngram_and_differs_between_layers():
    a, b, other = _memory(0), _memory(0), _memory(1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 64, (3, 40), generator=g)
    tokens[2, 20:23] = tokens[0, 5:8]  # the same trigram in another row and place
    ctx = _context(tokens, torch.zeros_like(tokens), MemoryConfig())
    rows = a.rows(ctx)
    assert rows.shape == (3, 40, 4)  # 2 orders x 2 heads
    assert torch.equal(rows, b.rows(ctx))  # a pure function of the config and the ids
    assert torch.equal(rows[2, 22], rows[0, 7])  # depends on the n-gram only
    # other blocks hash with their own multipliers
    assert (other.rows(ctx)[:, 2:] != rows[:, 2:]).float().mean() > 0.9


def _chi2_upper(df: int, z: float = 3.0902) -> float:
    """Wilson–Hilferty upper critical value of chi-square (z = 3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_hash_spreads_distinct_ngrams_uniformly_and_heads_collide_independently():
    cfg = ModelConfig(dim=16, layers=1, heads=2, vocab_size=4096, patch_dim=12,
                      memory=MemoryConfig(layers=[0], heads=2, table_rows=257, dim=4))  # fmt: skip
    mem = NgramMemory(cfg, 0)
    g = torch.Generator().manual_seed(1)
    zipf = 1.0 / torch.arange(1, 4097, dtype=torch.float64)  # word-like frequencies
    tokens = torch.multinomial(zipf, 30_000, replacement=True, generator=g).unsqueeze(0)
    ctx = _context(tokens, torch.zeros_like(tokens), cfg.memory)
    rows = mem.rows(ctx)[0, 2:]  # every position has both n-grams from here on
    moduli = mem.modulus_J.tolist()
    for order_index, n in enumerate(cfg.memory.orders):
        grams = ctx.tokens_BLN[0, 2:, :n]
        _, first = np.unique(grams.numpy(), axis=0, return_index=True)
        distinct = torch.as_tensor(first)
        assert distinct.numel() > 10_000
        buckets = []
        for head in range(2):
            j = order_index * 2 + head
            b = rows[distinct, j] - mem.offset_J[j]
            counts = torch.bincount(b, minlength=moduli[j]).double()
            expected = distinct.numel() / moduli[j]
            chi2 = float(((counts - expected) ** 2 / expected).sum())
            assert chi2 < _chi2_upper(moduli[j] - 1), (n, head, chi2)
            buckets.append(b)
        # pairs of distinct n-grams that collide in both heads: as often as independent hashes
        joint = torch.bincount(buckets[0] * moduli[order_index * 2 + 1] + buckets[1]).double()
        both = float((joint * (joint - 1) / 2).sum())
        pairs = distinct.numel() * (distinct.numel() - 1) / 2
        independent = pairs / (moduli[order_index * 2] * moduli[order_index * 2 + 1])
        assert both == pytest.approx(independent, rel=0.15)


def test_table_moduli_are_distinct_primes_below_table_rows():
    cfg = MemoryConfig(layers=[0], orders=[2, 3, 4], heads=3, table_rows=1000)
    moduli = cfg.table_moduli()
    sieve = np.ones(1001, bool)
    sieve[:2] = False
    for i in range(2, 32):
        sieve[i * i :: i] = False
    assert list(moduli) == sorted(np.flatnonzero(sieve).tolist(), reverse=True)[:9]


# ------------------------------------------------------------------ what a position may see


def test_memory_output_depends_only_on_earlier_tokens():
    cfg = memory_config(layers=[0, 1])
    model = build(cfg)
    batch = random_batch(2, 32, seed=3, kinds=(DocKind.TEXT,))
    base = memory_outputs(model, batch)
    inside = (batch.doc_id[0, 1:] == batch.doc_id[0, :-1]) & (batch.doc_kind[0, 1:] != DocKind.PAD)
    positions = (inside.nonzero().flatten() + 1).tolist()  # not the first of a document
    for p in (positions[2], positions[len(positions) // 2], positions[-1]):
        edited = dataclasses.replace(batch, tokens=batch.tokens.clone())
        edited.tokens[0, p] = (edited.tokens[0, p] + 7) % 60 + 5
        got = memory_outputs(model, edited)
        for layer in (0, 1):
            diff = (got[layer] - base[layer]).abs().amax(-1)
            assert diff[0, :p].max() == 0, f"layer {layer}: a position before {p} changed"
            assert diff[1].max() == 0
        assert (got[0] - base[0]).abs()[0, p].max() > 1e-3  # the edited n-grams themselves


def _two_documents() -> torch.Tensor:
    doc0, doc1 = [BOS, 11, 12, 13, 14, EOS], [BOS, 21, 22, 23, 24, EOS]
    return torch.tensor([doc0 + doc1]), torch.tensor([[0] * 6 + [1] * 6])


def test_no_ngram_crosses_a_document_boundary():
    tokens, doc = _two_documents()
    mem = _memory(0)
    rows = mem.rows(_context(tokens, doc, MemoryConfig(heads=2)))[0]  # [L, J]: bigram heads first
    assert (rows[0] == NO_NGRAM).all() and (rows[6] == NO_NGRAM).all()  # document starts
    assert (rows[7, :2] != NO_NGRAM).all() and (rows[7, 2:] == NO_NGRAM).all()  # trigram too long
    assert (rows[8] != NO_NGRAM).all()
    # and nothing of document 0 reaches document 1's memory output (the conv included)
    model = build(memory_config(layers=[0, 1]))
    batch = random_batch(1, 12, kinds=(DocKind.TEXT,))
    batch = dataclasses.replace(batch, tokens=tokens, doc_id=doc, targets=torch.full_like(doc, -1))
    base = memory_outputs(model, batch)
    edited = dataclasses.replace(batch, tokens=tokens.clone())
    edited.tokens[0, 2:6] = torch.tensor([31, 32, 33, 34])
    got = memory_outputs(model, edited)
    for layer in (0, 1):
        diff = (got[layer] - base[layer]).abs().amax(-1)[0]
        assert diff[6:].max() == 0, f"layer {layer}: document 1 saw document 0"
        assert diff[2:6].min() > 1e-4


def test_images_and_padding_get_no_memory():
    model = build(memory_config(layers=[0]))
    batch = random_batch(2, 40, seed=4, kinds=(DocKind.CAPTION_IMAGE, DocKind.IMAGE_CAPTION))
    y = memory_outputs(model, batch)[0]
    image, pad = batch.image_mask, batch.doc_kind == DocKind.PAD
    assert image.any() and pad.any()
    assert y[image | pad].abs().max() == 0
    text = (batch.modality == Modality.TEXT) & ~pad
    assert (y[text].abs().amax(-1) > 0).float().mean() > 0.5
    # an n-gram never contains an image position: the bigram ending at EOI has none
    mem = model.blocks[0].memory
    use = text
    rows = mem.rows(ngram_context(batch.tokens, batch.doc_id, use, model.cfg.memory))
    assert (rows[image | pad] == NO_NGRAM).all()  # nothing is even looked up there
    after_image = (batch.tokens == EOI) & text
    assert after_image.any() and (rows[after_image] == NO_NGRAM).all()
    before = torch.roll(batch.tokens, 1, dims=1) == BOS
    boi = (batch.tokens == BOI) & before  # "BOS BOI" (image first): a real bigram
    assert (rows[boi][:, :2] != NO_NGRAM).all()


def test_kv_cache_chunks_equal_one_forward_with_memory():
    model = build(memory_config(layers=[0, 1]))
    batch = random_batch(2, 32, seed=5, kinds=(DocKind.TEXT,))
    with torch.no_grad():
        full = model(batch).logits
        cache, parts = KVCache(), []
        for lo, hi in itertools.pairwise([0, 5, 6, 7, 20, 32]):
            parts.append(model(batch.map(lambda x, lo=lo, hi=hi: x[:, lo:hi]), cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.layers[0].memory.shape == (2, 3, 32)  # conv inputs of the last K-1 positions


# ------------------------------------------------------------------ every option


OPTIONS = {
    "default-small": {},
    "orders-2": {"orders": [2]},
    "orders-2-3-4": {"orders": [2, 3, 4]},
    "heads-1": {"heads": 1},
    "heads-3": {"heads": 3},
    "table-rows-53": {"table_rows": 53},
    "dim-4": {"dim": 4},
    "conv-0": {"conv_kernel": 0},
    "conv-1": {"conv_kernel": 1},
    "conv-6": {"conv_kernel": 6},
    "layers-0-1": {"layers": [0, 1]},
    "dense-adamw": {"lazy_adam": False},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_runs_forward_and_backward(name):
    memory = OPTIONS[name]
    cfg = memory_config(**memory)
    mem_cfg = cfg.memory
    model = build(cfg)
    build_optimizer(model, load_config(None).train)  # chooses sparse or dense table gradients
    batch = random_batch(2, 32, seed=6)
    model(batch).loss.backward()
    for i in mem_cfg.layers:
        m = model.blocks[i].memory
        assert m.tables == len(mem_cfg.orders) * mem_cfg.heads
        assert m.table.shape == (1 + sum(mem_cfg.table_moduli()), mem_cfg.dim)
        assert (m.conv_DK is None) == (mem_cfg.conv_kernel == 0)
        if m.conv_DK is not None:
            assert m.conv_DK.shape == (cfg.dim, mem_cfg.conv_kernel)
            assert m.conv_DK.grad.abs().sum() > 0
        grad = m.table.grad
        assert grad.is_sparse == mem_cfg.lazy_adam
        grad = grad.to_dense()
        use = batch.text_mask & (batch.doc_kind != DocKind.PAD)
        rows = m.rows(ngram_context(batch.tokens, batch.doc_id, use, mem_cfg))
        looked_up = set(rows.unique().tolist()) - {NO_NGRAM}
        trained = set(grad.abs().sum(1).nonzero().flatten().tolist())
        with_loss = set(rows[batch.targets >= 0].unique().tolist()) - {NO_NGRAM}
        # rows read only where nothing reaches the loss (a document's last token) get none
        assert with_loss <= trained <= looked_up and len(with_loss) > 10
        assert m.w_kv.weight.grad.abs().sum() > 0
    blocks = [i for i, b in enumerate(model.blocks) if b.memory is not None]
    assert blocks == mem_cfg.layers


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.memory.orders=[1, 2]", "orders contains 1: an n-gram order must be >= 2"),
        ("model.memory.orders=[]", "orders is empty"),
        ("model.memory.orders=[2, 2]", "repeats an order"),
        ("model.memory.layers=[4]", "contains 4, but blocks are numbered 0..3; use indices"),
        ("model.memory.layers=[-1]", "contains -1"),
        ("model.memory.layers=[1, 1]", "repeats a block"),
        ("model.memory.heads=0", "heads=0 must be >= 1"),
        ("model.memory.dim=0", "dim=0 must be >= 1"),
        ("model.memory.conv_kernel=-1", "conv_kernel=-1 must be >= 0"),
        ("model.memory.table_rows=20", None),  # 8 primes <= 20: enough for 8 tables
        (
            "model.memory.table_rows=18",
            "table_rows=18 has fewer than 8 primes .* use table_rows >= 19",
        ),
        ("data.mix={image: 1.0}", "needs text, but data.mix"),
    ],
)
def test_invalid_memory_settings_name_value_and_fix(override, fragment):
    if fragment is None:
        assert load_config("tiny", ["model.memory.layers=[1]", override]).model.memory.layers
        return
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config("tiny", ["model.memory.layers=[1]", override])
    assert "\n" not in str(info.value)
    assert any(w in str(info.value) for w in ("use ", "set ", "add ", "list ", "give "))


def test_memory_off_ignores_its_fields_and_captions_count_as_text():
    cfg = load_config("tiny", ["model.memory.orders=[1]", "data.mix={image: 1.0}"])
    assert not cfg.model.memory.layers
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(cfg.model, vocab_size=64, patch_dim=48))
    assert all(b.memory is None for b in model.blocks)
    load_config("tiny", ["model.memory.layers=[1]", "data.mix={caption_image: 1.0}"])


def test_cli_stops_with_one_line(capsys):
    from moesaic.cli import main

    assert main(["info", "tiny", "model.memory.layers=[1]", "model.memory.orders=[1]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.memory.orders contains 1" in err


# ------------------------------------------------------------------ parameters and FLOPs


def _primes_at_most(n: int, count: int) -> list[int]:
    sieve = np.ones(n + 1, bool)
    sieve[:2] = False
    for i in range(2, int(n**0.5) + 1):
        sieve[i * i :: i] = False
    return np.flatnonzero(sieve)[::-1][:count].tolist()


def expected_memory_params(cfg: ModelConfig, active: bool) -> int:
    """Closed form, written independently of the model code (docs/model-memory.md)."""
    mem, D = cfg.memory, cfg.dim
    J, r, K = len(mem.orders) * mem.heads, mem.dim, mem.conv_kernel
    rows = J if active else 1 + sum(_primes_at_most(mem.table_rows, J))
    per_layer = rows * r + 2 * J * r * D + 2 * D + (K * D + D if K else 0)
    return len(mem.layers) * per_layer


ACCOUNTING = {
    "dense": memory_config(),
    "two-layers-conv-0": memory_config(layers=[0, 1], conv_kernel=0),
    "orders-2-3-4-tied": memory_config(
        dataclasses.replace(tiny_config(), tie_embeddings=True), orders=[2, 3, 4], heads=3
    ),  # fmt: skip
    "moe": memory_config(moe_config(), layers=[0], table_rows=1009, dim=16),
}


@pytest.mark.parametrize("name", list(ACCOUNTING))
def test_param_counts_match_closed_form(name):
    cfg = ACCOUNTING[name]
    model = build(cfg)
    plain = dataclasses.replace(cfg, memory=MemoryConfig())
    for active in (False, True):
        expected = expected_params(plain, active) + expected_memory_params(cfg, active)
        assert model.num_params(active=active) == expected
    parts = param_breakdown(model)
    assert parts["memory_total"] == expected_memory_params(cfg, False) == memory_params(cfg)
    assert parts["memory_active"] == expected_memory_params(cfg, True)
    assert parts["ffn_active"] == param_breakdown(build(plain))["ffn_active"]


def test_flops_count_projections_and_conv_but_not_lookups():
    cfg = memory_config(layers=[0, 1])
    mem, D, seq = cfg.memory, cfg.dim, 128
    J, r, K = mem.tables, mem.dim, mem.conv_kernel
    plain = build(dataclasses.replace(cfg, memory=MemoryConfig()))
    per_layer = 6 * (2 * J * r * D + K * D) + 6 * D  # projections, conv, the gate's dot product
    assert build(cfg).flops_per_token(seq) == plain.flops_per_token(seq) + 2 * per_layer


# ------------------------------------------------------------------ experts vs memory (ρ)


def _sizes(cfg: ModelConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = Transformer(cfg)
    return model.num_params(active=False), model.num_params(active=True)


def test_memory_split_conserves_total_parameters():
    cfg = memory_config(moe_config(experts=16, granularity=2), layers=[0, 1])
    unit = expert_unit_params(cfg)
    assert unit == 2 * (3 * 32 * 32 + 32)  # one expert of width F/G and its router column
    budget = 16 * unit
    totals, actives, splits = set(), set(), {}
    for rho in (1.0, 0.95, 0.8, 0.75, 0.5, 0.2):
        split = memory_split(cfg, budget, rho)
        splits[rho] = split
        total, active = _sizes(split.apply(cfg))
        totals.add(total + split.leftover)
        assert split.expert_params + split.memory_params + split.leftover == budget
        assert split.leftover >= 0
        if rho < 1:
            actives.add(active - 2 * cfg.dim * split.experts)  # all but the routers
            # maximal: the next larger tables would not fit the memory's share
            bigger = _primes_at_most(2 * split.table_rows, 10**6)
            bigger = min(p for p in bigger if p > split.table_rows)
            assert memory_params(split.apply(cfg), bigger) > budget - split.expert_params
            assert abs(split.realized_rho - rho) < unit / budget
    assert len(totals) == 1 and len(actives) == 1
    assert (splits[1.0].experts, splits[1.0].table_rows, splits[1.0].leftover) == (16, 0, 0)
    assert not splits[1.0].apply(cfg).memory.layers
    assert splits[0.5].experts == 8 and splits[0.2].experts == 3


@pytest.mark.parametrize(
    "rho, base, layers, fragment",
    [
        (0.0, "moe", [0], "must be in \\(0, 1\\]"),
        (1.5, "moe", [0], "must be in \\(0, 1\\]"),
        (0.01, "moe", [0], "leaves 0 routed experts .* too few for top_k=2"),
        (0.99, "moe", [0], "leaves 0 parameters for the memory, less than its smallest size"),
        (0.8, "dense", [0], "needs a MoE model"),
        (0.8, "moe", [], "model.memory.layers is empty"),
    ],
)
def test_memory_split_refuses_impossible_splits(rho, base, layers, fragment):
    model = moe_config(experts=16, granularity=2) if base == "moe" else tiny_config()
    cfg = dataclasses.replace(model, memory=MemoryConfig(layers=layers, heads=2, dim=8))
    with pytest.raises(ConfigError, match=fragment):
        memory_split(cfg, 16 * 2 * (3 * 32 * 32 + 32), rho)
