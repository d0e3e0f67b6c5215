"""The competition study end to end on the smoke preset, resume, arms, presets, hooks."""

import json
import math
import sys
import types

import pytest
import torch
from render_check import check_rendering, find_chromium

from moesaic.analysis.tax import modality_tax
from moesaic.cli import main
from moesaic.config import load_config
from moesaic.errors import ConfigError
from moesaic.experiments.arms import ARMS, parse_arms
from moesaic.experiments.compete import (
    base_config,
    plan_runs,
    run_config,
    task_metrics,
    variant_overrides,
)
from moesaic.experiments.presets import PRESETS, load_study
from moesaic.experiments.summary import task_spec

SMOKE = ["--preset", "smoke"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    assert main(["compete", *SMOKE, "--out", str(out)]) == 0
    return out / "compete-smoke"


def _eval(run_dir):
    return json.loads((run_dir / "summary.json").read_text())["eval"]


def test_smoke_study_outputs(smoke):
    summary = json.loads((smoke / "summary.json").read_text())
    assert summary["schema"] == "moesaic-compete/1"
    assert list(summary["arms"]) == ["dense", "modality", "moe"]
    runs = smoke / "runs"
    for arm, a in summary["arms"].items():
        for variant in ("text", "image", "joint"):
            assert (runs / f"{arm}-{variant}-s0" / "summary.json").is_file()
        # the tax is recomputed here from the runs' own eval losses
        for key, variant in (("text/text", "text"), ("ood_text/text", "text"),
                             ("image/image", "image")):  # fmt: skip
            u = _eval(runs / f"{arm}-{variant}-s0")[key]
            j = _eval(runs / f"{arm}-joint-s0")[key]
            cell = a["metrics"][key]
            assert cell["tax"]["mean"] == pytest.approx(modality_tax(j, u))
            assert cell["unimodal"]["values"] == [u] and cell["joint"]["values"] == [j]
        assert a["metrics"]["caption/text"]["tax"] is None  # joint only
        diff = a["tax_minus_baseline"]["text/text"]["mean"]
        dense_tax = summary["arms"]["dense"]["metrics"]["text/text"]["tax"]["mean"]
        assert diff == pytest.approx(a["metrics"]["text/text"]["tax"]["mean"] - dense_tax)
        assert a["params_total"] >= a["params_active"] > 0
        assert a["train_flops"]["study"] == pytest.approx(
            sum(a["train_flops"][v] for v in ("text", "image", "joint"))
        )
    # matched active FFN compute, more FFN parameters for modality / moe
    ffn = {
        arm: (a["ffn_params_active"], a["ffn_params_total"]) for arm, a in summary["arms"].items()
    }
    assert ffn["dense"][0] == ffn["modality"][0] == ffn["moe"][0]
    assert ffn["dense"][1] < ffn["modality"][1] < ffn["moe"][1]
    # the joint run saw the unimodal runs' documents (up to row packing)
    ratio = summary["data"]["coverage"]["0"]["ratio"]
    assert set(ratio) == {"text", "caption_image", "image"}
    assert all(0.95 < r < 1.1 for r in ratio.values()), ratio
    assert sum(summary["data"]["coverage"]["0"]["joint_tokens"].values()) >= sum(
        summary["data"]["coverage"]["0"]["unimodal_tokens"].values()
    )
    assert summary["least_tax"]["text/text"] in summary["arms"]
    shift = summary["data"]["caption_shift"]
    assert 0 < shift["unigram_js"] <= 1 and 0 < shift["bigram_js"] <= 1
    # the MoE arm's joint run was analysed
    moe = json.loads((runs / "moe-joint-s0" / "analysis.json").read_text())
    s = [v for layer in moe["specialization"]["layers"].values() for v in layer["S"]]
    assert s and all(v is None or -1 <= v <= 1 for v in s)
    assert set(moe["sparsity"]["sets"]) == {"text", "ood_text", "image"}
    assert summary["arms"]["moe"]["specialization"]["entropy_norm"] > 0
    assert summary["arms"]["dense"]["specialization"] is None
    assert (smoke / "report.html").stat().st_size > 10_000


def test_smoke_study_runs_use_the_planned_data(smoke):
    cfgs = {v: load_config(smoke / "runs" / f"dense-{v}-s0" / "config.yaml") for v in
            ("text", "image", "joint")}  # fmt: skip
    assert cfgs["text"].data.mix == {"text": 1.0}
    assert set(cfgs["image"].data.mix) == {"caption_image", "image"}
    assert set(cfgs["joint"].data.mix) == {"text", "caption_image", "image"}
    # the joint run takes the steps its own (differently packed) stream needs for the same data
    both = cfgs["text"].train.steps + cfgs["image"].train.steps
    assert 0.8 * both <= cfgs["joint"].train.steps <= 1.2 * both
    assert not any(c.data.caption_loss for c in cfgs.values())
    moe = load_config(smoke / "runs" / "moe-joint-s0" / "config.yaml")
    assert moe.data == cfgs["joint"].data and moe.model.ffn.kind == "moe"


def test_rerun_reuses_finished_runs(smoke, capsys):
    before = json.loads((smoke / "summary.json").read_text())
    capsys.readouterr()
    assert main(["compete", *SMOKE, "--out", str(smoke.parent)]) == 0
    out = capsys.readouterr().out
    assert out.count(": reused") == 9 and "trained" not in out
    assert "report:" in out and "text CE (in-distribution)" in out
    after = json.loads((smoke / "summary.json").read_text())
    assert after["arms"]["moe"]["metrics"] == before["arms"]["moe"]["metrics"]


def test_interrupted_run_is_resumed_exactly(smoke, tmp_path, capsys):
    """A run stopped mid-way continues from its checkpoint to the uninterrupted result."""
    from moesaic.train.loop import Trainer

    study = load_study(None, "smoke", ["study.arms=[dense]"])
    study_dir = tmp_path / study.name
    spec = next(s for s in plan_runs(study, _plan(smoke)) if s.variant == "text")
    trainer = Trainer(run_config(study, spec, study_dir), spec.run_dir(study_dir))
    for _ in range(3):
        trainer.train_step()
    trainer.save_checkpoint()
    trainer.metrics.close()
    assert main(["compete", *SMOKE, "--arms", "dense", "--out", str(tmp_path)]) == 0
    assert "dense-text-s0: resumed" in capsys.readouterr().out
    assert _eval(spec.run_dir(study_dir)) == _eval(smoke / "runs" / "dense-text-s0")


def _plan(study_dir):
    return json.loads((study_dir / "data-plan.json").read_text())


def test_changed_config_is_refused(smoke):
    with pytest.raises(ConfigError, match="different configuration"):
        main_raise(["compete", *SMOKE, "--out", str(smoke.parent), "train.lr=1e-2"])


def main_raise(argv):
    """Run the command's `run` directly so that errors propagate."""
    from moesaic.cli import build_parser

    args = build_parser().parse_args(argv)
    return args._run(args)


def test_analyze_command(smoke, capsys):
    run_dir = smoke / "runs" / "moe-image-s0"
    assert main(["analyze", str(run_dir), "--tokens", "all", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "ood_text" in out
    result = json.loads((run_dir / "analysis.json").read_text())
    assert result["tokens"] == "all" and len(result["specialization"]["layers"]) == 2


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed")
def test_smoke_report_renders(smoke):
    result = check_rendering(smoke / "report.html")
    assert result.ok, result


# ----------------------------------------------------------------------- arms, presets


def test_arms_match_active_compute_and_modality_total():
    from moesaic.model import Transformer
    from moesaic.model.params import param_breakdown

    study = load_study(None, "smoke")
    parts = {}
    for name, arm in ARMS.items():
        cfg = base_config(study, [*arm.overrides(study.experts, study.granularity),
                                  "model.vocab_size=64", "model.patch_dim=48"])  # fmt: skip
        torch.manual_seed(0)
        parts[name] = param_breakdown(Transformer(cfg.model))
    active = {p["ffn_active"] for p in parts.values()}
    assert len(active) == 1, parts
    assert parts["moe-total-matched"]["ffn_total"] == parts["modality"]["ffn_total"]
    assert parts["moe"]["ffn_total"] == parts["dense"]["ffn_total"] * study.experts // (
        study.granularity
    )


def test_presets_and_overrides(tmp_path):
    for name in PRESETS:
        study = load_study(None, name)
        assert study.arms and base_config(study).model.dim > 0
    study = load_study(None, "smoke", ["study.seeds=3", "train.lr=1e-3"])
    assert study.seeds == 3 and study.overrides[-1] == "train.lr=1e-3"
    path = tmp_path / "study.yaml"
    path.write_text("preset: smoke\ntext_steps: 11\narms: [dense, moe-groups]\n")
    study = load_study(str(path))
    assert study.text_steps == 11 and study.arms == ["dense", "moe-groups"]
    assert study.overrides == PRESETS["smoke"]["overrides"]
    with pytest.raises(ConfigError, match="did you mean 'quick'"):
        load_study(None, "quik")
    with pytest.raises(ConfigError, match="unknown arm 'mo'"):
        parse_arms("dense,mo")
    with pytest.raises(ConfigError, match="image_mix"):
        load_study(None, "smoke", ["study.image_mix={text: 1.0}"])
    assert parse_arms("moe, dense,moe") == ["moe", "dense"]


def test_variant_overrides_pair_seeds():
    study = load_study(None, "smoke")
    text = variant_overrides(study, "text", 3)
    assert "train.seed=3" in text and "data.seed=3" in text
    joint = variant_overrides(study, "joint", 3, {"mix": {"text": 10.0, "image": 5.0}, "steps": 7})
    assert "train.steps=7" in joint and 'data.mix={"image": 5.0, "text": 10.0}' in joint
    with pytest.raises(ValueError):
        variant_overrides(study, "joint", 3)


# ----------------------------------------------------------------------- task hook


def test_task_hook(smoke, monkeypatch):
    fake = types.ModuleType("moesaic.evaluate.tasks")
    calls = []

    def run_tasks(run, tasks, n):
        calls.append((run.run_dir.name, tuple(tasks), n))
        return {"t2i/colour": 0.5, "t2i/exact": 0, "note": "text"}

    fake.run_tasks = run_tasks
    monkeypatch.setitem(sys.modules, "moesaic.evaluate.tasks", fake)
    run_dir = smoke / "runs" / "dense-image-s0"
    try:
        assert task_metrics(run_dir, "image", True, 7) == {"t2i/colour": 0.5, "t2i/exact": 0.0}
        assert task_metrics(run_dir, "image", True, 7)["t2i/colour"] == 0.5
        assert calls == [("dense-image-s0", ("t2i",), 7)]  # cached in tasks.json
        assert task_metrics(smoke / "runs" / "dense-text-s0", "text", True, 7) == {}
        assert task_metrics(run_dir, "image", False, 7) == {}
    finally:
        (run_dir / "tasks.json").unlink(missing_ok=True)
    t2i, vqa, loss = task_spec("t2i/colour"), task_spec("vqa/accuracy"), task_spec("t2i/image_loss")
    assert (t2i.modality, t2i.higher_is_better) == ("image", True)
    assert (vqa.modality, vqa.higher_is_better) == (None, True)
    assert (loss.modality, loss.higher_is_better) == ("image", False)
    assert math.isnan(modality_tax(0.5, 0.0, True))


def test_task_scores_enter_the_tax_table():
    from moesaic.analysis.tax import tax_table

    spec = task_spec("t2i/colour")
    results = {"moe": {"image": {spec.key: [0.5]}, "joint": {spec.key: [0.4]}}}
    assert tax_table(results, [spec])["moe"][spec.key].tax.mean == pytest.approx(20.0)


def test_run_parallel_collects_results_and_propagates_errors():
    from moesaic.experiments.workers import run_parallel

    got = {}
    run_parallel(math.sqrt, [1.0, 4.0, 9.0], 2, lambda item, r: got.__setitem__(item, r))
    assert got == {1.0: 1.0, 4.0: 2.0, 9.0: 3.0}
    with pytest.raises(ValueError, match="math domain error"):
        run_parallel(math.sqrt, [4.0, -1.0], 2, lambda item, r: None)


def test_joint_steps_are_the_fewest_that_cover_the_unimodal_tokens(tmp_path):
    """Checked with each seed's own tokenizer (the one its runs train with)."""
    from moesaic.data import build_stream
    from moesaic.experiments.compete import plan_data, tokenizer_for

    study = load_study(None, "smoke", ["study.seeds=2", "study.first_seed=1"])
    plan = plan_data(study, tmp_path, lambda m: None)
    for spec in plan_runs(study, plan):
        if spec.variant != "joint" or spec.arm != "dense":
            continue
        cfg = run_config(study, spec, tmp_path)
        seed_plan = plan[str(spec.seed)]
        target = sum(sum(seed_plan[v]["produced"].values()) for v in ("text", "image"))
        stream = build_stream(cfg.data, tokenizer_for(cfg))
        for _ in range(cfg.train.steps - 1):
            next(stream)
        assert sum(stream.produced.values()) < target
        next(stream)
        assert sum(stream.produced.values()) >= target
    assert json.loads((tmp_path / "data-plan.json").read_text()).keys() == {"1", "2"}
