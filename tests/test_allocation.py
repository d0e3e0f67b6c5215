"""The memory-allocation experiment: experts vs n-gram memory at fixed parameters, on the
engine; its summary against the runs' own numbers, the parameter budget, invalid fields, and
the parabola fit and verdict it reports."""

import json
import math

import numpy as np
import pytest

from moesaic.analysis.stats import parabola_fit
from moesaic.cli import main
from moesaic.config import load_config
from moesaic.errors import ConfigError
from moesaic.experiments.allocation import (
    EXPERIMENT,
    PRESETS,
    AllocationConfig,
    u_shape_verdict,
)
from moesaic.experiments.study import load_study

RHOS = (1.0, 0.75, 0.5)
SEEDS = (0, 1)


def study(*overrides):
    return load_study(AllocationConfig, PRESETS, None, "smoke", list(overrides))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("allocation")
    args = ["compete", "--experiment", "memory-allocation", "--preset", "smoke", "--out", str(out)]
    assert main(args) == 0
    root = out / "allocation-smoke"
    return root, json.loads((root / "summary.json").read_text())


def run(root, variant, rho, seed):
    path = root / "runs" / f"moe-{variant}-rho{rho:g}-s{seed}" / "summary.json"
    return json.loads(path.read_text())


def test_summary_numbers_are_the_runs_numbers(smoke):
    root, summary = smoke
    assert summary["experiment"] == "memory-allocation" and summary["rhos"] == list(RHOS)
    cell = summary["curves"]["text"]["text/text"]
    loss = {r: [run(root, "text", r, s)["eval"]["text/text"] for s in SEEDS] for r in RHOS}
    for point, rho in zip(cell["points"], RHOS, strict=True):
        assert point["loss"]["values"] == pytest.approx(loss[rho])
    for rho in RHOS[1:]:
        want = [a - b for a, b in zip(loss[rho], loss[1.0], strict=True)]
        assert cell["vs_pure"][f"{rho:g}"]["values"] == pytest.approx(want)
    means = {r: sum(v) / len(v) for r, v in loss.items()}
    assert cell["best_rho"] == min(means, key=means.get)
    x = [summary["splits"][f"{r:g}"]["realized_rho"] for r in RHOS]
    coef = np.polyfit(x, [means[r] for r in RHOS], 2)
    assert cell["fit"]["coef"] == pytest.approx(list(coef), rel=1e-6)
    # the knowledge base is on: fact recall is a curve of the text-only runs
    facts = summary["curves"]["text"]["knowledge/text"]["points"][0]["loss"]["values"]
    assert facts == pytest.approx(
        [run(root, "text", 1.0, s)["eval"]["knowledge/text"] for s in SEEDS]
    )


def test_tax_at_every_rho_and_against_pure_moe(smoke):
    root, summary = smoke

    def tax(rho, seed):
        u = run(root, "text", rho, seed)["eval"]["text/text"]
        return 100 * (run(root, "joint", rho, seed)["eval"]["text/text"] - u) / u

    points = summary["taxes"]["text/text"]
    for point, rho in zip(points, RHOS, strict=True):
        assert point["tax"]["values"] == pytest.approx([tax(rho, s) for s in SEEDS])
    diff = summary["tax_vs_pure"]["0.5"]["text/text"]["values"]
    assert diff == pytest.approx([tax(0.5, s) - tax(1.0, s) for s in SEEDS])
    assert set(summary["per_rho"]) == {"1", "0.75", "0.5"}


def test_total_and_active_parameters_held_across_rho(smoke):
    """From the runs' own summaries: total parameters plus the split's leftover equal pure
    MoE's; the active ones differ only by the memory's active part and the routers; both stay
    within the study's tolerances."""
    root, summary = smoke
    s = study()
    ref = run(root, "joint", 1.0, 0)
    dim, moe_blocks = 32, 2
    for rho in RHOS:
        split = summary["splits"][f"{rho:g}"]
        got = run(root, "joint", rho, 0)
        assert split["params_total"] == got["params_total"]
        assert got["params_total"] + split["leftover"] == ref["params_total"]
        routers = dim * moe_blocks * (split["experts"] - 8)
        assert got["params_active"] == ref["params_active"] + split["memory_active"] + routers
        assert abs(got["params_total"] / ref["params_total"] - 1) <= s.total_tolerance
        assert abs(got["params_active"] / ref["params_active"] - 1) <= s.active_tolerance
        cfg = load_config(root / "runs" / f"moe-text-rho{rho:g}-s0" / "config.yaml").model
        assert cfg.ffn.experts == split["experts"]
        assert cfg.memory.layers == ([] if rho == 1.0 else [1])
        if rho < 1.0:
            assert cfg.memory.table_rows == split["table_rows"] > 0
            assert split["memory_active"] > 0
    realized = [summary["splits"][f"{r:g}"]["realized_rho"] for r in RHOS]
    assert realized[0] == 1.0 and realized[1] == pytest.approx(0.75, abs=0.01)


def test_plan_names_every_rho_and_keeps_the_tax_grid(tmp_path):
    specs = EXPERIMENT.plan(study(), tmp_path, print)
    assert len({s.name for s in specs}) == len(specs) == 3 * 3 * 2  # ρ × variants × seeds
    joint = next(s for s in specs if s.name == "moe-joint-rho0.5-s1")
    assert "model.ffn.experts=4" in joint.overrides
    assert any(o.startswith("model.memory.table_rows=") for o in joint.overrides)
    assert any("data.parts" in o for o in joint.overrides)
    pure = next(s for s in specs if s.name == "moe-text-rho1-s0")
    assert "model.memory.layers=[]" in pure.overrides and "model.ffn.experts=8" in pure.overrides


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("study.rhos=[]", "study.rhos is empty"),
        ("study.rhos=[1.0, 1.5]", "study.rhos has 1.5; .* must be in \\(0, 1\\]"),
        ("study.rhos=[1.0, 0]", "study.rhos has 0.0; .* must be in \\(0, 1\\]"),
        ("study.rhos=[0.8, 0.5]", "lacks 1.0, the pure MoE"),
        ("study.rhos=[1.0, 0.5, 0.5]", "repeats a value"),
        ("study.rhos=[1.0, 0.01]", "leaves 0 routed experts"),
        ("study.rhos=[1.0, 0.76, 0.75]", "0.76 and 0.75 both give 6 routed experts"),
        ("study.arms=[dense]", "must name one MoE arm"),
        ("study.active_tolerance=0.001", "active parameters differ from rho=1 by"),
        ("model.memory.layers=[]", "model.memory.layers is empty"),
        ("study.match=tokens", "supports steps only"),
    ],
)
def test_invalid_allocation_fields(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        study(override)


def test_cli_stops_with_one_line(capsys, tmp_path):
    args = ["compete", "--experiment", "memory-allocation", "--preset", "smoke",
            "--out", str(tmp_path), "study.rhos=[1.0, 2]"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: study.rhos has 2.0;") and "\n" not in err
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ the fit and the verdict


def test_parabola_fit_finds_the_minimum_despite_seed_offsets():
    x = [1.0, 0.9, 0.8, 0.7, 0.6, 0.4]
    values = [[(xi - 0.72) ** 2 + offset for xi in x] for offset in (0.0, 0.3, -0.1)]
    fit = parabola_fit(x, values, n_boot=100)
    assert fit.vertex == pytest.approx(0.72) and fit.argmin == pytest.approx(0.72)
    assert fit.boot_low == pytest.approx(0.72) and fit.boot_high == pytest.approx(0.72)
    assert fit.boot_convex == 1.0 and fit.boot_inside == 1.0 and fit.n_boot == 100


def test_parabola_fit_without_interior_minimum_picks_the_lower_end():
    x = [1.0, 0.8, 0.6, 0.4]
    concave = [[-((xi - 0.55) ** 2) + 2 * s for xi in x] for s in (0, 1)]
    fit = parabola_fit(x, concave, n_boot=50)
    assert math.isnan(fit.vertex) and fit.argmin == pytest.approx(1.0)  # 1.0 is farther
    assert fit.boot_convex == 0.0 and fit.boot_inside == 0.0
    noise = ([0.01, -0.02, 0.0, 0.01], [-0.01, 0.02, 0.01, 0.0], [0, 0, -0.01, 0.02])
    noisy = [[(xi - 0.7) ** 2 + e for xi, e in zip(x, row, strict=True)] for row in noise]
    a, b = parabola_fit(x, noisy, n_boot=300, seed=1), parabola_fit(x, noisy, n_boot=300, seed=1)
    assert a == b and a.boot_low <= a.argmin <= a.boot_high  # seeded, deterministic
    with pytest.raises(ValueError, match="at least 3 distinct x"):
        parabola_fit([1.0, 0.5], [[1.0, 2.0]])


def _cell(best, diff_ci, p_holm, boot):
    points = [{"rho": r, "realized_rho": r} for r in (1.0, 0.8, 0.6, 0.4)]
    vs_pure = {"0.8": {"mean": sum(diff_ci) / 2, "ci95": diff_ci, "p_holm": p_holm}}
    return {"points": points, "best_rho": best, "vs_pure": vs_pure, "fit": {"argmin_ci95": boot}}


@pytest.mark.parametrize(
    "cell, helps, below, interior, start",
    [
        (_cell(0.8, [-0.05, -0.01], 0.01, [0.7, 0.9]), True, True, True, "U-shaped"),
        (_cell(0.8, [-0.05, -0.01], 0.01, [0.4, 0.9]), True, True, False, "memory beats"),
        (_cell(0.8, [-0.05, -0.01], 0.20, [0.7, 0.9]), False, True, True, "the best ρ < 1 is"),
        (_cell(0.8, [-0.05, 0.02], 0.50, [0.7, 0.9]), False, False, True, "no detectable"),
        (_cell(1.0, [-0.05, 0.02], 0.50, [0.9, 1.0]), False, False, False, "pure MoE"),
    ],
)
def test_u_shape_verdict(cell, helps, below, interior, start):
    v = u_shape_verdict(cell)
    assert (v["memory_helps"], v["interval_below_zero"], v["interior_minimum"]) == (
        helps,
        below,
        interior,
    )
    assert v["text"].startswith(start)
