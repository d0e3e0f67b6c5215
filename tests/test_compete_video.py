"""The tax study's video conditions (`study.video`): the plan's extra runs and their parts, the
text part of text + video being the text-only run's batch bit for bit, taxes recomputed from the
runs' own summaries, fairness from their logs, and nothing changed with the field off."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from moesaic.analysis.stats import Stat, paired
from moesaic.analysis.tax import modality_tax
from moesaic.cli import main
from moesaic.errors import ConfigError
from moesaic.experiments.capacity import PRESETS as CAPACITY_PRESETS
from moesaic.experiments.capacity import CapacityConfig
from moesaic.experiments.compete import EXPERIMENT, CompeteConfig, variant_overrides
from moesaic.experiments.compete_presets import PRESETS
from moesaic.experiments.engine import RunResult, RunSpec, run_config, tokenizer_for
from moesaic.experiments.study import load_study
from moesaic.experiments.video_tax import video_fairness

ARGS = ["--preset", "smoke", "--seeds", "2", "--arms", "dense,moe", "study.video=true"]
TEXT = '{"text": 1.0}'
IMAGE = '{"caption_image": 0.75, "image": 0.25}'
VIDEO = '{"video": 1.0}'


def study(*overrides, preset="smoke"):
    return load_study(CompeteConfig, PRESETS, None, preset, list(overrides))


def _plan(st):
    return EXPERIMENT.plan(st, Path("/nonexistent"), print)


@pytest.fixture(scope="module")
def video_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    assert main(["compete", *ARGS, "--out", str(out)]) == 0
    return out / "compete-smoke"


def _summary(path):
    return json.loads((path / "summary.json").read_text())


def test_video_off_leaves_the_plan_and_run_configs_unchanged():
    """With the field off (its default) the plan is today's three runs per arm and seed, with the
    same names and overrides, so finished studies are reused; turning it on only adds runs."""
    off, on = study(), study("study.video=true")
    assert off.video is False
    specs = _plan(off)
    assert [s.name for s in specs] == [
        f"{arm}-{v}-s0" for arm in ("dense", "modality", "moe") for v in ("text", "image", "joint")
    ]
    common = ["data.caption_loss=false", "train.seed=0", "data.seed=0"]
    assert variant_overrides(off, "text", 0) == [*common, f"data.mix={TEXT}", "train.steps=6"]
    assert variant_overrides(off, "image", 0) == [*common, f"data.mix={IMAGE}", "train.steps=6"]
    assert variant_overrides(off, "joint", 0) == [
        *common,
        f"data.parts=[{TEXT}, {IMAGE}]",
        "train.steps=6",
    ]
    with_video = {s.name: s for s in _plan(on)}
    for spec in specs:
        assert with_video[spec.name] == spec
        a = dataclasses.asdict(run_config(off, spec, Path("/s")))
        assert a == dataclasses.asdict(run_config(on, with_video[spec.name], Path("/s")))


def test_video_plan_has_the_extra_runs_with_the_right_parts():
    st = study("study.video=true", "study.video_mix={action_video: 1.0}")
    specs = _plan(st)
    assert len(specs) == 3 * 6
    by = {s.name: s for s in specs}
    action = '{"action_video": 1.0}'
    assert f"data.mix={action}" in by["moe-video-s0"].overrides
    assert f"data.parts=[{TEXT}, {action}]" in by["moe-text_video-s0"].overrides
    assert f"data.parts=[{IMAGE}, {action}]" in by["moe-image_video-s0"].overrides
    for v in ("video", "text_video", "image_video"):
        spec = by[f"dense-{v}-s0"]
        assert spec.tag("variant") == v and spec.tag("arm") == "dense" and spec.tag("seed") == 0
        assert "train.steps=6" in spec.overrides and "data.seed=0" in spec.overrides
        assert "data.caption_loss=false" in spec.overrides
    quick = study("study.video=true", preset="quick")
    assert len(_plan(quick)) - len(_plan(study(preset="quick"))) == 4 * 5 * 3


def test_each_part_of_a_video_condition_is_its_unimodal_runs_batch_bit_for_bit():
    """Built from the runs' own configs: part 0 of text + video is the text-only run's batch,
    part 1 the video-only run's; the same for image + video against the image-only run."""
    from moesaic.data import build_stream

    st = study("study.video=true", "study.seeds=1", "study.first_seed=3")
    specs = {s.tag("variant"): s for s in _plan(st) if s.tag("arm") == "dense"}
    cfgs = {v: run_config(st, s, Path("/s")) for v, s in specs.items()}
    tok = tokenizer_for(cfgs["text"])
    streams = {v: build_stream(c.data, tok, split="train") for v, c in cfgs.items()}
    rows = cfgs["text"].data.batch_size
    for _ in range(st.steps):
        got = {v: next(s).tensors() for v, s in streams.items()}
        for cond, first in (("text_video", "text"), ("image_video", "image")):
            for key, stacked in got[cond].items():
                assert torch.equal(stacked[:rows], got[first][key]), (cond, key)
                assert torch.equal(stacked[rows:], got["video"][key]), (cond, key)
    assert streams["text_video"].produced["video"] == streams["video"].produced["video"] > 0


def test_video_taxes_are_recomputed_from_the_runs(video_study, capsys):
    summary = _summary(video_study)
    video = summary["video"]
    runs = video_study / "runs"
    checked = 0
    for arm in ("dense", "moe"):
        for cond, key, ref in (
            ("text_video", "text/text", "text"),
            ("text_video", "ood_text/text", "text"),
            ("text_video", "video/video", "video"),
            ("text_video", "action_video/video", "video"),
            ("image_video", "image/image", "image"),
            ("image_video", "image_uncond/image", "image"),
            ("image_video", "video/video", "video"),
        ):
            u = [_summary(runs / f"{arm}-{ref}-s{s}")["eval"][key] for s in (0, 1)]
            j = [_summary(runs / f"{arm}-{cond}-s{s}")["eval"][key] for s in (0, 1)]
            cell = video["arms"][arm]["conditions"][cond][key]
            taxes = [modality_tax(jj, uu) for uu, jj in zip(u, j, strict=True)]
            assert cell["modality"] == ref
            assert cell["tax"]["values"] == pytest.approx(taxes)
            assert cell["delta"]["values"] == pytest.approx(
                [b - a for a, b in zip(u, j, strict=True)]
            )
            want = Stat.of(taxes)
            assert cell["tax"]["ci95"] == pytest.approx([want.ci_low, want.ci_high])
            checked += 1
        assert set(video["arms"][arm]["conditions"]["image_video"]).isdisjoint(
            {"text/text", "ood_text/text"}
        )
    assert checked == 14
    mine = video["arms"]["moe"]["conditions"]["text_video"]["text/text"]["tax"]["values"]
    base = video["arms"]["dense"]["conditions"]["text_video"]["text/text"]["tax"]["values"]
    test = video["comparisons"]["text_video"]["moe"]["text/text"]
    assert test["mean"] == pytest.approx(paired(mine, base).diff.mean)
    assert test["p_t"] == pytest.approx(paired(mine, base).p_t)
    # the text + image part of the summary is the study's as before
    assert set(summary["arms"]["dense"]["metrics"]) >= {"text/text", "image/image"}
    assert "video/video" not in summary["metrics"]
    assert main(["compete", *ARGS, "--out", str(video_study.parent)]) == 0
    out = capsys.readouterr().out
    assert "reused" in out and "trained" not in out
    line = next(x for x in out.splitlines() if x.startswith("dense") and "text + video" in x)
    tax = video["arms"]["dense"]["conditions"]["text_video"]["text/text"]["tax"]["mean"]
    assert f"{tax:+.2f}" in line and "paper: " in out


def test_video_fairness_from_the_runs_own_logs(video_study):
    video = _summary(video_study)["video"]
    fair = video["fairness"]
    assert fair["equal_steps"] and fair["equal_tokens"]
    runs = video_study / "runs"
    for arm in ("dense", "moe"):
        for s in (0, 1):
            got = {
                v: _summary(runs / f"{arm}-{v}-s{s}")
                for v in ("text", "image", "video", "text_video", "image_video")
            }
            assert {g["step"] for g in got.values()} == {6}
            assert (
                got["text_video"]["data_produced"]["text"] == got["text"]["data_produced"]["text"]
            )
            assert (
                got["text_video"]["data_produced"]["video"]
                == got["video"]["data_produced"]["video"]
            )
            tps = fair["runs"][arm][str(s)]["tokens_per_step"]
            assert tps["video"]["image_video"] == got["video"]["data_produced"]["video"] / 6


def _results(study_dir):
    out = []
    summary = _summary(study_dir)
    for name, r in summary["runs"].items():
        spec = RunSpec(name, (), tuple(r["tags"].items()))
        out.append(RunResult(spec, Path(r["dir"]), _summary(Path(r["dir"])), {}, "reused", 0.0))
    return out


def test_video_fairness_notices_a_different_batch(video_study):
    """An unequal step count or token count in any video run turns the flags false."""
    st = study("study.video=true", "study.seeds=2", "study.arms=[dense, moe]")
    results = _results(video_study)
    assert video_fairness(st, _by(results))["equal_tokens"]
    tampered = _by(results)
    r = tampered[("moe", "text_video", 1)]
    r.summary["data_produced"] = {**r.summary["data_produced"], "text": 1}
    assert not video_fairness(st, tampered)["equal_tokens"]
    tampered = _by(_results(video_study))
    tampered[("dense", "image_video", 0)].summary["step"] = 5
    fair = video_fairness(st, tampered)
    assert not fair["equal_steps"] and fair["equal_tokens"]


def _by(results):
    return {(r.spec.tag("arm"), r.spec.tag("variant"), r.spec.tag("seed")): r for r in results}


def test_report_shows_the_video_conditions(video_study):
    from moesaic.report.cells import interval

    html = (video_study / "report.html").read_text()
    assert "Video conditions: text + video and image + video" in html
    assert "pays no text tax" in html
    video = _summary(video_study)["video"]
    cell = video["arms"]["moe"]["conditions"]["image_video"]["video/video"]
    assert interval(cell["tax"], 2, "%", True) in html
    assert "steps text / image / video / text + video / image + video" in html


def test_video_off_summary_has_no_video_section(tmp_path):
    out = tmp_path / "o"
    argv = ["compete", "--preset", "smoke", "--arms", "dense", "study.analyze=false"]
    assert main([*argv, "--out", str(out)]) == 0
    summary = _summary(out / "compete-smoke")
    assert "video" not in summary and set(summary["fairness"]["runs"]["dense"]["0"]["steps"]) == {
        "text",
        "image",
        "joint",
    }
    assert "Video conditions" not in (out / "compete-smoke" / "report.html").read_text()


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("study.video_mix={text: 1.0}", "study.video_mix has 'text'"),
        ("study.video_mix={video: 0.0}", "study.video_mix has no positive weight"),
    ],
)
def test_invalid_video_fields(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        study(override)


def test_video_needs_step_matching_and_the_tax_experiment():
    with pytest.raises(ConfigError, match="study.video=true needs study.match=steps"):
        study("study.video=true", "study.match=tokens")
    with pytest.raises(ConfigError, match="this experiment has no video conditions"):
        load_study(CapacityConfig, CAPACITY_PRESETS, None, "smoke", ["study.video=true"])
