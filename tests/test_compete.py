"""The modality-tax study on the experiment engine: smoke study end to end, fairness from the
runs' own logs, reuse / resume / jobs giving identical summaries, presets and bad fields."""

import json
import math

import pytest
import torch
from render_check import check_rendering, find_chromium

from moesaic.analysis.stats import Stat, paired
from moesaic.analysis.tax import modality_tax
from moesaic.cli import main
from moesaic.config import load_config
from moesaic.errors import ConfigError
from moesaic.experiments.arms import ARMS, parse_arms
from moesaic.experiments.compete import EXPERIMENT, CompeteConfig, task_metrics, variant_overrides
from moesaic.experiments.compete_presets import PRESETS
from moesaic.experiments.engine import base_config, run_config, run_experiment
from moesaic.experiments.study import load_study
from moesaic.experiments.tax_summary import task_spec

SMOKE = ["--preset", "smoke", "--seeds", "2"]


def study(*overrides, preset="smoke"):
    return load_study(CompeteConfig, PRESETS, None, preset, list(overrides))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    assert main(["compete", *SMOKE, "--out", str(out)]) == 0
    return out / "compete-smoke"


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def _strip_dirs(summary, root):
    """The summary with run directories made relative and the job count dropped (to compare
    studies run in two places with different --jobs)."""
    out = json.loads(json.dumps(summary).replace(str(root), "ROOT"))
    out["study"].pop("jobs")
    return out


def test_taxes_and_intervals_are_recomputed_from_the_runs(smoke):
    summary = _summary(smoke)
    assert summary["schema"] == "moesaic-study/1" and summary["experiment"] == "tax"
    assert list(summary["arms"]) == ["dense", "modality", "moe"] and summary["seeds"] == [0, 1]
    runs = smoke / "runs"
    for arm, a in summary["arms"].items():
        for key, variant in (
            ("text/text", "text"),
            ("ood_text/text", "text"),
            ("image/image", "image"),
            ("image_uncond/image", "image"),
        ):
            u = [_summary(runs / f"{arm}-{variant}-s{s}")["eval"][key] for s in (0, 1)]
            j = [_summary(runs / f"{arm}-joint-s{s}")["eval"][key] for s in (0, 1)]
            cell = a["metrics"][key]
            taxes = [modality_tax(jj, uu) for uu, jj in zip(u, j, strict=True)]
            assert cell["tax"]["values"] == pytest.approx(taxes)
            assert cell["delta"]["values"] == pytest.approx(
                [jj - uu for uu, jj in zip(u, j, strict=True)]
            )
            want = Stat.of(taxes)
            assert cell["tax"]["ci95"] == pytest.approx([want.ci_low, want.ci_high])
        assert a["metrics"]["caption/text"]["tax"] is None  # joint only
        bins = [k for k in a["metrics"] if k.startswith("image/image_t")]
        assert len(bins) == 8  # the eval grid puts images in every flow-time bin
        assert a["params_total"] >= a["params_active"] > 0
    base = summary["arms"]["dense"]["metrics"]["text/text"]["tax"]["values"]
    for arm in ("modality", "moe"):
        test = summary["comparisons"][arm]["text/text"]
        mine = summary["arms"][arm]["metrics"]["text/text"]["tax"]["values"]
        want = paired(mine, base)
        assert test["mean"] == pytest.approx(want.diff.mean)
        assert test["p_t"] == pytest.approx(want.p_t)
        assert test["p_sign_flip"] is None  # 2 seeds: too few for the exact test
        assert all(t["p_holm"] >= t["p_t"] for t in summary["comparisons"][arm].values())
    ffn = {a: (v["ffn_params_active"], v["ffn_params_total"]) for a, v in summary["arms"].items()}
    assert ffn["dense"][0] == ffn["modality"][0] == ffn["moe"][0]
    assert ffn["dense"][1] < ffn["modality"][1] < ffn["moe"][1]
    shift = summary["data"]["caption_shift"]
    assert 0 < shift["unigram_js"] <= 1 and 0 < shift["bigram_js"] <= 1
    assert (smoke / "report.html").stat().st_size > 10_000


def test_step_matched_runs_have_equal_steps_and_tokens_in_their_own_logs(smoke):
    """Checked from each run's summary.json and metrics.jsonl, not from the plan."""
    from moesaic.train.metrics import read_metrics

    runs = smoke / "runs"
    for arm in ("dense", "modality", "moe"):
        for s in (0, 1):
            text, image, joint = (
                _summary(runs / f"{arm}-{v}-s{s}") for v in ("text", "image", "joint")
            )
            assert text["step"] == image["step"] == joint["step"] == 6
            logged = [
                r["step"]
                for r in read_metrics(runs / f"{arm}-joint-s{s}" / "metrics.jsonl")
                if r["kind"] == "train"
            ]
            assert logged[-1] == 6
            assert joint["data_produced"]["text"] == text["data_produced"]["text"]
            for kind in ("caption_image", "image"):
                assert joint["data_produced"][kind] == image["data_produced"][kind]
            # two stacked batches per step: the joint run processes both runs' positions
            assert joint["tokens"] == text["tokens"] + image["tokens"]
            lrs = [
                [
                    r["lr"]
                    for r in read_metrics(runs / f"{arm}-{v}-s{s}" / "metrics.jsonl")
                    if r["kind"] == "train"
                ]
                for v in ("text", "joint")
            ]
            assert lrs[0] == lrs[1]  # the same schedule
    fair = _summary(smoke)["fairness"]
    assert fair["match"] == "steps" and fair["equal_steps"] and fair["equal_tokens"]


def test_specialization_over_seeds_with_its_null(smoke):
    spec = _summary(smoke)["specialization"]
    assert set(spec) == {"moe"}  # dense and modality arms have no router
    moe = spec["moe"]
    assert moe["fraction_text"]["n"] == 2 and moe["null_fraction_text"]["n"] == 2
    per_seed = []
    for s in (0, 1):
        analysis = json.loads((smoke / "runs" / f"moe-joint-s{s}" / "analysis.json").read_text())
        per_seed.append(analysis["specialization"]["overall"]["fraction_text"])
    assert moe["fraction_text"]["values"] == pytest.approx(per_seed)


def test_rerun_reuses_and_jobs_give_the_same_summary(smoke, tmp_path, capsys):
    before = _summary(smoke)
    capsys.readouterr()
    assert main(["compete", *SMOKE, "--out", str(smoke.parent)]) == 0
    out = capsys.readouterr().out
    assert out.count(": reused") == 18 and ": trained" not in out and "elapsed:" in out
    assert _summary(smoke) == before
    assert main(["compete", *SMOKE, "--jobs", "2", "--out", str(tmp_path)]) == 0
    assert _strip_dirs(_summary(tmp_path / "compete-smoke"), tmp_path) == _strip_dirs(
        before, smoke.parent
    )


def test_interrupted_run_is_resumed_exactly(smoke, tmp_path, capsys):
    """A run stopped mid-way continues from its checkpoint to the uninterrupted result."""
    from moesaic.train.loop import Trainer

    st = study("study.arms=[dense]")
    study_dir = tmp_path / st.name
    spec = next(s for s in EXPERIMENT.plan(st, study_dir, print) if s.tag("variant") == "joint")
    trainer = Trainer(run_config(st, spec, study_dir), spec.run_dir(study_dir))
    for _ in range(3):
        trainer.train_step()
    trainer.save_checkpoint()
    trainer.metrics.close()
    assert main(["compete", "--preset", "smoke", "--arms", "dense", "--out", str(tmp_path)]) == 0
    assert "dense-joint-s0: resumed" in capsys.readouterr().out
    got = _summary(spec.run_dir(study_dir))["eval"]
    assert got == _summary(smoke / "runs" / "dense-joint-s0")["eval"]


def test_changed_config_is_refused(smoke):
    from moesaic.cli import build_parser

    args = build_parser().parse_args(
        ["compete", *SMOKE, "--out", str(smoke.parent), "train.lr=1e-2"]
    )
    with pytest.raises(ConfigError, match="different configuration"):
        args._run(args)


def test_token_match_has_half_batch_controls_and_covers_the_tokens(tmp_path):
    st = study("study.match=tokens", "study.arms=[dense]")
    summary = run_experiment(EXPERIMENT, st, tmp_path, lambda m: None)
    runs = tmp_path / st.name / "runs"
    assert sorted(p.name for p in runs.iterdir()) == [
        "dense-image-s0",
        "dense-image_half-s0",
        "dense-joint-s0",
        "dense-text-s0",
        "dense-text_half-s0",
    ]
    half = load_config(runs / "dense-text_half-s0" / "config.yaml")
    full = load_config(runs / "dense-text-s0" / "config.yaml")
    assert half.data.batch_size * 2 == full.data.batch_size
    assert half.train.steps == 2 * full.train.steps
    joint = _summary(runs / "dense-joint-s0")
    uni = [_summary(runs / f"dense-{v}-s0") for v in ("text", "image")]
    # the joint run stops at the first step at which it has drawn the unimodal runs' tokens
    want = sum(sum(u["data_produced"].values()) for u in uni)
    assert sum(joint["data_produced"].values()) >= want
    assert not summary["fairness"]["equal_steps"]
    effect = summary["step_effect"]["dense"]["text/text"]["values"][0]
    h, f = (_summary(runs / f"dense-{v}-s0")["eval"]["text/text"] for v in ("text_half", "text"))
    assert effect == pytest.approx(modality_tax(h, f))


def test_analyze_command(smoke, capsys):
    run_dir = smoke / "runs" / "moe-image-s0"
    assert main(["analyze", str(run_dir), "--tokens", "all", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "ood_text" in out
    result = json.loads((run_dir / "analysis.json").read_text())
    assert result["tokens"] == "all" and len(result["specialization"]["layers"]) == 2
    assert not (run_dir / "analysis").exists()  # --no-plots drew nothing


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed")
def test_smoke_report_renders(smoke):
    result = check_rendering(smoke / "report.html")
    assert result.ok, result
    assert result.images >= 5


# ----------------------------------------------------------------------- arms, presets, fields


def test_arms_match_active_compute_and_modality_total():
    from moesaic.model import Transformer
    from moesaic.model.params import param_breakdown

    st = study()
    parts = {}
    for name, arm in ARMS.items():
        cfg = base_config(
            st,
            [
                *arm.overrides(st.experts, st.granularity),
                "model.vocab_size=64",
                "model.patch_dim=48",
            ],
        )
        torch.manual_seed(0)
        parts[name] = param_breakdown(Transformer(cfg.model))
    active = {p["ffn_active"] for p in parts.values()}
    assert len(active) == 1, parts
    assert parts["moe-total-matched"]["ffn_total"] == parts["modality"]["ffn_total"]
    assert parts["moe"]["ffn_total"] == parts["dense"]["ffn_total"] * st.experts // st.granularity


def test_presets_and_overrides(tmp_path):
    for name in PRESETS:
        st = study(preset=name)
        assert st.arms and base_config(st).model.dim > 0
    quick = study(preset="quick")
    assert quick.seeds >= 5 and quick.arms == ["dense", "modality", "moe", "moe-total-matched"]
    st = study("study.seeds=3", "train.lr=1e-3")
    assert st.seeds == 3 and st.overrides[-1] == "train.lr=1e-3"
    path = tmp_path / "study.yaml"
    path.write_text("preset: smoke\nsteps: 11\narms: [dense, moe-groups]\n")
    st = load_study(CompeteConfig, PRESETS, str(path))
    assert st.steps == 11 and st.arms == ["dense", "moe-groups"]
    assert st.overrides == PRESETS["smoke"]["overrides"]
    assert parse_arms("moe, dense,moe") == ["moe", "dense"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("study.match=flops", "study.match='flops' is not one of steps, tokens"),
        ("study.seeds=0", "study.seeds=0 must be >= 1"),
        ("study.arms=[]", "study.arms is empty"),
        ("study.image_mix={text: 1.0}", "study.image_mix has 'text'"),
        ("study.lr={moe-groups: 0.1}", "study.lr names arm 'moe-groups'"),
        ("study.stpes=3", "did you mean 'study.steps'"),
    ],
)
def test_invalid_study_fields_stop_with_one_line(override, fragment, capsys):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        study(override)
    assert main(["compete", "--preset", "smoke", override, "--out", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err


def test_unknown_preset_experiment_and_arm():
    with pytest.raises(ConfigError, match="did you mean 'quick'"):
        study(preset="quik")
    with pytest.raises(ConfigError, match="unknown arm 'mo'"):
        parse_arms("dense,mo")
    assert main(["compete", "--experiment", "taxes"]) == 2


def test_variant_overrides_pair_seeds_and_stack_the_joint_batches():
    st = study()
    text = variant_overrides(st, "text", 3)
    assert "train.seed=3" in text and "data.seed=3" in text and "train.steps=6" in text
    joint = variant_overrides(st, "joint", 3)
    assert 'data.parts=[{"text": 1.0}, {"caption_image": 0.75, "image": 0.25}]' in joint
    tokens = study("study.match=tokens")
    joint = variant_overrides(tokens, "joint", 3, {"mix": {"text": 10.0, "image": 5.0}, "steps": 7})
    assert "train.steps=7" in joint and 'data.mix={"image": 5.0, "text": 10.0}' in joint
    with pytest.raises(ValueError):
        variant_overrides(tokens, "joint", 3)


# ----------------------------------------------------------------------- task hook


def test_task_hook(smoke, monkeypatch):
    import moesaic.evaluate.tasks as tasks

    calls = []

    def run_tasks(run, tasks, n):
        calls.append((run.run_dir.name, tuple(tasks), n))
        return {"t2i/colour": 0.5, "t2i/exact": 0}

    monkeypatch.setattr(tasks, "run_tasks", run_tasks)
    run_dir = smoke / "runs" / "dense-image-s0"
    try:
        assert task_metrics(run_dir, "image", 7) == {"t2i/colour": 0.5, "t2i/exact": 0.0}
        assert task_metrics(run_dir, "image", 7)["t2i/colour"] == 0.5
        assert calls == [("dense-image-s0", ("t2i",), 7)]  # cached in tasks.json
        assert task_metrics(smoke / "runs" / "dense-text-s0", "text", 7) == {}
    finally:
        (run_dir / "tasks.json").unlink(missing_ok=True)
    t2i, vqa, loss = task_spec("t2i/colour"), task_spec("vqa/accuracy"), task_spec("t2i/image_loss")
    assert (t2i.modality, t2i.higher_is_better) == ("image", True)
    assert (vqa.modality, vqa.higher_is_better) == (None, True)
    assert (loss.modality, loss.higher_is_better) == ("image", False)
    assert math.isnan(modality_tax(0.5, 0.0, True))
    assert modality_tax(0.4, 0.5, True) == pytest.approx(20.0)


def test_run_parallel_collects_results_and_propagates_errors():
    from moesaic.experiments.workers import run_parallel

    got = {}
    run_parallel(math.sqrt, [1.0, 4.0, 9.0], 2, lambda item, r: got.__setitem__(item, r))
    assert got == {1.0: 1.0, 4.0: 2.0, 9.0: 3.0}
    with pytest.raises(ValueError, match="math domain error"):
        run_parallel(math.sqrt, [4.0, -1.0], 2, lambda item, r: None)
