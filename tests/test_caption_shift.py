"""The caption-shift experiment: the caption document kind, what each condition's runs train
on, the statistics and verdict rules, bad study fields, and the smoke study end to end with
its numbers recomputed from the runs' own summaries."""

import json
import math

import numpy as np
import pytest
import torch
from render_check import check_rendering, find_chromium
from scipy import stats as sps

from moesaic.analysis.stats import Stat, paired
from moesaic.analysis.tax import modality_tax
from moesaic.batch import DocKind, Modality
from moesaic.cli import main
from moesaic.config import MIX_KEYS, load_config
from moesaic.data import build_stream, load_tokenizer
from moesaic.data.packing import DocFactory, DocOptions
from moesaic.data.world.generators import GENERATORS, WorldSource
from moesaic.errors import ConfigError
from moesaic.experiments import caption_shift_verdicts as verdicts
from moesaic.experiments.caption_shift import EXPERIMENT
from moesaic.experiments.caption_shift_summary import fit_line
from moesaic.experiments.caption_study import (
    PRESETS,
    CaptionShiftConfig,
    _mean_hidden,
    condition_overrides,
)
from moesaic.experiments.engine import EXPERIMENTS, base_config, tokenizer_for
from moesaic.experiments.study import load_study
from moesaic.files import cache_dir

MICRO = ["data.seq_len=64", "data.batch_size=4", "data.vocab_size=512"]


def study(*overrides, preset="smoke"):
    return load_study(CaptionShiftConfig, PRESETS, None, preset, list(overrides))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(load_config("tiny", MICRO).data, cache_dir())


def _docs(batch, rows):
    """(row, positions) of every non-padding document in `rows` of a batch."""
    for b in rows:
        for d in batch.doc_id[b].unique().tolist():
            pos = (batch.doc_id[b] == d).nonzero().flatten()
            if int(batch.doc_kind[b, pos[0]]) != DocKind.PAD:
                yield b, pos


# ----------------------------------------------------------------------- the caption document


def test_caption_documents_are_image_caption_captions_without_images(tok):
    cfg = load_config("tiny", [*MICRO, "data.caption_register=plain"]).data
    source = WorldSource("train", "plain", cfg.image_size)
    assert "caption" in source.kinds and "caption" in MIX_KEYS
    factory = DocFactory(cfg, tok, source, "train", 3, DocOptions())
    ids = tok.special
    for g in range(20):
        cap, pair = factory("caption", g), factory("image_caption", g)
        assert cap.images == [] and cap.tokens[0] == ids.bos and cap.tokens[-1] == ids.eos
        words = cap.tokens[1:-1].tolist()
        eoi = pair.tokens.tolist().index(ids.eoi)
        assert words == pair.tokens[eoi + 1 : -1].tolist()  # the same scene's caption
        # the loss mask is exactly the caption tokens (and eos, as in every text document)
        assert cap.targets[:-1].tolist() == [*words, ids.eos] and cap.targets[-1] == -1


def test_caption_generator_draws_like_the_scene_generator():
    import random

    for seed in range(10):
        a = GENERATORS["caption"](random.Random(seed), "train", "natural", 16)
        b = GENERATORS["scene"](random.Random(seed), "train", "natural", 16)
        assert a.text == b.text and a.images == () and a.scene == b.scene


def _stream(st, condition, register=None, seed=0):
    cfg = base_config(st, condition_overrides(st, condition, register, seed))
    return cfg, build_stream(cfg.data, tokenizer_for(cfg))


def test_caption_condition_rows_hold_text_only_and_every_caption_token_is_a_target():
    st = study()
    cfg, stream = _stream(st, "caption", "terse")
    B = cfg.data.batch_size
    batch = next(stream)
    part = slice(B, 2 * B)
    assert not bool((batch.modality[part] == Modality.IMAGE).any())
    assert bool((batch.image_id[part] == -1).all()) and not bool(batch.image_loss[part].any())
    for b, pos in _docs(batch, range(B, 2 * B)):
        toks, tgts = batch.tokens[b, pos], batch.targets[b, pos]
        assert tgts[:-1].tolist() == toks[1:].tolist() and tgts[-1] == -1


def test_image_caption_condition_trains_on_its_captions():
    st = study()
    cfg, stream = _stream(st, "image_caption", "natural")
    tok = tokenizer_for(cfg)
    B = cfg.data.batch_size
    batch = next(stream)
    n_docs = 0
    for b, pos in _docs(batch, range(B, 2 * B)):
        toks = batch.tokens[b, pos].tolist()
        after = toks.index(tok.eoi_id)  # caption tokens: after eoi, before eos
        caption = toks[after + 1 : -1]
        assert caption and batch.targets[b, pos][after : len(toks) - 2].tolist() == caption
        n_docs += 1
    assert n_docs >= B


@pytest.mark.parametrize("caption_loss", [True, False])
def test_study_caption_loss_sets_caption_targets_of_caption_image_runs(caption_loss):
    st = study(f"study.caption_loss={str(caption_loss).lower()}")
    cfg, stream = _stream(st, "caption_image", "terse")
    B = cfg.data.batch_size
    batch = next(stream)
    targets = int((batch.targets[B:] >= 0).sum())
    assert (targets > 0) == caption_loss
    assert bool(batch.image_loss[B:].any())  # the images carry their flow loss either way
    # the other conditions never train on caption_image captions
    assert "data.caption_loss=false" in condition_overrides(st, "image_caption", "terse", 0)


@pytest.mark.parametrize("condition", ["image", "caption", "image_caption", "caption_image"])
def test_every_condition_stacks_the_reference_runs_text_batches(condition):
    st = study()
    _, ref = _stream(st, "text")
    cfg, joint = _stream(st, condition, "natural")
    B = cfg.data.batch_size
    for _ in range(3):
        a, b = next(ref), next(joint)
        assert b.shape[0] == 2 * B
        for name, x in a.tensors().items():
            assert torch.equal(getattr(b, name)[:B], x), name
    assert joint.produced["text"] == ref.produced["text"]


def test_eval_text_sets_do_not_depend_on_the_register():
    from moesaic.data import build_eval_sets

    cfg = load_config("tiny", MICRO)
    tok = tokenizer_for(cfg)
    sets = [
        build_eval_sets(
            load_config("tiny", [*MICRO, f"data.caption_register={r}"]).data, tok, 1234, 2
        )  # fmt: skip
        for r in ("terse", "natural")
    ]
    for name in ("text", "ood_text"):
        for a, b in zip(sets[0][name], sets[1][name], strict=True):
            assert torch.equal(a.tokens, b.tokens)


def test_mean_hidden_skips_bos_and_padding():
    from types import SimpleNamespace

    from moesaic.data.documents import Doc
    from moesaic.data.packing import pack_rows

    def echo(batch, output_hidden_states):  # hidden state = the token id, twice
        h = batch.tokens.float().unsqueeze(-1).repeat(1, 1, 2)
        return SimpleNamespace(hidden_states=[h * 0, h])

    cfg = load_config("tiny", MICRO).data
    docs = [
        Doc("text", np.array(t), np.full(len(t), -1), [], ("text", i))
        for i, t in enumerate(([1, 10, 20], [1, 30]))
    ]
    batch = pack_rows([docs], cfg, pad_id=0)
    mean = _mean_hidden(echo, [batch], bos_id=1, device="cpu")
    assert mean.tolist() == [20.0, 20.0]  # (10 + 20 + 30) / 3: the last layer, no bos, no pad


# ----------------------------------------------------------------------- statistics, verdicts


def test_fit_line_matches_the_textbook_formulas():
    rng = np.random.default_rng(0)
    x = np.repeat([0.4, 0.6, 0.8], 5)
    y = 2.0 * x + rng.normal(0, 0.1, x.size)
    seeds = [i % 5 for i in range(x.size)]
    regs = ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    fit = fit_line(list(zip(x.tolist(), y.tolist(), seeds, regs, strict=True)))
    n = x.size
    sxx = ((x - x.mean()) ** 2).sum()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / sxx
    resid = y - (y.mean() + slope * (x - x.mean()))
    s = math.sqrt((resid**2).sum() / (n - 2))
    half = sps.t.ppf(0.975, n - 2) * s / math.sqrt(sxx)
    assert fit["slope"] == pytest.approx(slope)
    assert fit["slope_ci95"] == pytest.approx([slope - half, slope + half])
    mid = len(fit["band"]["x"]) // 2  # the grid's middle is x̄ here
    assert fit["band"]["high"][mid] - fit["band"]["fit"][mid] == pytest.approx(
        sps.t.ppf(0.975, n - 2) * s / math.sqrt(n)
    )
    per_seed = [np.polyfit(x[[i, i + 5, i + 10]], y[[i, i + 5, i + 10]], 1)[0] for i in range(5)]
    assert fit["per_seed_slope"]["values"] == pytest.approx(per_seed)
    assert "reason" in fit_line([(0.5, 1.0, 0, "a"), (0.5, 2.0, 1, "a"), (0.5, 3.0, 2, "a")])


def _stat(low, high):
    return {"mean": (low + high) / 2, "ci95": [low, high], "p_t": 0.01}


def _summary(vision=None, caption=None, ic=None, diff=None, base=None, moe_diff=None, fit=None):
    taxes = {"dense": {"image": {"-": {"text/text": {"tax": vision}}}}}
    return {
        "taxes": taxes,
        "pooled": {
            "dense": {"caption": {"text/text": caption}, "image_caption": {"text/text": ic}},
            "moe": {"caption": {"text/text": caption}},
        }
        | ({"base": {"caption": {"text/text": base}}} if base else {}),
        "comparisons": {
            "words_vs_pixels": {"dense": {"text/text": {"pooled": diff}}},
            "arm_vs_base": {"moe": {"caption": {"text/text": {"pooled": moe_diff}}}},
        },
        "conditions": {"caption": {"label": "T+C"}},
        "regression": {"dense": {"caption": {"text/text": fit}}},
    }


@pytest.mark.parametrize(
    "interval, verdict",
    [
        ((-0.4, 0.3), "supported"),
        ((0.1, 0.9), "not supported"),
        ((-0.2, 0.8), "inconclusive"),
        ((0.1, 0.4), "supported"),
    ],  # fmt: skip
)
def test_vision_verdict_is_non_inferiority_with_the_margin(interval, verdict):
    v = verdicts._vision(_summary(vision=_stat(*interval)), "text/text", "dense", 0.5)
    assert v["verdict"] == verdict


@pytest.mark.parametrize(
    "caption, diff, verdict",
    [
        ((0.5, 1.5), (-0.3, 0.4), "supported"),
        ((-0.2, 1.5), (-0.3, 0.4), "inconclusive"),  # no caption harm to attribute
        ((0.5, 1.5), (0.6, 1.4), "not supported"),
        ((0.5, 1.5), (0.1, 0.4), "supported"),  # a detectable difference inside the margin
        ((0.5, 1.5), (-0.3, 0.9), "inconclusive"),
    ],
)
def test_words_verdict_needs_equivalence_and_harm(caption, diff, verdict):
    s = _summary(caption=_stat(*caption), ic=_stat(0, 1), diff=_stat(*diff))
    assert verdicts._words(s, "text/text", "dense", 0.5)["verdict"] == verdict


@pytest.mark.parametrize(
    "base, diff, verdict",
    [
        ((0.5, 1.5), (-0.9, -0.1), "supported"),
        ((-0.5, 1.5), (-0.9, -0.1), "inconclusive"),  # the first arm pays no detectable tax
        ((0.5, 1.5), (0.1, 0.9), "not supported"),
        ((0.5, 1.5), (-0.9, 0.1), "inconclusive"),
    ],
)
def test_moe_verdict(base, diff, verdict):
    s = _summary(caption=_stat(0, 1), base=_stat(*base), moe_diff=_stat(*diff))
    assert verdicts._moe(s, "text/text", "moe", "base", "caption")["verdict"] == verdict


@pytest.mark.parametrize(
    "slope, per_seed, verdict",
    [
        ((0.5, 2.0), (0.1, 3.0), "supported"),
        ((0.5, 2.0), (-0.1, 3.0), "inconclusive"),  # seeds disagree
        ((-2.0, -0.5), (-3.0, -0.1), "not supported"),
    ],
)
def test_shift_verdict_needs_both_slope_intervals(slope, per_seed, verdict):
    fit = {"slope": sum(slope) / 2, "slope_ci95": list(slope), "n": 15,
           "per_seed_slope": _stat(*per_seed)}  # fmt: skip
    s = _summary(fit={"unigram_js": fit, "embedding": {"n": 0, "reason": "x"}})
    s["registers"] = ["terse"]
    s["shift"] = {"terse": {"unigram_js": {"mean": 0.7}}}
    s["taxes"]["dense"]["caption"] = {"terse": {"text/text": {"tax": _stat(0, 1)}}}
    assert verdicts._shift(s, "text/text", "dense", "caption")["verdict"] == verdict


# ----------------------------------------------------------------------- fields and presets


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("study.registers=[formal]", "study.registers has 'formal'"),
        ("study.registers=[terse, terse]", "study.registers=['terse', 'terse'] repeats"),
        ("study.conditions=[video]", "study.conditions has 'video'"),
        ("study.conditions=[]", "study.conditions is empty"),
        ("study.registers=[]", "study.registers is empty"),
        ("study.margin=0", "study.margin=0.0 must be > 0"),
        ("study.steps=0", "study.steps=0 must be >= 1"),
        ("study.arms=[dense, dense]", "study.arms=['dense', 'dense'] repeats"),
        ("study.lr={modality: 0.1}", "study.lr names arm 'modality'"),
        ("study.experts=3", "study.experts=3 must be >= 2 x granularity"),
    ],
)
def test_invalid_study_fields_stop_with_one_line(override, fragment, capsys):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        study(override)
    args = ["compete", "--experiment", "caption-shift", "--preset", "smoke", override]
    assert main([*args, "--out", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err


def test_the_base_config_leaves_the_data_to_the_study(tmp_path, capsys):
    st = study("data.source=text", f"data.paths=[{tmp_path}]")
    with pytest.raises(ConfigError, match="study.text_source=.* and study.caption_sources="):
        EXPERIMENT.plan(st, tmp_path, print)
    args = ["compete", "--experiment", "caption-shift", "--preset", "smoke"]
    assert main([*args, "data.source=digits", "--out", str(tmp_path)]) == 2
    assert "data.source='digits'" in capsys.readouterr().err


def test_presets_plan_the_full_grid(tmp_path):
    assert EXPERIMENTS["caption-shift"] == "moesaic.experiments.caption_shift"
    quick = study(preset="quick")
    assert quick.seeds >= 5 and quick.jobs == 2
    assert {"terse", "plain", "natural"} <= set(quick.registers)
    specs = EXPERIMENT.plan(quick, tmp_path, print)
    per_arm_seed = 2 + 2 * len(quick.registers)  # T, T+I, T+C_r and T+IC_r
    assert len(specs) == len(quick.arms) * quick.seeds * per_arm_seed
    names = {s.name for s in specs}
    assert {"dense-text-s4", "moe-image-s0", "moe-caption-plain-s2"} <= names
    paper = study(preset="paper")
    assert set(paper.conditions) == {"image", "caption", "image_caption", "caption_image"}


# ----------------------------------------------------------------------- end to end


SMOKE = ["compete", "--experiment", "caption-shift", "--preset", "smoke", "--seeds", "2"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    assert main([*SMOKE, "--out", str(out)]) == 0
    return out / "caption-shift-smoke"


def _run(smoke, name):
    return json.loads((smoke / "runs" / name / "summary.json").read_text())


def test_every_condition_matches_the_reference_in_its_own_logs(smoke):
    """Steps and general-text document tokens, read from each run's summary.json."""
    summary = json.loads((smoke / "summary.json").read_text())
    names = [n for n in summary["runs"] if n.startswith("dense-") or n.startswith("moe-")]
    assert len(names) == 2 * 2 * (2 + 3 * 2)
    for name in names:
        arm, seed = name.split("-")[0], name.split("-")[-1]
        ref, run = _run(smoke, f"{arm}-text-{seed}"), _run(smoke, name)
        assert run["step"] == ref["step"] == 6
        assert run["data_produced"]["text"] == ref["data_produced"]["text"]
        if name != f"{arm}-text-{seed}":
            assert run["tokens"] == 2 * ref["tokens"]  # two stacked batches per step
    c = _run(smoke, "dense-caption-terse-s0")["data_produced"]
    assert set(c) == {"text", "caption"} and c["caption"] > 0
    fair = summary["fairness"]
    assert fair["equal_steps"] and fair["equal_text_tokens"]


def test_summary_numbers_are_recomputed_from_the_runs(smoke):
    summary = json.loads((smoke / "summary.json").read_text())
    assert summary["experiment"] == "caption-shift" and summary["seeds"] == [0, 1]
    regs = summary["registers"]
    per_seed = {}
    for arm in ("dense", "moe"):
        for key in ("text/text", "ood_text/text"):
            ref = [_run(smoke, f"{arm}-text-s{s}")["eval"][key] for s in (0, 1)]
            for cond, reg in [("image", "-")] + [
                (c, r) for c in ("caption", "image_caption", "caption_image") for r in regs
            ]:
                name = f"{arm}-{cond}" + ("" if reg == "-" else f"-{reg}")
                got = [_run(smoke, f"{name}-s{s}")["eval"][key] for s in (0, 1)]
                tax = [modality_tax(g, r) for g, r in zip(got, ref, strict=True)]
                cell = summary["taxes"][arm][cond][reg][key]
                assert cell["tax"]["values"] == pytest.approx(tax)
                want = Stat.of(tax)
                assert cell["tax"]["ci95"] == pytest.approx([want.ci_low, want.ci_high])
                per_seed[(arm, cond, reg, key)] = tax
    # pooled: per seed, the mean over registers
    pooled = [sum(per_seed[("moe", "caption", r, "text/text")][i] for r in regs) / len(regs)
              for i in (0, 1)]  # fmt: skip
    assert summary["pooled"]["moe"]["caption"]["text/text"]["values"] == pytest.approx(pooled)
    dense = [sum(per_seed[("dense", "caption", r, "text/text")][i] for r in regs) / len(regs)
             for i in (0, 1)]  # fmt: skip
    moe_vs_dense = summary["comparisons"]["arm_vs_base"]["moe"]["caption"]["text/text"]["pooled"]
    assert moe_vs_dense["mean"] == pytest.approx(paired(pooled, dense).diff.mean)
    # the embedding distance is each arm's T model's, seed by seed
    for arm in ("dense", "moe"):
        dist = [
            json.loads((smoke / "runs" / f"{arm}-text-s{s}" / "caption_distance.json").read_text())
            for s in (0, 1)
        ]
        for r in regs:
            got = summary["shift"][r]["embedding"][arm]["values"]
            assert got == pytest.approx([d["distance"][r] for d in dist])
            assert all(0 <= v <= 2 for v in got)
    # the regression runs through (shift, tax) of every register and seed
    fit = summary["regression"]["dense"]["caption"]["text/text"]["unigram_js"]
    xs = [summary["shift"][r]["unigram_js"]["values"][i] for r in regs for i in (0, 1)]
    ys = [per_seed[("dense", "caption", r, "text/text")][i] for r in regs for i in (0, 1)]
    want = sps.linregress(xs, ys)
    half = sps.t.ppf(0.975, len(xs) - 2) * want.stderr
    assert fit["slope"] == pytest.approx(want.slope)
    assert fit["slope_ci95"] == pytest.approx([want.slope - half, want.slope + half])
    words = summary["comparisons"]["words_vs_pixels"]["dense"]["text/text"]["pooled"]
    ic = [sum(per_seed[("dense", "image_caption", r, "text/text")][i] for r in regs) / len(regs)
          for i in (0, 1)]  # fmt: skip
    assert words["values"] == pytest.approx([a - b for a, b in zip(dense, ic, strict=True)])
    share = {c: {r: summary["dose"][c][r]["caption_share"] for r in regs}
             for c in ("caption", "image_caption")}  # fmt: skip
    scaled = [
        sum(per_seed[("dense", c, r, "text/text")][i] / share[c][r] for r in regs) / len(regs)
        for c in ("caption", "image_caption")
        for i in (0, 1)
    ]
    got = summary["comparisons"]["words_vs_pixels_per_share"]["dense"]["text/text"]["values"]
    assert got == pytest.approx([scaled[0] - scaled[2], scaled[1] - scaled[3]])
    assert 0 < share["image_caption"]["terse"] < share["caption"]["terse"] < 1
    keys = {(v["key"], v["arm"], v["metric"]) for v in summary["verdicts"]}
    assert ("vision", "dense", "text/text") in keys and ("moe", "moe", "ood_text/text") in keys
    assert ("words", "moe", "text/text") in keys and ("shift", "dense", "text/text") in keys
    html = (smoke / "report.html").read_text()
    assert html.count("<img") >= 5 and "Verdicts" in html


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed")
def test_smoke_report_renders(smoke):
    result = check_rendering(smoke / "report.html")
    assert result.ok, result
    assert result.images >= 5


def test_planned_flops_are_what_the_runs_trained(smoke):
    from moesaic.experiments.caption_shift import planned_flops

    planned = planned_flops(study("study.seeds=2"))
    summary = json.loads((smoke / "summary.json").read_text())
    for arm in ("dense", "moe"):
        trained = sum(_run(smoke, name)["train_flops"] for name in summary["arms"][arm]["runs"])
        assert planned[arm] == pytest.approx(trained, rel=1e-3)
        assert summary["arms"][arm]["train_flops"] == pytest.approx(trained)


def test_rerun_reuses_every_run(smoke, capsys):
    before = (smoke / "summary.json").read_text()
    capsys.readouterr()
    assert main([*SMOKE, "--out", str(smoke.parent)]) == 0
    out = capsys.readouterr().out
    assert out.count(": reused") == 32 and ": trained" not in out
    assert json.loads((smoke / "summary.json").read_text()) == json.loads(before)
