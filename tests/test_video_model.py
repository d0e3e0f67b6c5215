"""Video in the model: the frame mask (SDPA and FlexAttention), per-frame flow losses, video as
its own modality for the FFN variants, routing statistics and parameter accounting."""

import dataclasses

import numpy as np
import pytest
import torch

from moesaic.batch import DocKind, Modality
from moesaic.config import DataConfig
from moesaic.data.documents import SpecialIds, assemble
from moesaic.data.packing import pack_rows
from moesaic.model import Transformer, flex
from moesaic.model.ffn import TokenMeta
from moesaic.model.params import param_breakdown
from moesaic.model.transformer import attention_mask, index_in_block
from tests.model_utils import PATCH_DIM, moe_config, tiny_config

IDS = SpecialIds(0, 1, 2, 3, 4)
M = 4  # patches per frame
L = 48


def _frame(gen, t, loss):
    patches = gen.uniform(-1, 1, (M, PATCH_DIM)).astype(np.float32)
    noise = gen.standard_normal((M, PATCH_DIM)).astype(np.float32)
    return ("frame", patches, noise, t, loss, False)


def video_batch(seed=0):
    """Row 0: a text document, then an action_video clip (frame, action, frame, action, frame;
    the last frame noised). Row 1: a bare video clip of three noised frames, then a
    caption → image document."""
    gen = np.random.default_rng(seed)
    text = assemble("text", [("text", [10, 11, 12], True)], IDS, ("text", 0), L)
    action = assemble(
        "action_video",
        [_frame(gen, 1.0, False), ("text", [20, 21], False), _frame(gen, 1.0, False),
         ("text", [22, 23, 24], False), _frame(gen, 0.3, True)],
        IDS, ("action_video", 0), L,
    )  # fmt: skip
    video = assemble(
        "video", [_frame(gen, 0.2, True), _frame(gen, 0.5, True), _frame(gen, 0.7, True)],
        IDS, ("video", 0), L,
    )  # fmt: skip
    image = ("image", *_frame(gen, 0.4, True)[1:])
    caption = assemble("caption_image", [("text", [30, 31], True), image], IDS, ("ci", 0), L)
    cfg = DataConfig(seq_len=L, patch_size=2, channels=3)
    batch = pack_rows([[text, action], [video, caption]], cfg, IDS.pad)
    batch.validate()
    return batch


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg)


def outputs(model, batch):
    with torch.no_grad():
        out = model(batch)
    return torch.cat([out.logits, out.image_pred], dim=-1)


def changed(a, b):
    return ((a - b).abs() > 1e-6).any(-1)


def frame_positions(batch, row):
    ids = batch.image_id[row]
    return [(ids == i).nonzero().flatten() for i in ids[ids >= 0].unique().tolist()]


# ------------------------------------------------------------------ the mask


def test_batch_has_frames_as_separate_video_blocks():
    b = video_batch()
    frames = frame_positions(b, 0)
    assert len(frames) == 3 and all(len(f) == M for f in frames)
    assert all((b.modality[0, f] == Modality.VIDEO).all() for f in frames)
    assert (b.modality[1][b.doc_kind[1] == DocKind.CAPTION_IMAGE] != Modality.VIDEO).all()
    assert int(b.image_mask.sum()) == M and int(b.video_mask.sum()) == 6 * M


def _expected_mask(batch, b):
    """The rule spelled out position by position."""
    n = batch.shape[1]
    doc, img = batch.doc_id[b].tolist(), batch.image_id[b].tolist()
    return torch.tensor(
        [[doc[q] == doc[k] and (k <= q or (img[q] >= 0 and img[q] == img[k])) for k in range(n)]
         for q in range(n)]
    )  # fmt: skip


def test_mask_frames_see_their_frame_and_the_past_only():
    b = video_batch()
    mask = attention_mask(b.doc_id, b.image_id)[:, 0]
    for row in range(2):
        assert torch.equal(mask[row], _expected_mask(b, row))
    f1, f2, f3 = frame_positions(b, 0)
    q = int(f2[0])  # first patch of the middle frame
    assert mask[0, q, f2].all(), "bidirectional inside the frame"
    assert mask[0, q, f1].all() and mask[0, q, int(f1[-1]) + 1 : q].all(), "earlier frame, action"
    assert not mask[0, q, f3].any(), "never a later frame"
    assert not mask[0, int(f1[-1]), f2].any()
    text = (b.doc_id[0] == 0).nonzero().flatten()
    assert not mask[0, q, text].any(), "nothing across documents"


@pytest.mark.skipif(not flex.flex_available(), reason="FlexAttention missing")
def test_flex_mask_builder_gives_the_same_mask():
    b = video_batch()
    bm = flex.block_mask(b.doc_id, b.image_id)
    n = b.shape[1]
    q, kv = torch.arange(n).view(n, 1), torch.arange(n).view(1, n)
    zero = torch.zeros((), dtype=torch.int64)
    for row in range(2):
        dense = bm.mask_mod(torch.tensor(row), zero, q, kv)
        assert torch.equal(dense, _expected_mask(b, row))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.skipif(not flex.flex_available(), reason="FlexAttention missing")
def test_flex_attention_equals_sdpa_on_video():
    cfg = tiny_config()
    b = video_batch(1)
    sdpa = build(cfg)
    fx = Transformer(dataclasses.replace(cfg, attention="flex"))
    fx.load_state_dict(sdpa.state_dict())
    torch.testing.assert_close(outputs(fx, b), outputs(sdpa, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "cfg", [tiny_config(), moe_config(), tiny_config(kind="modality", video_ffn="own")],
    ids=["dense", "moe", "modality-own"],
)  # fmt: skip
def test_editing_a_frame_changes_it_and_later_frames_only(cfg):
    model = build(cfg)
    b = video_batch(2)
    base = outputs(model, b)
    f1, f2, f3 = frame_positions(b, 0)
    edited = dataclasses.replace(b, patches=b.patches.clone())
    edited.patches[0, int(f2[-1])] *= -1  # the last patch of the middle frame
    diff = changed(base, outputs(model, edited))
    assert diff[0, f2].all(), "every patch of the frame sees its last patch"
    assert not diff[0, : int(f2[0])].any(), "the first frame and the action before are unchanged"
    assert diff[0, f3].all(), "the next frame sees it"
    assert not diff[1].any()


# ------------------------------------------------------------------ inputs and losses


def test_frames_enter_as_noised_patches_at_their_time():
    model = build(tiny_config())
    b = video_batch(3)
    x = model.embed(b)
    vid = b.video_mask
    x_t = b.t[..., None] * b.patches + (1 - b.t[..., None]) * b.noise
    expected = model.image_in.proj(x_t) + model.image_in.time(b.t)
    torch.testing.assert_close(x[vid], expected[vid])


def test_video_loss_is_its_own_per_frame_flow_mean():
    cfg = dataclasses.replace(tiny_config(), image_loss_weight=2.0)
    model = build(cfg)
    b = video_batch(4)
    out = model(b)
    target = b.patches - b.noise
    sq = ((out.image_pred - target) ** 2).detach()
    vid, img = b.image_loss & b.video_mask, b.image_loss & b.image_mask
    assert out.video_count == 4 * M and out.image_count == M  # clean context frames excluded
    torch.testing.assert_close(out.video_loss, sq[vid].mean())
    torch.testing.assert_close(out.image_loss, sq[img].mean())
    torch.testing.assert_close(
        out.loss, out.text_loss + 2.0 * (out.image_loss + out.video_loss) + out.aux_loss
    )
    no_video = dataclasses.replace(b, image_loss=b.image_loss & ~b.video_mask)
    assert model(no_video).video_loss.item() == 0.0 and model(no_video).video_count == 0


# ------------------------------------------------------------------ video as a modality


def _meta(b):
    n = b.modality.numel()
    return TokenMeta(b.modality.reshape(-1), b.doc_kind.reshape(-1), b.t.reshape(-1),
                     torch.ones(n, dtype=torch.bool))  # fmt: skip


def test_modality_ffn_video_own_or_image():
    b = video_batch(5)
    meta = _meta(b)
    vid = meta.modality_T == Modality.VIDEO
    x = torch.randn(meta.modality_T.numel(), 32)
    own = build(tiny_config(kind="modality", video_ffn="own")).blocks[0].ffn
    assert own.experts.num_experts == 3
    before, _ = own(x, meta)
    with torch.no_grad():
        own.experts.w_down_EHD[2].zero_()  # the video FFN
    after, _ = own(x, meta)
    assert torch.all(after[vid] == 0) and (before[vid] != 0).any()
    assert torch.equal(after[~vid], before[~vid])
    shared = build(tiny_config(kind="modality")).blocks[0].ffn
    assert shared.experts.num_experts == 2
    as_image = dataclasses.replace(meta, modality_T=meta.modality_T.clamp(max=1))
    assert torch.equal(shared(x, meta)[0], shared(x, as_image)[0])


@pytest.mark.parametrize("video_ffn,lo,hi", [("own", 8, 12), ("image", 6, 12)])
def test_moe_groups_route_video_in_its_group(video_ffn, lo, hi):
    cfg = moe_config(experts=12, groups="modality", video_ffn=video_ffn, shared="per_modality",
                     granularity=4)  # fmt: skip
    moe = build(cfg).blocks[0].ffn
    assert moe.shared.experts.num_experts == (3 if video_ffn == "own" else 2)
    b = video_batch(6)
    meta = _meta(b)
    x = torch.randn(meta.modality_T.numel(), 32)
    _, _, expert_TK, _ = moe.route(x, meta)
    vid = meta.modality_T == Modality.VIDEO
    assert ((expert_TK[vid] >= lo) & (expert_TK[vid] < hi)).all()
    text = meta.modality_T == Modality.TEXT
    per_group = 12 // (3 if video_ffn == "own" else 2)
    assert (expert_TK[text] < per_group).all()
    y, aux = moe(x, meta)
    assert y.shape == x.shape and torch.isfinite(aux)


def test_routing_stats_count_video_tokens_in_their_own_row():
    model = build(moe_config())
    b = video_batch(7)
    with torch.no_grad():
        model(b)
    real = b.doc_kind != DocKind.PAD
    counts = [int((real & (b.modality == m)).sum()) for m in Modality]
    for layer, s in model.routing_stats().items():
        k = model.moe_blocks()[layer].top_k
        assert s["tokens"].tolist() == counts and counts[Modality.VIDEO] == 6 * M
        assert s["modality"].sum(1).tolist() == [c * k for c in counts]
        assert int(s["doc_kind"][DocKind.ACTION_VIDEO].sum()) > 0
        assert int(s["time"].sum()) == counts[Modality.IMAGE] * k  # flow-time bins: images


@pytest.mark.parametrize("kind", ["modality", "moe-shared"])
def test_a_video_ffn_of_its_own_adds_total_not_active_params(kind):
    def cfg(video_ffn):
        if kind == "modality":
            return tiny_config(kind="modality", video_ffn=video_ffn)
        return moe_config(granularity=4, experts=16, shared="per_modality", video_ffn=video_ffn)

    image, own = build(cfg("image")), build(cfg("own"))
    width = 64 if kind == "modality" else 16  # one FFN of width F, or one shared expert F/G
    assert own.num_params(active=False) - image.num_params(active=False) == 2 * 3 * 32 * width
    assert own.num_params(active=True) == image.num_params(active=True)
    assert param_breakdown(own)["ffn_active"] == param_breakdown(image)["ffn_active"]


@pytest.mark.parametrize(
    "cfg",
    [tiny_config(video_ffn="own"), tiny_config(kind="modality", video_ffn="own"),
     moe_config(experts=12, groups="modality", video_ffn="own"),
     moe_config(shared="per_modality", video_ffn="own")],
    ids=["dense", "modality", "moe-groups", "moe-shared"],
)  # fmt: skip
def test_video_options_forward_backward(cfg):
    model = build(cfg)
    out = model(video_batch(8))
    out.loss.backward()
    assert out.video_loss.item() > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------ patch positions


def test_index_in_block_counts_patches_from_each_blocks_start():
    b = video_batch(9)
    idx = index_in_block(b.image_id)
    for row in range(2):
        for f in frame_positions(b, row):
            assert idx[row, f].tolist() == list(range(M))
    assert (idx[~b.visual_mask] == 0).all()


def test_patch_positions_option():
    b = video_batch(10)
    off, on = build(tiny_config()), build(tiny_config(patch_positions=True))
    assert off.patch_pos is None
    assert on.num_params(active=False) - off.num_params(active=False) == 32 * 32
    assert param_breakdown(on)["image_in"] - param_breakdown(off)["image_in"] == 32 * 32
    x = on.embed(b)
    vis = b.visual_mask
    x_t = b.t[..., None] * b.patches + (1 - b.t[..., None]) * b.noise
    added = (x - on.image_in.proj(x_t) - on.image_in.time(b.t))[vis].view(-1, M, 32)
    torch.testing.assert_close(added, added[:1].expand_as(added))  # patch j: one vector
    assert not torch.allclose(added[0, 0], added[0, 1])
    torch.testing.assert_close(x[~vis], on.tok_embed(b.tokens)[~vis])
    on(b).loss.backward()
    assert on.patch_pos.proj.weight.grad.abs().sum() > 0
