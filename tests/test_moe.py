"""MoE layer: balancing terms by hand, bias updates per optimizer step, routing statistics."""

import math

import pytest
import torch

from moesaic.batch import DocKind, Modality
from moesaic.config import FFNConfig
from moesaic.model import Transformer
from moesaic.model.ffn import TokenMeta
from moesaic.model.moe import MoE, update_router_biases
from tests.model_utils import moe_config, random_batch

TEXT, IMAGE = int(Modality.TEXT), int(Modality.IMAGE)


def meta(modality, valid=None, doc_kind=None, t=None):
    modality = torch.tensor(modality)
    n = modality.numel()
    return TokenMeta(
        modality_T=modality,
        doc_kind_T=torch.tensor(doc_kind) if doc_kind is not None else torch.zeros(n).long(),
        t_T=torch.tensor(t) if t is not None else torch.ones(n),
        valid_T=torch.tensor(valid) if valid is not None else torch.ones(n, dtype=torch.bool),
    )


def layer(**kw) -> MoE:
    cfg = FFNConfig(**{"kind": "moe", "hidden": 16, "experts": 2, "granularity": 1, **kw})
    cfg.validate()
    torch.manual_seed(0)
    m = MoE(cfg, 8)
    m.reset_parameters(0.02, 0.02)
    return m


def test_switch_and_z_loss_softmax_by_hand():
    m = layer(top_k=1, aux_loss=0.1, z_loss=0.01)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0], [50.0, -50.0]])  # 3rd is padding
    scores = logits.softmax(-1)
    expert = torch.tensor([[1], [1], [0]])
    aux = m.balance_loss(logits, scores, expert, meta([0, 0, 0], valid=[True, True, False]))
    # f = [0, 1]; P = [(.25 + .5) / 2, (.75 + .5) / 2] = [.375, .625]
    switch = 0.1 * 2 * (0 * 0.375 + 1 * 0.625)
    z = 0.01 * (math.log(4.0) ** 2 + math.log(2.0) ** 2) / 2
    assert float(aux) == pytest.approx(switch + z, rel=1e-6)


def test_switch_loss_sigmoid_uses_normalised_scores():
    m = layer(top_k=1, aux_loss=1.0, score="sigmoid")
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), math.log(3.0)]])
    scores = logits.sigmoid()  # [.5, .75], [.75, .75] -> normalised [.4, .6], [.5, .5]
    expert = torch.tensor([[1], [0]])
    aux = m.balance_loss(logits, scores, expert, meta([0, 0]))
    expected = 1.0 * 2 * (0.5 * (0.4 + 0.5) / 2 + 0.5 * (0.6 + 0.5) / 2)
    assert float(aux) == pytest.approx(expected, rel=1e-6)


def test_switch_loss_with_modality_groups_weights_groups_by_tokens():
    m = layer(experts=4, top_k=1, aux_loss=1.0, groups="modality")
    inf = float("inf")
    # tokens 0, 1 text (experts 0, 1), token 2 image (experts 2, 3)
    logits = torch.tensor(
        [[0.0, math.log(3.0), -inf, -inf], [0.0, 0.0, -inf, -inf], [-inf, -inf, 0.0, 0.0]]
    )
    scores = logits.softmax(-1)
    expert = torch.tensor([[1], [1], [2]])
    aux = m.balance_loss(logits, scores, expert, meta([TEXT, TEXT, IMAGE]))
    text = 2 * (1.0 * 0.625)  # as in the softmax case: E_pool = 2
    image = 2 * (1.0 * 0.5)
    assert float(aux) == pytest.approx((2 * text + 1 * image) / 3, rel=1e-6)


def test_balanced_layer_switch_loss_is_alpha():
    m = layer(experts=4, top_k=2, aux_loss=0.5)
    logits = torch.zeros(4, 4)
    expert = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    aux = m.balance_loss(logits, logits.softmax(-1), expert, meta([0, 0, 1, 1]))
    assert float(aux) == pytest.approx(0.5)


def test_groups_route_only_inside_the_token_group():
    m = layer(experts=8, granularity=2, groups="modality", shared="none", bias_rate=0.1)
    m.router_bias[:4] = 10.0  # a huge bias on text experts must not pull image tokens there
    x = torch.randn(20, 8)
    modality = [TEXT, IMAGE] * 10
    _, scores, expert, gate = m.route(x, meta(modality))
    groups = (expert >= 4).long()
    assert torch.equal(groups, torch.tensor(modality).unsqueeze(1).expand_as(groups))
    assert torch.allclose(gate.sum(-1), torch.ones(20))
    assert torch.all(scores[torch.tensor(modality) == TEXT][:, 4:] == 0)


def test_bias_only_changes_selection_not_gates():
    m = layer(experts=4, top_k=1, bias_rate=0.1, renormalize=False)
    x = torch.randn(16, 8)
    _, scores, expert0, gate0 = m.route(x, meta([0] * 16))
    m.router_bias[:] = torch.tensor([0.0, 0.0, 0.0, 5.0])
    _, _, expert1, gate1 = m.route(x, meta([0] * 16))
    assert torch.all(expert1 == 3)
    assert torch.allclose(gate1[:, 0], scores[:, 3])
    assert not torch.equal(expert0, expert1)


def _selection_counts(m, x, md):
    _, _, expert, _ = m.route(x, md)
    valid = md.valid_T.long().unsqueeze(1).expand_as(expert)
    return torch.zeros(m.num_experts, dtype=torch.long).index_add_(
        0, expert.flatten(), valid.flatten()
    )


def test_bias_update_once_per_step_from_summed_counts():
    m = layer(experts=4, top_k=2, granularity=2, bias_rate=0.25)
    m.train()
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(12, 8, generator=g), torch.randn(7, 8, generator=g)]
    md = [meta([0] * 12, valid=[True] * 11 + [False]), meta([1] * 7)]
    expected = sum(_selection_counts(m, x, d) for x, d in zip(xs, md, strict=True))
    for x, d in zip(xs, md, strict=True):  # two micro-batches: nothing changes yet
        m(x, d)[0].sum().backward()
        assert torch.all(m.router_bias == 0)
    assert torch.equal(m.bias_counts, expected)
    assert int(expected.sum()) == (11 + 7) * 2
    update_router_biases(m)
    mean = expected.float().mean()
    assert torch.allclose(m.router_bias, 0.25 * torch.sign(mean - expected.float()))
    assert torch.all(m.bias_counts == 0)
    bias = m.router_bias.clone()
    update_router_biases(m)  # no new counts: every expert at the mean -> no change
    assert torch.equal(m.router_bias, bias)


def test_bias_update_all_reduce_skip_and_eval():
    m = layer(experts=4, top_k=1, bias_rate=0.5)
    m.eval()
    m(torch.randn(9, 8), meta([0] * 9))
    assert torch.all(m.bias_counts == 0)  # evaluation does not feed the bias update
    m.train()
    m(torch.randn(9, 8), meta([0] * 9))
    update_router_biases(m, skip=True)
    assert torch.all(m.router_bias == 0) and torch.all(m.bias_counts == 0)
    m.bias_counts.copy_(torch.tensor([3, 3, 3, 3]))
    calls = []

    def all_reduce(t):  # another rank routed 8 extra tokens to expert 0
        calls.append(t.clone())
        t.add_(torch.tensor([8, 0, 0, 0]))

    update_router_biases(m, all_reduce=all_reduce)
    assert len(calls) == 1
    assert m.router_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]


def test_bias_update_with_groups_uses_group_means():
    m = layer(experts=4, top_k=1, bias_rate=1.0, groups="modality")
    m.apply_bias_update(torch.tensor([1, 3, 10, 10]))
    assert m.router_bias.tolist() == [1.0, -1.0, 0.0, 0.0]


def test_transformer_bias_update_under_grad_accumulation():
    model = Transformer(moe_config(bias_rate=0.1, aux_loss=0.0))
    moes = list(model.moe_blocks().values())
    batches = [random_batch(2, 32, seed=s) for s in (1, 2)]
    for b in batches:
        model(b).loss.backward()
    counts = [m.bias_counts.clone() for m in moes]
    real = sum(int((b.doc_kind != DocKind.PAD).sum()) for b in batches)
    assert all(int(c.sum()) == real * moes[0].top_k for c in counts)
    assert all(torch.all(m.router_bias == 0) for m in moes)
    update_router_biases(model)
    for m, c in zip(moes, counts, strict=True):
        assert torch.allclose(m.router_bias, 0.1 * torch.sign(c.float().mean() - c.float()))


def test_routing_stats_sum_to_tokens_times_k():
    model = Transformer(moe_config(shared="global", granularity=4, experts=8))
    model.eval()
    batch = random_batch(3, 32, seed=7)
    with torch.no_grad():
        model(batch)
        model(batch)
    real = batch.doc_kind != DocKind.PAD
    n_text = int((real & batch.text_mask).sum())
    n_image = int((real & batch.image_mask).sum())
    stats = model.routing_stats()
    assert list(stats) == [0, 1]
    for moe_layer, s in zip(model.moe_blocks().values(), stats.values(), strict=True):
        k = moe_layer.top_k
        assert k == 3  # granularity 4 minus the shared expert
        assert s["tokens"].tolist() == [2 * n_text, 2 * n_image, 0]  # no video tokens
        assert s["modality"].sum(1).tolist() == [2 * n_text * k, 2 * n_image * k, 0]
        assert int(s["doc_kind"].sum()) == 2 * (n_text + n_image) * k
        assert int(s["doc_kind"][DocKind.PAD].sum()) == 0
        assert int(s["time"].sum()) == 2 * n_image * k
        assert s["modality"].dtype == torch.int64
    model.reset_routing_stats()
    assert all(int(v.sum()) == 0 for s in model.routing_stats().values() for v in s.values())


def test_time_bins_follow_flow_time():
    m = layer(experts=4, top_k=1)
    m(torch.randn(4, 8), meta([1, 1, 1, 0], t=[0.0, 0.55, 1.0, 0.3]))
    per_bin = m.stats_time.sum(1).tolist()
    assert per_bin[0] == 1 and per_bin[5] == 1 and per_bin[9] == 1 and sum(per_bin) == 3


def test_moe_forward_has_no_host_sync(monkeypatch):
    m = layer(experts=8, granularity=2, z_loss=1e-3, bias_rate=0.1, shared="per_modality")
    assert m.experts.backend == "auto"
    x, md = torch.randn(16, 8), meta([0, 1] * 8)

    def boom(*a, **k):
        raise AssertionError("host sync in the MoE forward")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    y, aux = m(x, md)
    monkeypatch.undo()
    assert y.shape == (16, 8) and aux.dim() == 0
