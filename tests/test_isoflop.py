"""The IsoFLOP experiment: runs trained to their FLOP budgets, the approach-2 fits and their
bootstrap on synthetic laws, invalid study fields, reuse when a budget is added, and the smoke
study end to end against the runs' own summaries."""

import json
import math

import numpy as np
import pytest

from moesaic.analysis import scaling
from moesaic.cli import main
from moesaic.errors import ConfigError
from moesaic.experiments.engine import run_config
from moesaic.experiments.isoflop import (
    EXPERIMENT,
    PRESETS,
    IsoFlopConfig,
    frontier,
    model_sizes,
    verdict,
)
from moesaic.experiments.study import load_study


def study(*overrides):
    return load_study(IsoFlopConfig, PRESETS, None, "smoke", list(overrides))


# ----------------------------------------------------------------------------- fits


def chinchilla_points(budgets, alpha=0.34, beta=0.28, noise=0.0, seeds=1, span=1.0, rng=None):
    """Losses from L = E + A/N^α + B/D^β with D = C / (6N), on grids of 7 sizes centred (in
    ln N) on each budget's true optimum. Then N_opt ∝ C^(β/(α+β)), D_opt ∝ C^(α/(α+β))."""
    e, a, b = 1.69, 406.4, 410.7
    g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
    n_opt = g * (np.asarray(budgets) / 6) ** (beta / (alpha + beta))
    n = n_opt[:, None] * np.logspace(-span, span, 7)[None]
    d = np.asarray(budgets)[:, None] / (6 * n)
    loss = e + a / n**alpha + b / d**beta
    rng = rng or np.random.default_rng(0)
    loss = loss[..., None] + noise * rng.standard_normal((*loss.shape, seeds))
    return scaling.IsoFlopPoints.of(budgets, n, d, loss)


@pytest.mark.parametrize("alpha, beta", [(0.34, 0.28), (0.3, 0.4)])
def test_fit_recovers_known_exponents(alpha, beta):
    budgets = [1e18, 3e18, 1e19, 3e19]
    pts = chinchilla_points(budgets, alpha, beta, noise=0.003, seeds=3)
    fit = scaling.isoflop_fit(pts)
    assert fit["a"] == pytest.approx(beta / (alpha + beta), abs=0.03)
    assert fit["b"] == pytest.approx(alpha / (alpha + beta), abs=0.03)
    assert fit["bracketed"]
    for k, per_budget in enumerate(fit["budgets"]):
        true_n = pts.params_BI[k, 3]  # the centre of the grid
        assert per_budget["n_opt"] == pytest.approx(true_n, rel=0.25)
        # the fitted parabola passes through the seed means
        x = np.log(pts.params_BI[k])
        got = scaling.parabola_value(per_budget["parabola_n"], x)
        assert np.abs(got - pts.loss_BIS[k].mean(axis=1)).max() < 0.02


def parabola_study(rng, a=0.5, seeds=3, sizes=5, noise=0.02):
    """One simulated study whose losses are exactly parabolic in ln N around ln N_opt =
    a·ln C + const, plus Gaussian seed noise; one fixed grid of sizes for every budget."""
    c = np.array([1e10, 3e10, 1e11])
    x_opt = a * np.log(c) - 6.0
    x = np.tile(np.linspace(x_opt[0] - 1.2, x_opt[-1] + 1.2, sizes), (3, 1))
    y = 3.0 - 0.1 * np.log(c)[:, None] + 0.05 * (x - x_opt[:, None]) ** 2
    loss = y[..., None] + noise * rng.standard_normal((3, sizes, seeds))
    return scaling.IsoFlopPoints.of(c, np.exp(x), c[:, None] / (6 * np.exp(x)), loss)


def test_bootstrap_intervals_cover_the_true_exponent():
    """95 % intervals of 100 simulated studies contain the true a (and b = 1 − a) in >= 85 %."""
    rng = np.random.default_rng(7)
    hits_a = hits_b = 0
    for i in range(100):
        boot = scaling.bootstrap_isoflop({"g": parabola_study(rng)}, 200, seed=i)["g"]
        low, high = scaling.percentile_interval(boot["a"])
        hits_a += low <= 0.5 <= high
        low, high = scaling.percentile_interval(boot["b"])
        hits_b += low <= 0.5 <= high
    assert hits_a >= 85 and hits_b >= 85


def test_leaving_one_size_out_refits_without_that_size():
    exact = parabola_study(np.random.default_rng(0), noise=0.0)  # exactly parabolic curves
    out = scaling.leave_one_size_out(exact)
    assert len(out) == 5
    assert all(v["a"] == pytest.approx(0.5, abs=1e-9) for v in out)  # any 4 sizes fit exactly
    c = np.array([1e18, 1e19, 1e20])  # a Chinchilla law on one fixed grid: not parabolic
    n = np.tile(np.logspace(7.5, 10.5, 7), (3, 1))
    d = c[:, None] / (6 * n)
    loss = 1.69 + 406.4 / n**0.34 + 410.7 / d**0.28
    law = scaling.IsoFlopPoints.of(c, n, d, loss[..., None])
    out = scaling.leave_one_size_out(law)
    for drop, got in enumerate(out):
        keep = [i for i in range(7) if i != drop]
        sub = scaling.IsoFlopPoints(law.budgets_B, law.params_BI[:, keep],
                                    law.tokens_BI[:, keep], law.loss_BIS[:, keep])  # fmt: skip
        assert got["a"] == pytest.approx(scaling.isoflop_fit(sub)["a"])
    assert max(v["a"] for v in out) - min(v["a"] for v in out) > 1e-3
    three = scaling.IsoFlopPoints(law.budgets_B, law.params_BI[:, :3], law.tokens_BI[:, :3],
                                  law.loss_BIS[:, :3])  # fmt: skip
    assert scaling.leave_one_size_out(three) == []


def test_bootstrap_is_seeded_and_pairs_seeds_across_groups():
    rng = np.random.default_rng(0)
    pts = parabola_study(rng)
    one = scaling.bootstrap_isoflop({"x": pts, "y": pts}, 50, seed=3)
    two = scaling.bootstrap_isoflop({"x": pts, "y": pts}, 50, seed=3)
    assert np.array_equal(one["x"]["a"], two["x"]["a"])
    other = scaling.bootstrap_isoflop({"x": pts, "y": pts}, 50, seed=4)
    assert not np.array_equal(one["x"]["a"], other["x"]["a"])
    # one seed draw for all groups: with no residuals (3 sizes) identical groups agree exactly
    three = parabola_study(rng, sizes=3)
    boot = scaling.bootstrap_isoflop({"x": three, "y": three}, 50, seed=3)
    assert np.array_equal(boot["x"]["a"], boot["y"]["a"])
    assert boot["x"]["a"].std() > 0  # the seeds still vary


def test_parabola_minimum_outside_the_sizes_is_an_edge():
    x = np.log(np.array([1e3, 1e4, 1e5, 1e6]))
    falling = 5.0 - 0.1 * (x - x[0])  # still falling at the largest size: optimum beyond it
    bowl = 0.05 * (x - np.log(3e4)) ** 2
    concave = -bowl
    coef = scaling.fit_parabolas(x, np.stack([falling + 1e-3 * (x - x.mean()) ** 2, bowl, concave]))
    x_opt, y_opt, interior = scaling.parabola_minima(x, coef)
    assert interior.tolist() == [False, True, False]
    assert x_opt[0] == pytest.approx(x[-1])
    assert x_opt[1] == pytest.approx(np.log(3e4))
    assert y_opt[1] == pytest.approx(0.0, abs=1e-9)
    assert x_opt[2] in (pytest.approx(x[0]), pytest.approx(x[-1]))


def test_frontier_is_the_lower_envelope():
    def row(flops, loss, size):
        return {"train_flops": [flops], "loss": {"mean": loss}, "size": size, "budget": flops,
                "params_n": 1}  # fmt: skip

    rows = [row(1e9, 3.0, "a"), row(1e9, 2.8, "b"), row(2e9, 2.9, "c"), row(4e9, 2.5, "d")]
    env = frontier(rows)
    assert [(e["flops"], e["loss"], e["size"]) for e in env] == [
        (1e9, 2.8, "b"),
        (4e9, 2.5, "d"),
    ]


@pytest.mark.parametrize(
    "ci, paper, bracketed, want",
    [
        ([0.02, 0.2], 0.1, True, "matches"),
        ([-0.2, -0.01], 0.1, True, "differs"),
        ([-0.03, 0.05], 0.1, True, "differs"),  # contains 0, excludes the paper's 0.10
        ([-0.05, 0.15], 0.1, True, "inconclusive"),
        ([0.02, 0.2], 0.1, False, "inconclusive"),
        ([0.1, 0.1], 0.1, True, "inconclusive"),
    ],
)
def test_verdict(ci, paper, bracketed, want):
    stat = {"estimate": sum(ci) / 2, "ci95": ci}
    assert verdict(stat, paper, bracketed, "gap")["verdict"] == want


# ----------------------------------------------------------------------------- the plan


def test_every_run_takes_its_budget_in_steps(tmp_path):
    s = study("study.budgets=[5e8, 1e9, 3.3e9]")
    specs = EXPERIMENT.plan(s, tmp_path, print)
    assert len(specs) == 3 * 3 * 2 * 2  # budgets × sizes × arms × modalities
    for spec in specs:
        cfg = run_config(s, spec, tmp_path)
        sizes = model_sizes(cfg)
        per_step = sizes["flops_per_token"] * cfg.data.batch_size * cfg.data.seq_len
        assert abs(cfg.train.steps - spec.tag("budget") / per_step) <= 1, spec.name
        assert cfg.train.warmup == round(0.05 * cfg.train.steps)
        width, layers = (int(v) for v in spec.tag("size").split("x"))
        assert (cfg.model.dim, cfg.model.layers, cfg.model.heads) == (width, layers, width // 16)
        assert cfg.model.ffn.hidden == 4 * width and not cfg.data.caption_loss
        mix = {"text": 1.0} if spec.tag("modality") == "text" else {"caption_image": 0.75,
                                                                      "image": 0.25}  # fmt: skip
        assert cfg.data.mix == mix
        assert cfg.model.ffn.kind == ("moe" if spec.tag("arm") == "moe" else "dense")


def test_quick_preset_plans_every_run_to_its_budget(tmp_path):
    s = load_study(IsoFlopConfig, PRESETS, None, "quick", [])
    specs = EXPERIMENT.plan(s, tmp_path, print)
    assert len(specs) == 3 * 6 * 2 * 2 * 2  # budgets × sizes × arms × modalities × seeds
    total = 0.0
    for spec in specs:
        cfg = run_config(s, spec, tmp_path)
        assert (cfg.train.lr, cfg.data.batch_size, cfg.data.seq_len) == (1e-2, 16, 96)
        per_step = model_sizes(cfg)["flops_per_token"] * cfg.data.batch_size * cfg.data.seq_len
        assert abs(cfg.train.steps - spec.tag("budget") / per_step) <= 1, spec.name
        total += cfg.train.steps * per_step
    assert total == pytest.approx(sum(s.budgets) * 6 * 2 * 2 * 2, rel=1e-3)


def test_adding_a_budget_keeps_every_run(tmp_path):
    before = {s.name: s for s in EXPERIMENT.plan(study(), tmp_path, print)}
    after = {s.name: s for s in EXPERIMENT.plan(study("study.budgets=[5e8, 1e9, 2e9]"),
                                                   tmp_path, print)}  # fmt: skip
    assert set(before) < set(after) and len(after) == len(before) * 3 // 2
    for name, spec in before.items():
        assert after[name].overrides == spec.overrides


def test_params_n_leaves_out_embeddings_and_heads(tmp_path):
    s = study()
    dense, moe = (
        next(sp for sp in EXPERIMENT.plan(s, tmp_path, print)
             if sp.tag("arm") == arm and sp.tag("size") == "32x1")
        for arm in ("dense", "moe")
    )  # fmt: skip
    d = model_sizes(run_config(s, dense, tmp_path))
    m = model_sizes(run_config(s, moe, tmp_path))
    dim, hidden = 32, 128
    norms = 2 * dim + 2 * (dim // 2) + dim  # block norms, q/k norms, final norm
    assert d["params_n"] == 4 * dim * dim + 3 * dim * hidden + norms
    # MoE: the same active FFN weights plus the router (E × dim)
    assert m["params_n"] - d["params_n"] == 4 * dim
    assert m["params_active"] - d["params_active"] == 4 * dim


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("study.budgets=[]", "study.budgets is empty"),
        ("study.budgets=[1e9]", "has one budget"),
        ("study.budgets=[1e9, -1]", "study.budgets has -1"),
        ("study.budgets=[1e9, 1.0001e9]", "repeats a budget"),
        ("study.sizes=[16x1, 32x1]", "needs at least 3"),
        ("study.sizes=[16x1, 32x1, 48-1]", "'48-1'; write each size as WIDTHxLAYERS"),
        ("study.sizes=[16x1, 32x1, 40x1]", "width 40 is not a multiple of study.head_dim=16"),
        ("study.sizes=[16x1, 32x1, 16x1]", "repeats '16x1'"),
        ("study.modalities=[audio]", "study.modalities has 'audio'"),
        ("study.arms=[dense, dense]", "repeats an arm"),
        ("study.warmup_fraction=1.5", "study.warmup_fraction=1.5"),
        ("study.image_mix={text: 1}", "study.image_mix"),
    ],
)
def test_invalid_isoflop_fields(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        study(override)


def test_budget_below_one_step_stops_with_one_line(tmp_path, capsys):
    args = ["compete", "--experiment", "isoflop", "--preset", "smoke", "--out", str(tmp_path),
            "study.budgets=[1e6, 1e9]"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: study.budgets has 1e+06 FLOPs")
    assert "size 16x1" in err and "raise the budget to at least" in err
    assert not (tmp_path / "isoflop-smoke" / "runs").exists()


# ----------------------------------------------------------------------------- end to end


def test_isoflop_smoke_study(tmp_path, capsys):
    args = ["compete", "--experiment", "isoflop", "--preset", "smoke", "--out", str(tmp_path)]
    assert main(args) == 0
    root = tmp_path / "isoflop-smoke"
    summary = json.loads((root / "summary.json").read_text())
    assert summary["experiment"] == "isoflop" and summary["budgets"] == [5e8, 1e9]
    total = 0.0
    for modality, key in (("text", "text/text"), ("image", "image/image")):
        for arm in ("dense", "moe"):
            rows = summary["points"][modality][arm]
            assert len(rows) == 6
            for p in rows:
                (name,) = p["runs"]
                run = json.loads((root / "runs" / name / "summary.json").read_text())
                assert p["loss"]["values"] == [run["eval"][key]]
                assert p["steps"] == [run["step"]] and p["tokens"] == [run["tokens"]]
                assert p["train_flops"] == [run["train_flops"]]
                assert p["params_active"] == run["params_active"]
                per_step = run["flops_per_token"] * run["tokens"] / run["step"]
                assert abs(run["step"] - p["budget"] / per_step) <= 1
                total += run["train_flops"]
            # the frontier's last point is the lowest loss of any run
            env = summary["frontier"][modality][arm]
            assert env[-1]["loss"] == min(p["loss"]["mean"] for p in rows)
            # the summary's fit is the fit of the runs' own losses
            by_budget = [[p for p in rows if p["budget"] == b] for b in summary["budgets"]]
            pts = scaling.IsoFlopPoints.of(
                summary["budgets"],
                [[p["params_n"] for p in g] for g in by_budget],
                [[p["tokens"][0] for p in g] for g in by_budget],
                [[[p["loss"]["values"][0]] for p in g] for g in by_budget],
            )
            fit = scaling.isoflop_fit(pts)
            got = summary["fits"][modality][arm]
            assert got["a"]["estimate"] == pytest.approx(fit["a"])
            assert got["b"]["estimate"] == pytest.approx(fit["b"])
            assert got["a"]["resamples"] == 200
    assert summary["total_flops"] == pytest.approx(total)
    for arm in ("dense", "moe"):
        fits = summary["fits"]
        gap = fits["text"][arm]["a"]["estimate"] - fits["image"][arm]["a"]["estimate"]
        assert summary["gaps"][arm]["a"]["estimate"] == pytest.approx(gap)
    want = summary["gaps"]["dense"]["a"]["estimate"] - summary["gaps"]["moe"]["a"]["estimate"]
    assert summary["gap_differences"]["moe"]["a"]["estimate"] == pytest.approx(want)
    html = (root / "report.html").read_text()
    assert html.count("<img") == 3
    assert f"{summary['fits']['text']['dense']['a']['estimate']:.3f}" in html
    capsys.readouterr()

    # one more budget: every run of the first study is reused, only the new budget trains
    args += ["--arms", "dense", "study.budgets=[5e8, 7.5e8, 1e9]"]
    assert main(args) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    how = {ln.split()[1].rstrip(":"): ln.split()[2] for ln in lines}
    assert len(how) == 18
    assert all((v == "trained") == ("c7.5e8" in k) for k, v in how.items())
    summary = json.loads((root / "summary.json").read_text())
    assert summary["budgets"] == [5e8, 7.5e8, 1e9] and list(summary["fits"]["text"]) == ["dense"]
    assert math.isfinite(summary["fits"]["text"]["dense"]["a"]["estimate"])
    assert summary["fits"]["text"]["dense"]["one_size_out"]["a_range"] is None  # 3 sizes

    # a fourth size: each fit is also refitted without each size in turn
    capsys.readouterr()
    assert main([*args, "study.sizes=[16x1, 32x1, 48x1, 64x1]"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((root / "summary.json").read_text())
    gaps = {}
    for modality in ("text", "image"):
        rows = summary["points"][modality]["dense"]
        grid = summary["fits"][modality]["dense"]["one_size_out"]
        assert list(grid["without"]) == ["16x1", "32x1", "48x1", "64x1"]
        for size, got in grid["without"].items():
            by_budget = [[p for p in rows if p["budget"] == b and p["size"] != size]
                         for b in summary["budgets"]]  # fmt: skip
            pts = scaling.IsoFlopPoints.of(
                summary["budgets"],
                [[p["params_n"] for p in g] for g in by_budget],
                [[float(np.mean(p["tokens"])) for p in g] for g in by_budget],
                [[p["loss"]["values"] for p in g] for g in by_budget],
            )
            assert got["a"] == pytest.approx(scaling.isoflop_fit(pts)["a"])
            gaps[size] = gaps.get(size, 0.0) + (got["a"] if modality == "text" else -got["a"])
        a = [v["a"] for v in grid["without"].values()]
        assert grid["a_range"] == [min(a), max(a)]
    assert summary["gaps"]["dense"]["one_size_out_a"] == pytest.approx(
        [min(gaps.values()), max(gaps.values())]
    )
    low, high = summary["fits"]["text"]["dense"]["one_size_out"]["a_range"]
    assert f"{low:.2f}…{high:.2f}" in out
