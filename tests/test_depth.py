"""The depth-width experiment: shapes at a fixed non-embedding parameter count, on the engine;
its summary against the runs' own numbers, the shapes against the target, invalid fields."""

import dataclasses
import json

import numpy as np
import pytest

from moesaic.cli import main
from moesaic.config import load_config
from moesaic.errors import ConfigError
from moesaic.experiments.depth import (
    EXPERIMENT,
    PRESETS,
    DepthConfig,
    depth_verdict,
    fit_shape,
    nonembedding_params,
    pick_heads,
)
from moesaic.experiments.study import load_study

DEPTHS = (2, 8)
SEEDS = (0, 1)


def study(*overrides):
    return load_study(DepthConfig, PRESETS, None, "smoke", list(overrides))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("depth")
    args = ["compete", "--experiment", "depth-width", "--preset", "smoke", "--out", str(out)]
    assert main(args) == 0
    root = out / "depth-smoke"
    return root, json.loads((root / "summary.json").read_text())


def run_dir(root, arm, variant, depth, seed):
    return root / "runs" / f"{arm}-{variant}-L{depth}-s{seed}"


def loss(root, arm, variant, depth, seed, key):
    summary = json.loads((run_dir(root, arm, variant, depth, seed) / "summary.json").read_text())
    return summary["eval"][key]


@pytest.mark.parametrize("arm", ["dense", "moe"])
@pytest.mark.parametrize("variant, key", [("text", "text/text"), ("image", "image/image")])
def test_summary_numbers_are_the_runs_numbers(smoke, arm, variant, key):
    root, summary = smoke
    cell = summary["curves"][arm][variant][key]
    values = {d: [loss(root, arm, variant, d, s, key) for s in SEEDS] for d in DEPTHS}
    for point, depth in zip(cell["points"], DEPTHS, strict=True):
        assert point["depth"] == depth
        assert point["loss"]["values"] == pytest.approx(values[depth])
    slopes = [np.polyfit(np.log2(DEPTHS), [values[d][i] for d in DEPTHS], 1)[0] for i in (0, 1)]
    assert cell["slope"]["values"] == pytest.approx(slopes)
    means = {d: sum(v) / len(v) for d, v in values.items()}
    best = min(means, key=means.get)
    other = next(d for d in DEPTHS if d != best)
    assert cell["best_depth"] == best
    want = [a - b for a, b in zip(values[other], values[best], strict=True)]
    assert cell["vs_best"][str(other)]["values"] == pytest.approx(want)


def test_shapes_hold_the_non_embedding_count(smoke):
    """Each run's own model (from its config.yaml) has the target count within the tolerance,
    heads × head width = width and the study's FFN ratio; its summary's sizes are reported."""
    root, summary = smoke
    s = study()
    assert summary["target"] == {"params": 19000, "count": "active", "tolerance": s.tolerance}
    for arm in ("dense", "moe"):
        widths = []
        for shape, depth in zip(summary["shapes"][arm], DEPTHS, strict=True):
            cfg = load_config(run_dir(root, arm, "image", depth, 1) / "config.yaml").model
            total, active = nonembedding_params(cfg)
            assert (cfg.layers, cfg.dim, cfg.heads) == (depth, shape["width"], shape["heads"])
            assert cfg.heads * shape["head_dim"] == cfg.dim and shape["head_dim"] % 2 == 0
            assert cfg.ffn.hidden == s.ffn_ratio * cfg.dim
            assert (total, active) == (shape["nonembedding_total"], shape["nonembedding_active"])
            assert abs(active / s.params - 1) <= s.tolerance
            assert shape["deviation"] == pytest.approx(active / s.params - 1)
            first = json.loads((run_dir(root, arm, "text", depth, 0) / "summary.json").read_text())
            assert shape["params_total"] == first["params_total"]
            widths.append(cfg.dim)
        assert widths[0] > widths[1]  # deeper is thinner
    moe = load_config(run_dir(root, "moe", "text", 2, 0) / "config.yaml").model
    total, active = nonembedding_params(moe)
    assert total > 2 * active  # the MoE arm holds its active count; its total is larger


def test_nonembedding_count_equals_the_whole_model_minus_input_output():
    import torch

    from moesaic.model import Transformer
    from moesaic.model.params import inactive_params

    for over in (
        ["model.ffn.kind=moe", "model.ffn.every=2", "model.memory.layers=[1]"],
        ["model.ffn.kind=modality"],
        [],
    ):
        cfg = dataclasses.replace(load_config("tiny", over).model, vocab_size=300, patch_dim=48)
        with torch.device("meta"):
            model = Transformer(cfg)
        io = [model.tok_embed, model.image_in, model.text_head, model.image_head]
        total = model.num_params(active=False) - sum(p.numel() for m in io for p in m.parameters())
        assert nonembedding_params(cfg) == (total, total - inactive_params(model))


def test_fit_shape_hits_an_exact_target():
    s = study()
    shape = fit_shape(s, "dense", 8)
    exact = dataclasses.replace(s, params=shape.held)
    again = fit_shape(exact, "dense", 8)
    assert again.width == shape.width and again.deviation == 0.0
    bigger = fit_shape(dataclasses.replace(s, params=4 * shape.held), "dense", 8)
    assert bigger.width == pytest.approx(2 * shape.width, abs=s.width_step)


@pytest.mark.parametrize(
    "width, head_dim, want",
    [(80, 16, (5, 16)), (56, 16, (4, 14)), (44, 16, (2, 22)), (12, 8, (2, 6)), (48, 16, (3, 16))],
)
def test_pick_heads(width, head_dim, want):
    assert pick_heads(width, head_dim) == want


def test_plan_names_every_shape(tmp_path):
    specs = EXPERIMENT.plan(study(), tmp_path, print)
    assert len({s.name for s in specs}) == len(specs) == 2 * 2 * 2 * 2  # arms·depths·variants·seeds
    spec = next(s for s in specs if s.name == "moe-image-L8-s1")
    assert "model.layers=8" in spec.overrides and "model.dim=12" in spec.overrides
    assert "train.seed=1" in spec.overrides and "model.ffn.kind=moe" in spec.overrides


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("study.depths=[4]", "study.depths=\\[4\\] has fewer than 2 shapes"),
        ("study.depths=[]", "has fewer than 2 shapes"),
        ("study.depths=[2, 2]", "repeats a depth"),
        ("study.depths=[0, 2]", "study.depths has 0"),
        ("study.params=100", "study.params=100 is below the smallest dense model with 2 layers"),
        ("study.tolerance=0.0001", "no dense shape with 2 layers is within study.tolerance"),
        ("study.count=flops", "study.count='flops'"),
        ("study.width_step=3", "study.width_step=3 must be an even number"),
        ("study.arms=[]", "study.arms is empty"),
    ],
)
def test_invalid_depth_fields(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        study(override)


def test_cli_stops_with_one_line(capsys, tmp_path):
    args = ["compete", "--experiment", "depth-width", "--preset", "smoke", "--out", str(tmp_path),
            "study.depths=[4]"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: study.depths=[4] has fewer than 2 shapes") and "\n" not in err


@pytest.mark.parametrize(
    "ci, holm, trend, separated",
    [
        ([-0.05, -0.01], [0.01, 0.02], "deeper", True),
        ([0.01, 0.05], [0.01, 0.20], "shallower", False),
        ([-0.05, 0.01], [], "none", False),
    ],
)
def test_depth_verdict(ci, holm, trend, separated):
    cell = {
        "slope": {"ci95": ci},
        "vs_best": {str(i): {"p_holm": p} for i, p in enumerate(holm)},
        "best_depth": 8,
    }
    v = depth_verdict(cell)
    assert (v["trend"], v["best_separated"]) == (trend, separated)
    assert "lowest mean loss at 8 layers" in v["text"]
