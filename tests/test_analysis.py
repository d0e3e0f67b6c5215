"""Modality tax, expert specialisation and activation sparsity on hand-built numbers."""

import json
import math

import numpy as np
import pytest
import torch

from moesaic.analysis import sparsity
from moesaic.analysis import specialization as spec
from moesaic.analysis.tax import (
    HEADLINE_KEYS,
    MetricSpec,
    modality_tax,
    tax_cell,
    time_bin_metrics,
)
from moesaic.jsonsafe import json_safe

# ------------------------------------------------------------------------------------ tax


def test_modality_tax_sign_and_scale():
    assert modality_tax(2.2, 2.0) == pytest.approx(10.0)  # joint worse: competition
    assert modality_tax(1.8, 2.0) == pytest.approx(-10.0)  # joint better: synergy
    assert modality_tax(2.0, 2.0) == 0.0


def test_modality_tax_higher_is_better_flips_sign():
    # accuracy 0.5 unimodal, 0.4 joint: joint is worse, so the tax is positive
    assert modality_tax(0.4, 0.5, higher_is_better=True) == pytest.approx(20.0)
    assert modality_tax(0.6, 0.5, higher_is_better=True) == pytest.approx(-20.0)


@pytest.mark.parametrize("j,u", [(1.0, 0.0), (float("nan"), 1.0), (1.0, float("inf"))])
def test_modality_tax_undefined(j, u):
    assert math.isnan(modality_tax(j, u))


def test_tax_cell_pairs_seeds_and_skips_joint_only_tax():
    text = MetricSpec("text/text", "text", "text")
    cell = tax_cell(text, [2.0, 4.0], [2.2, 4.0])
    assert cell.tax.values == pytest.approx((10.0, 0.0))  # per seed, not of the means
    assert cell.tax.mean == pytest.approx(5.0)
    assert cell.delta.values == pytest.approx((0.2, 0.0))  # nats, beside the percentage
    # 95 % t-interval of [10, 0]: 5 ± 12.706 · 5 (t(0.975, 1) = 12.706, se = 7.071 / √2)
    assert (cell.tax.ci_low, cell.tax.ci_high) == pytest.approx((5 - 63.53, 5 + 63.53), abs=0.01)
    cap = tax_cell(MetricSpec("caption/text", "caption", None), [], [1.5, 1.7])
    assert cap.tax.n == 0 and cap.to_dict()["tax"] is None and cap.joint.mean == 1.6
    missing = tax_cell(text, [None, 4.0], [2.2, 4.4])  # a seed without its unimodal run
    assert missing.tax.values[0] != missing.tax.values[0] and missing.tax.n == 1
    assert json.dumps(json_safe(missing.to_dict()), allow_nan=False)
    with pytest.raises(ValueError):
        tax_cell(text, [1.0], [1.0, 2.0])


def test_tax_cell_score_metric_flips_sign():
    acc = MetricSpec("tasks/t2i_accuracy", "t2i accuracy", "image", higher_is_better=True)
    assert tax_cell(acc, [0.5], [0.4]).tax.mean == pytest.approx(20.0)
    assert tax_cell(acc, [0.5], [0.4]).delta.mean == pytest.approx(-0.1)


def test_headline_metrics_and_time_bins():
    assert HEADLINE_KEYS == (
        "text/text",
        "ood_text/text",
        "knowledge/text",
        "image/image",
        "image_uncond/image",
    )
    bins = time_bin_metrics(8)
    assert [m.key for m in bins[:2]] == ["image/image_t0", "image/image_t1"]
    assert all(m.modality == "image" and not m.headline for m in bins)


# ---------------------------------------------------------------------- specialisation


def _stats(modality, tokens, doc_kind=None, time=None):
    modality = np.asarray(modality)
    E = modality.shape[1]
    return {
        "modality": modality,
        "tokens": np.asarray(tokens),
        "doc_kind": np.zeros((5, E)) if doc_kind is None else np.asarray(doc_kind),
        "time": np.zeros((10, E)) if time is None else np.asarray(time),
    }


def test_specialization_scores_hand_built():
    # k = 2; 10 text tokens (20 assignments), 5 image tokens (10 assignments); 4 experts
    modality = [[10, 8, 2, 0], [0, 2, 3, 5]]
    s = spec.specialization_scores(modality, [10, 5], k=2)
    # R_text = [.5, .4, .1, 0], R_image = [0, .2, .3, .5]
    assert s == pytest.approx([1.0, 1 / 3, -0.5, -1.0])
    c = spec.classify(s)
    assert c["counts"] == {"text": 1, "image": 1, "shared": 2}  # -0.5 exactly is shared
    assert spec.infer_k(_stats(modality, [10, 5])) == pytest.approx(2.0)


def test_specialization_normalises_by_token_counts():
    # Same per-modality shares with 10x more text tokens: S must not change.
    s1 = spec.specialization_scores([[5, 5], [1, 9]], [10, 10], k=1)
    s2 = spec.specialization_scores([[50, 50], [1, 9]], [100, 10], k=1)
    assert s1 == pytest.approx(s2)


def test_specialization_undefined_cases():
    s = spec.specialization_scores([[3, 0, 1], [1, 0, 3]], [4, 4], k=1)
    assert math.isnan(s[1]) and s[0] == pytest.approx(0.5)
    c = spec.classify(s)
    assert c["unused"] == 1 and sum(c["counts"].values()) == 2
    only_text = spec.specialization_scores([[3, 1], [0, 0]], [4, 0], k=1)
    assert np.isnan(only_text).all()


def test_null_fractions_of_modality_blind_routing_by_hand():
    """2 experts of equal load, one text and one image assignment, k = 1: both on one expert
    (p 1/2) leaves it shared and the other unused; on different experts (p 1/2) one is a text
    and one an image expert. Expected fractions: text 1/4, image 1/4, shared 1/2."""
    null = spec.null_fractions([[1, 0], [0, 1]], [1, 1], 1.0, draws=4000, seed=3)
    assert null == pytest.approx({"text": 0.25, "image": 0.25, "shared": 0.5}, abs=0.02)
    assert spec.null_fractions([[1, 0], [0, 1]], [1, 1], 1.0, draws=50, seed=3) == (
        spec.null_fractions([[1, 0], [0, 1]], [1, 1], 1.0, draws=50, seed=3)
    )
    # many tokens: blind routing looks shared; the observed perfectly split routing does not
    big = spec.null_fractions([[5000, 0], [0, 5000]], [5000, 5000], 1.0, draws=20)
    assert big["shared"] == pytest.approx(1.0)
    assert spec.classify(spec.specialization_scores([[5000, 0], [0, 5000]], [5000, 5000], 1.0))[
        "fractions"
    ] == {"text": 0.5, "image": 0.5, "shared": 0.0}
    assert math.isnan(spec.null_fractions([[1, 0], [0, 0]], [1, 0], 1.0)["text"])


def test_entropy_load_and_correlation():
    h, hn = spec.entropy([5, 5, 5, 5])
    assert h == pytest.approx(math.log(4)) and hn == pytest.approx(1.0)
    assert spec.entropy([0, 7, 0, 0]) == (0.0, 0.0)
    assert spec.load_ratio([1, 1, 1, 1]) == 1.0 and spec.load_ratio([0, 0, 0, 8]) == 4.0
    dk = np.zeros((5, 4))
    dk[2] = [1, 2, 3, 4]  # IMAGE_CAPTION
    dk[1] = [2, 4, 6, 8]  # CAPTION_IMAGE: proportional usage -> r = 1
    assert spec.understanding_generation_corr(dk) == pytest.approx(1.0)
    dk[1] = [4, 3, 2, 1]
    assert spec.understanding_generation_corr(dk) == pytest.approx(-1.0)
    dk[1] = 0
    assert math.isnan(spec.understanding_generation_corr(dk))


def test_time_cv():
    t = np.zeros((10, 2))
    t[:, 0] = 10
    t[:, 1] = 30  # expert shares 0.25 / 0.75 in every bin: no time specialisation
    assert spec.time_cv_per_expert(t) == pytest.approx([0.0, 0.0])
    t = np.zeros((10, 2))
    t[0] = [10, 0]
    t[1] = [0, 10]  # bins 2..9 empty and skipped; each expert 1 in one bin, 0 in the other
    assert spec.time_cv_per_expert(t) == pytest.approx([1.0, 1.0])
    t[1] = 0
    assert np.isnan(spec.time_cv_per_expert(t)).all()  # one non-empty bin: undefined


def test_routing_specialization_layers_and_json():
    time = np.zeros((10, 4))
    time[3] = [0, 0, 2, 2]
    time[6] = [0, 0, 1, 3]
    layer = _stats([[10, 8, 2, 0], [0, 2, 3, 5]], [10, 5], time=time)
    out = spec.routing_specialization({"1": layer, "0": json_safe(layer)}, k=2)
    assert list(out["layers"]) == ["0", "1"]
    l0 = out["layers"]["0"]
    assert l0["classes"]["fractions"]["image"] == pytest.approx(0.25)
    assert l0["max_mean_load"] == pytest.approx(10 / 7.5)
    # expert 2: shares 0.5, 0.25 -> cv 1/3; expert 3: 0.5, 0.75 -> 0.2; experts 0, 1 unused
    assert l0["time_cv"] == pytest.approx((1 / 3 + 0.2) / 2)
    assert l0["time_cv_image_experts"] == pytest.approx(0.2)  # expert 3 only (S = -1)
    layers, mat = spec.specialization_matrix(json_safe(out))
    assert layers == [0, 1] and mat.shape == (2, 4)
    assert json.dumps(json_safe(out), allow_nan=False)


# ---------------------------------------------------------------------------- sparsity


@pytest.mark.parametrize("d", [8, 64, 200])
def test_sparsity_extremes(d):
    one_hot = torch.zeros(d)
    one_hot[3] = -2.5  # sign does not matter
    uniform = torch.full((d,), 0.7)
    m = sparsity.sparsity_metrics(torch.stack([one_hot, uniform]))
    for pct in (1, 5, 10):
        k = sparsity.topk_count(d, pct)
        assert m[f"top{pct}_mass"].tolist() == pytest.approx([1.0, k / d])
    assert m["l0_fraction"].tolist() == pytest.approx([1 / d, 0.0])
    assert m["gini"].tolist() == pytest.approx([(d - 1) / d, 0.0])
    assert m["eff_rank_ratio"].tolist() == pytest.approx([1 / d, 1.0])


def test_sparsity_known_middle_case_and_zero_vector():
    h = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    m = sparsity.sparsity_metrics(h)
    assert m["eff_rank_ratio"][0].item() == pytest.approx(0.5)  # two equal entries of four
    assert m["gini"][0].item() == pytest.approx(0.5)
    assert m["top10_mass"][0].item() == pytest.approx(0.5)
    assert all(math.isnan(v[1].item()) for v in m.values())
    s = sparsity.summarize(h)
    assert s["gini"] == pytest.approx(0.5) and s["vectors"] == 2


def test_sparsity_vectorised_over_leading_dims_and_numpy():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 5, 16))
    m = sparsity.sparsity_metrics(h)
    assert m["gini"].shape == (15,)
    single = sparsity.sparsity_metrics(h[1, 2])
    assert single["gini"].item() == pytest.approx(m["gini"][7].item())
    assert sparsity.topk_count(100, 1) == 1 and sparsity.topk_count(101, 1) == 2


def test_sparsity_compare():
    a = [{k: 0.1 for k in sparsity.METRICS}]
    b = [{k: 0.3 for k in sparsity.METRICS}]
    assert sparsity.compare({"text": a, "ood": b}, "text", "ood")[0]["gini"] == pytest.approx(0.2)


def test_select_positions_last_of_each_span():
    from moesaic.analysis.runs import select_positions
    from moesaic.batch import Batch

    doc_id = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2]])
    modality = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 0, 0]])
    doc_kind = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 4, 4]])  # text, caption->image, PAD
    z = torch.zeros(1, 9)
    batch = Batch(
        tokens=z.long(), targets=z.long(), patches=z.unsqueeze(-1), noise=z.unsqueeze(-1),
        t=z, image_loss=z.bool(), modality=modality, image_id=z.long(), doc_id=doc_id,
        doc_kind=doc_kind,
    )  # fmt: skip
    last_text = select_positions(batch, 0, "last")[0].nonzero().flatten().tolist()
    assert last_text == [2, 3, 6]  # end of doc 0, caption of doc 1, eoi of doc 1; no padding
    assert select_positions(batch, 1, "last")[0].nonzero().flatten().tolist() == [5]
    assert int(select_positions(batch, 0, "all").sum()) == 5
