"""The transformer: attention mask, losses, every config option, parameter and FLOP accounting."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moesaic.batch import DocKind
from moesaic.config import FFNConfig, ModelConfig
from moesaic.errors import ConfigError
from moesaic.model import ModelOutput, Transformer
from moesaic.model.params import param_breakdown
from moesaic.model.transformer import attention_mask
from tests.model_utils import moe_config, random_batch, tiny_config


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


def outputs(model: Transformer, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(batch)
    return torch.cat([out.logits, out.image_pred], dim=-1)  # [B, L, V + P]


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per position [B, L]: did any output value change?"""
    return ((a - b).abs() > 1e-6).any(-1)


# ------------------------------------------------------------------ attention mask


def test_attention_mask_by_hand():
    doc = torch.tensor([[0, 0, 0, 0, 1, 1]])
    img = torch.tensor([[-1, 0, 0, -1, -1, -1]])
    m = attention_mask(doc, img)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # image position 1 sees position 2 of its own image
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],  # new document: nothing before it
        [0, 0, 0, 0, 1, 1],
    ]


def test_rotary_depends_only_on_relative_position():
    from moesaic.model.transformer import Rotary, apply_rotary

    rot = Rotary(8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq: int, pk: int) -> float:
        rq, rk = rot(torch.tensor([[pq]])), rot(torch.tensor([[pk]]))
        return float((apply_rotary(q, *rq) * apply_rotary(k, *rk)).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)
    rq = rot(torch.tensor([[9]]))
    assert float(apply_rotary(q, *rq).norm()) == pytest.approx(float(q.norm()), rel=1e-5)


MASK_KINDS = [tiny_config(), moe_config(), tiny_config(kind="modality")]


@pytest.mark.parametrize("cfg", MASK_KINDS, ids=["dense", "moe", "modality"])
def test_future_text_never_changes_the_past(cfg):
    model = build(cfg)
    batch = random_batch(2, 32, seed=3, kinds=(DocKind.TEXT,))
    base = outputs(model, batch)
    for p in (5, 17, 30):
        edited = dataclasses.replace(batch, tokens=batch.tokens.clone())
        edited.tokens[0, p] = (edited.tokens[0, p] + 7) % 60 + 5
        diff = changed(base, outputs(model, edited))
        assert not diff[0, :p].any(), f"position < {p} changed"
        assert diff[0, p], "the edited position itself must change"
        assert not diff[1].any()


@pytest.mark.parametrize("cfg", MASK_KINDS, ids=["dense", "moe", "modality"])
def test_image_block_is_bidirectional(cfg):
    model = build(cfg)
    batch = random_batch(2, 32, seed=4, kinds=(DocKind.CAPTION_IMAGE,), patches_per_image=5)
    base = outputs(model, batch)
    pos = (batch.image_id[0] == 0).nonzero().flatten()
    last = int(pos[-1])
    edited = dataclasses.replace(batch, patches=batch.patches.clone())
    edited.patches[0, last] = -edited.patches[0, last]  # the last patch of the first image
    diff = changed(base, outputs(model, edited))
    assert diff[0, pos].all(), "every position of the image sees every patch"
    assert not diff[0, : int(pos[0])].any(), "the caption before the image must not change"
    doc = batch.doc_id[0, last]
    assert diff[0, int(pos[-1]) + 1 : int(pos[-1]) + 3].all(), "later text in the doc sees it"
    assert not diff[0][batch.doc_id[0] != doc].any()


@pytest.mark.parametrize("cfg", MASK_KINDS, ids=["dense", "moe", "modality"])
def test_nothing_leaks_across_documents(cfg):
    model = build(cfg)
    batch = random_batch(2, 48, seed=5)
    base = outputs(model, batch)
    docs = batch.doc_id[0].unique()
    assert docs.numel() >= 3
    victim = int(docs[1])
    inside = batch.doc_id[0] == victim
    edited = dataclasses.replace(batch, tokens=batch.tokens.clone(), patches=batch.patches.clone())
    edited.tokens[0, inside] = (edited.tokens[0, inside] + 3) % 60 + 5
    edited.patches[0, inside] = edited.patches[0, inside] * 0.5
    diff = changed(base, outputs(model, edited))
    assert diff[0, inside].any()
    assert not diff[0, ~inside].any(), "an edit leaked into another document"
    assert not diff[1].any()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_equals_sdpa_forward():
    cfg = tiny_config()
    batch = random_batch(2, 16, seed=6, patches_per_image=3)
    sdpa = build(cfg)
    flex = Transformer(dataclasses.replace(cfg, attention="flex"))
    flex.load_state_dict(sdpa.state_dict())
    torch.testing.assert_close(outputs(flex, batch), outputs(sdpa, batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="attention=auto or sdpa"):
        flex(batch)  # FlexAttention has no CPU backward


# ------------------------------------------------------------------ losses


def test_losses_match_definitions():
    cfg = dataclasses.replace(tiny_config(), image_loss_weight=2.5)
    model = build(cfg)
    batch = random_batch(2, 32, seed=8)
    out = model(batch)
    assert isinstance(out, ModelOutput)
    t = batch.targets >= 0
    ce = F.cross_entropy(out.logits[t], batch.targets[t])
    torch.testing.assert_close(out.text_loss, ce)
    m = batch.image_loss
    target = batch.patches - batch.noise
    torch.testing.assert_close(out.image_loss, ((out.image_pred - target)[m] ** 2).mean())
    torch.testing.assert_close(out.loss, out.text_loss + 2.5 * out.image_loss + out.aux_loss)
    assert out.text_count == int(t.sum()) and out.image_count == int(m.sum())
    assert out.image_count > 0 and out.aux_loss.item() == 0.0
    assert out.logits.shape == (2, 32, cfg.vocab_size) and out.image_pred.shape == (2, 32, 12)


def test_x0_prediction_regresses_clean_patches():
    model = build(dataclasses.replace(tiny_config(), prediction="x0"))
    batch = random_batch(2, 32, seed=8)
    out = model(batch)
    m = batch.image_loss
    torch.testing.assert_close(out.image_loss, ((out.image_pred - batch.patches)[m] ** 2).mean())


def test_image_input_is_the_noised_patch_at_its_time():
    model = build(tiny_config())
    batch = random_batch(2, 32, seed=9)
    x = model.embed(batch)
    img = batch.image_mask
    x_t = batch.t[..., None] * batch.patches + (1 - batch.t[..., None]) * batch.noise
    expected = model.image_in.proj(x_t) + model.image_in.time(batch.t)
    torch.testing.assert_close(x[img], expected[img])
    torch.testing.assert_close(x[~img], model.tok_embed(batch.tokens)[~img])


def test_empty_modalities_give_zero_losses_that_backprop():
    model = build(moe_config())
    text_only = random_batch(2, 32, seed=1, kinds=(DocKind.TEXT,))
    out = model(text_only)
    assert out.image_loss.item() == 0.0 and out.image_count == 0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    no_text = dataclasses.replace(text_only, targets=torch.full_like(text_only.targets, -1))
    out = model(no_text)
    assert out.text_loss.item() == 0.0 and out.text_count == 0
    out.loss.backward()


def test_hidden_states_and_determinism():
    batch = random_batch(2, 32, seed=2)
    a, b = build(moe_config(), seed=3), build(moe_config(), seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    out_a, out_b = a(batch, output_hidden_states=True), b(batch)
    assert torch.equal(out_a.loss, out_b.loss)
    assert out_b.hidden_states is None
    assert len(out_a.hidden_states) == 2 and out_a.hidden_states[0].shape == (2, 32, 32)


def test_init_scales_residual_outputs():
    model = build(dataclasses.replace(tiny_config(), layers=8, init_std=0.05))
    w_q = model.blocks[0].attn.wqkv.weight.std().item()
    w_o = model.blocks[0].attn.wo.weight.std().item()
    assert w_q == pytest.approx(0.05, rel=0.1)
    assert w_o == pytest.approx(0.05 / 4, rel=0.1)


# ------------------------------------------------------------------ every option


OPTIONS = {
    "dense": {},
    "dense-tied": {"tie_embeddings": True},
    "dense-no-qk-norm": {"qk_norm": False},
    "dense-x0": {"prediction": "x0"},
    "modality": {"kind": "modality"},
    "modality-split": {"kind": "modality", "dispatch": "split"},
    "moe": {"kind": "moe"},
    "moe-sigmoid": {"kind": "moe", "score": "sigmoid"},
    "moe-no-renorm": {"kind": "moe", "renormalize": False},
    "moe-top1": {"kind": "moe", "granularity": 1, "top_k": 1},
    "moe-top3": {"kind": "moe", "top_k": 3},
    "moe-g4": {"kind": "moe", "granularity": 4, "experts": 16},
    "moe-shared-global": {"kind": "moe", "shared": "global"},
    "moe-shared-modality": {"kind": "moe", "shared": "per_modality", "granularity": 4},
    "moe-groups": {"kind": "moe", "groups": "modality"},
    "moe-groups-shared": {
        "kind": "moe",
        "groups": "modality",
        "shared": "per_modality",
        "score": "sigmoid",
    },  # fmt: skip
    "moe-every2": {"kind": "moe", "every": 2},
    "moe-balancing": {"kind": "moe", "aux_loss": 0.1, "z_loss": 1e-3, "bias_rate": 1e-2},
    "moe-split": {"kind": "moe", "dispatch": "split"},
    "moe-grouped-mm": {"kind": "moe", "dispatch": "grouped_mm", "tie_embeddings": True},
}


def options_config(name: str) -> ModelConfig:
    kw = dict(OPTIONS[name])
    if kw.get("kind") == "moe":
        kw = {"experts": 8, "granularity": 2, **kw}
    return tiny_config(**kw)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_forward_backward(name):
    from moesaic.model.moe import update_router_biases

    model = build(options_config(name))
    batch = random_batch(2, 24, seed=11)
    out = model(batch)
    assert torch.isfinite(out.loss) and out.loss.dim() == 0
    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
    update_router_biases(model)
    assert torch.isfinite(model(batch).loss)


# ------------------------------------------------------------------ invalid configs


@pytest.mark.parametrize(
    "cfg, match",
    [
        (moe_config(top_k=9), "top_k"),
        (moe_config(granularity=3), "not divisible"),
        (tiny_config(kind="sparse"), "kind"),
        (moe_config(groups="modality", experts=7), "even"),
        (moe_config(granularity=1, top_k=1, shared="global"), "no routed expert"),
        (moe_config(every=3), "every=3"),
        (moe_config(dispatch="fast"), "dispatch"),
        (dataclasses.replace(tiny_config(), heads=3), "divisible"),
        (dataclasses.replace(tiny_config(), vocab_size=0), "vocab_size=0"),
        (dataclasses.replace(tiny_config(), prediction="eps"), "prediction"),
    ],
)
def test_invalid_configs_raise_config_error(cfg, match):
    with pytest.raises(ConfigError, match=match):
        Transformer(cfg)


# ------------------------------------------------------------------ parameters and FLOPs


def expected_params(cfg: ModelConfig, active: bool) -> int:
    """Closed form, written independently of the model code."""
    D, V, P, F_, f = cfg.dim, cfg.vocab_size, cfg.patch_dim, cfg.ffn.hidden, cfg.ffn
    hd = D // cfg.heads
    n = V * D + (0 if cfg.tie_embeddings else V * D)  # embedding + text head
    n += P * D + 2 * D * D + D * P + D  # image in, timestep MLP, image head, final norm
    for i in range(cfg.layers):
        n += 4 * D * D + 2 * D + (2 * hd if cfg.qk_norm else 0)
        if f.kind == "dense" or (f.kind == "moe" and (i + 1) % f.every):
            n += 3 * D * F_
        elif f.kind == "modality":
            n += 3 * D * F_ * (1 if active else 2)
        else:
            H = F_ // f.granularity
            shared = 0 if f.shared == "none" else 1
            k = f.active_experts - shared
            n += D * f.experts  # router
            n += 3 * D * H * (k if active else f.experts)
            n += {"none": 0, "global": 1, "per_modality": 1 if active else 2}[f.shared] * 3 * D * H
    return n


@pytest.mark.parametrize("name", list(OPTIONS))
def test_param_counts_match_closed_form(name):
    cfg = options_config(name)
    model = build(cfg)
    assert model.num_params(active=False) == expected_params(cfg, active=False)
    assert model.num_params(active=True) == expected_params(cfg, active=True)


def test_ffn_kinds_have_equal_active_ffn_params():
    variants = [
        tiny_config(),
        tiny_config(kind="modality"),
        moe_config(),
        moe_config(granularity=4, experts=16),
        moe_config(granularity=4, experts=16, shared="per_modality"),
        moe_config(granularity=4, experts=16, shared="global", groups="modality"),
    ]
    breakdowns = [param_breakdown(build(c)) for c in variants]
    active = {b["ffn_active"] for b in breakdowns}
    assert active == {2 * 3 * 32 * 64}
    assert breakdowns[1]["ffn_total"] == 2 * breakdowns[0]["ffn_total"]
    assert breakdowns[3]["ffn_total"] == 2 * 3 * 32 * 16 * 16
    assert breakdowns[2]["router"] == 2 * 32 * 8


def test_flops_per_token():
    for cfg in (tiny_config(), dataclasses.replace(moe_config(), tie_embeddings=True)):
        model = build(cfg)
        norms = param_breakdown(model)["norms"]
        embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
        n = model.num_params(active=True) - norms - embedding
        attention = 12 * cfg.layers * cfg.dim * 128
        assert model.flops_per_token(128) == pytest.approx(6 * n + attention)
    dense, moe = build(tiny_config()), build(moe_config())
    assert moe.flops_per_token(64) - dense.flops_per_token(64) == 6 * 2 * 32 * 8  # the routers


def test_tied_embeddings_share_one_matrix():
    model = build(tiny_config(tie_embeddings=True))
    assert model.text_head.weight is model.tok_embed.weight
    untied = build(tiny_config())
    assert untied.num_params(False) - model.num_params(False) == 64 * 32


# ------------------------------------------------------------------ modality FFN


def test_modality_ffn_uses_each_tokens_own_weights():
    model = build(tiny_config(kind="modality"))
    batch = random_batch(2, 32, seed=12)
    ffn = model.blocks[0].ffn
    from moesaic.model.ffn import TokenMeta

    x = torch.randn(64, 32)
    meta = TokenMeta(
        batch.modality.reshape(-1),
        batch.doc_kind.reshape(-1),
        batch.t.reshape(-1),
        torch.ones(64, dtype=torch.bool),
    )
    img = batch.modality.reshape(-1) == 1
    y_before, _ = ffn(x, meta)
    with torch.no_grad():
        ffn.experts.w_down_EHD[1].zero_()  # the image FFN
    y_after, _ = ffn(x, meta)
    assert torch.all(y_after[img] == 0)
    assert torch.equal(y_after[~img], y_before[~img])
    assert (y_before[img] != 0).any()
    with torch.no_grad():
        ffn.experts.w_down_EHD[0].zero_()  # and the text FFN
    assert torch.all(ffn(x, meta)[0] == 0)


def test_ffn_config_defaults_are_valid_for_tiny_model():
    FFNConfig().validate()
    assert Transformer(tiny_config()).num_params() > 0
