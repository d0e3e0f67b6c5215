"""The study report: self-contained HTML, escaped text, renders in headless Chromium."""

import re

import numpy as np
import pytest
import torch
from render_check import check_rendering, find_chromium

from moesaic.analysis import sparsity
from moesaic.analysis.specialization import routing_specialization
from moesaic.analysis.tax import LOSS_METRICS, tax_cell
from moesaic.jsonsafe import json_safe
from moesaic.report import plots
from moesaic.report.html import HtmlReport
from moesaic.report.study import study_report, verdicts

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install -y chromium); "
    "the report-rendering check needs a headless browser",
)
ARMS = ("dense", "modality", "moe")


def _routing(rng, layers=2, experts=8):
    out = {}
    for i in range(layers):
        mod = rng.integers(0, 50, size=(2, experts))
        out[str(i)] = {
            "modality": mod,
            "tokens": mod.sum(1) // 2,
            "doc_kind": rng.integers(0, 30, size=(5, experts)),
            "time": rng.integers(0, 10, size=(10, experts)),
        }
    return out


def _records(steps, text, image, rng):
    recs = []
    for s in range(1, steps + 1):
        r = {"kind": "train", "step": s}
        if text:
            r["text_loss"] = 6 * np.exp(-s / 20) + 2 + 0.1 * rng.random()
        if image:
            r["image_loss"] = "nan" if s == 3 else 1 + np.exp(-s / 30)
        recs.append(r)
        if s % 10 == 0:
            recs.append(
                {"kind": "eval", "step": s, "losses": {"text/text": 3.0, "image/image": 1.2}}
            )
    return recs


def synthetic_study(root):
    """A summary.json-shaped study from hand-built numbers, with run directories under `root`
    holding metrics.jsonl (loss curves) and the MoE arm's analysis.json."""
    import json

    from moesaic.analysis.stats import paired, with_holm

    rng = np.random.default_rng(0)
    arms, taxes = {}, {}
    for i, arm in enumerate(ARMS):
        cells = {}
        for m in LOSS_METRICS:
            u = {"text": [3.0, 3.1, 3.05], "image": [1.0, 1.1, 1.05]}.get(m.modality)
            j = [x * (1.05 - 0.03 * i) + 0.001 * k for k, x in enumerate(u or [2.5, 2.6, 2.55])]
            cell = tax_cell(m, u if m.modality else [], j)
            cells[m.key] = cell.to_dict()
            taxes[(arm, m.key)] = list(cell.tax.values)
        runs = {}
        for variant, (text, image, steps) in {
            "text": (True, False, 30),
            "image": (False, True, 30),
            "joint": (True, True, 30),
        }.items():
            d = root / f"{arm}-{variant}-s0"
            d.mkdir(parents=True)
            lines = [json.dumps(r) for r in _records(steps, text, image, rng)]
            (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
            runs[variant] = [str(d)]
        arms[arm] = {
            "description": f"<{arm}> & co",
            "params_total": 1e6 * (i + 1),
            "params_active": 1e6,
            "ffn_params_total": 3e5 * (i + 1),
            "ffn_params_active": 3e5,
            "flops_per_token": 6e6,
            "train_flops": {"study": 4e12},
            "runs": runs,
            "metrics": cells,
        }
    comparisons = {
        arm: {
            k: t.to_dict()
            for k, t in with_holm(
                {
                    m.key: paired(taxes[(arm, m.key)], taxes[("dense", m.key)])
                    for m in LOSS_METRICS
                    if m.modality
                }
            ).items()
        }
        for arm in ARMS[1:]
    }
    h = torch.randn(50, 16)
    sets = {"text": [sparsity.summarize(h)] * 2, "ood_text": [sparsity.summarize(h**3)] * 2}
    analysis = json_safe(
        {
            "specialization": routing_specialization(_routing(rng), k=2),
            "sparsity": {"sets": sets, "ood_minus_id": sparsity.compare(sets, "text", "ood_text")},
        }
    )
    (root / "moe-joint-s0" / "analysis.json").write_text(json.dumps(analysis))
    summary = json_safe(
        {
            "schema": "moesaic-study/1",
            "experiment": "tax",
            "study": {
                "name": "synthetic <study>",
                "description": "a <b>test</b> study",
                "seeds": 3,
                "arms": list(ARMS),
            },
            "seeds": [0, 1, 2],
            "metrics": {m.key: m.to_dict() for m in LOSS_METRICS},
            "match": "steps",
            "arms": arms,
            "comparisons": comparisons,
            "fairness": {"match": "steps", "equal_steps": True, "equal_tokens": True, "runs": {}},
            "noise": {"text/text": {"eval_se_tax": 0.01, "seed_sd_tax": 0.1, "ratio": 0.1}},
            "specialization": {"moe": {"fraction_text": {"mean": 0.5, "ci95": [0.4, 0.6], "n": 3}}},
            "analysis_first_seed": {"moe": str(root / "moe-joint-s0")},
            "data": {
                "image_mix": {"caption_image": 0.75, "image": 0.25},
                "caption_shift": {"unigram_js": 0.3, "bigram_js": 0.6, "register": "terse"},
            },
        }
    )
    return summary


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    summary = synthetic_study(root / "runs")
    path = study_report(summary, root).write(root / "report.html")
    return summary, path


def test_report_is_self_contained_and_escaped(report):
    summary, path = report
    page = path.read_text()
    assert "<b>test</b>" not in page and "&lt;b&gt;test&lt;/b&gt;" in page
    assert "synthetic &lt;study&gt;" in page
    # no external resources: every src is a data URI, no http(s) URL or CSS url() anywhere
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) >= 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"https?://", page) and "url(" not in page and "<script" not in page


def test_verdicts_follow_the_intervals(report):
    summary, path = report
    lines = verdicts(summary)
    text = next(line for line in lines if line.startswith("text CE (in-distribution)"))
    # dense's joint runs are 5 % worse at every seed (interval excludes 0), moe's 1 % better
    assert "dense +5.03 [+4.95, +5.11]% (competition)" in text
    assert "moe -0.97 [-1.05, -0.89]% (synergy)" in text
    moe = next(line for line in lines if line.startswith("moe vs dense"))
    holm = summary["comparisons"]["moe"]["text/text"]["p_holm"]
    assert ("differs" if holm < 0.05 else "not distinguishable") in moe.split(";")[0]
    page = path.read_text()
    assert "Each arm against dense (paired by seed)" in page and "p (Holm)" in page


def test_figures_tolerate_missing_values():
    fig = plots.tax_bars(
        {"a": {"text/text": {"mean": None, "ci95": [None, None]}}}, {"text/text": "t"}
    )
    r = HtmlReport("x")
    r.figure(fig, "empty bars")
    assert "data:image/png;base64," in r.html()


@needs_chromium
def test_report_renders_in_chromium(report):
    result = check_rendering(report[1], CHROMIUM)
    assert result.status == f"ok:{result.images}" and result.images >= 6, result
    assert result.console == [] and result.ok


@needs_chromium
def test_render_check_detects_broken_images_and_script_errors(tmp_path):
    r = HtmlReport("broken")
    r.parts.append('<img src="data:image/png;base64,AAAA" alt="bad-image">')
    r.parts.append("<script>notDefinedAnywhere();</script>")
    result = check_rendering(r.write(tmp_path / "broken.html"), CHROMIUM)
    assert result.status.startswith("broken:bad-image")
    assert "notDefinedAnywhere" in result.status
    assert result.console and not result.ok
