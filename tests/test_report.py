"""The study report: self-contained HTML, escaped text, renders in headless Chromium."""

import re

import numpy as np
import pytest
import torch
from render_check import check_rendering, find_chromium

from moesaic.analysis import sparsity
from moesaic.analysis.specialization import routing_specialization
from moesaic.analysis.tax import LOSS_METRICS, tax_difference, tax_table
from moesaic.jsonsafe import json_safe
from moesaic.report import plots
from moesaic.report.html import HtmlReport
from moesaic.report.study import plain_summary, study_report

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


def synthetic_study():
    """A summary in the summary.json schema, curves and analyses, from hand-built numbers."""
    rng = np.random.default_rng(0)
    results = {}
    for i, arm in enumerate(ARMS):
        u = {"text/text": [3.0, 3.1], "ood_text/text": [4.0, 4.2], "image/image": [1.0, 1.1]}
        results[arm] = {
            "text": {k: v for k, v in u.items() if "text" in k},
            "image": {"image/image": u["image/image"]},
            "joint": {k: [x * (1.05 - 0.03 * i) for x in v] for k, v in u.items()}
            | {"caption/text": [2.5, 2.6]},
        }
    table = tax_table(results)
    arms = {
        arm: {
            "description": f"<{arm}> & co",
            "params_total": 1e6 * (i + 1),
            "params_active": 1e6,
            "ffn_params_total": 3e5 * (i + 1),
            "ffn_params_active": 3e5,
            "flops_per_token": 6e6,
            "train_flops": {"text": 1e12, "image": 1e12, "joint": 2e12, "study": 4e12},
            "runs": {},
            "metrics": {k: c.to_dict() for k, c in table[arm].items()},
            "tax_minus_baseline": {
                k: tax_difference(table, arm, "dense", k).to_dict()
                for k in ("text/text", "image/image")
            },
        }
        for i, arm in enumerate(ARMS)
    }
    summary = json_safe({
        "schema": "moesaic-compete/1",
        "study": {"name": "synthetic <study>", "description": "a <b>test</b> study", "seeds": 2,
                  "arms": list(ARMS)},
        "seeds": [0, 1],
        "metrics": {m.key: {"label": m.label, "modality": m.modality,
                            "higher_is_better": m.higher_is_better} for m in LOSS_METRICS},
        "data": {"steps": {"text": 30, "image": 30, "joint": 60},
                 "mix": {"text": {"text": 1.0}, "image": {"caption_image": 0.75, "image": 0.25}},
                 "coverage": {"0": {"ratio": {"text": 1.0, "image": 0.99}}},
                 "caption_shift": {"unigram_js": 0.3, "bigram_js": 0.6, "register": "terse"}},
        "arms": arms,
        "least_tax": {"text/text": "moe", "ood_text/text": "moe", "image/image": "moe"},
    })  # fmt: skip
    curves = {
        arm: {
            "text": _records(30, True, False, rng),
            "image": _records(30, False, True, rng),
            "joint": _records(60, True, True, rng),
        }
        for arm in ARMS
    }
    h = torch.randn(50, 16)
    sets = {"text": [sparsity.summarize(h)] * 2, "ood_text": [sparsity.summarize(h**3)] * 2}
    analyses = {
        arm: json_safe({
            "specialization": routing_specialization(_routing(rng), k=2) if arm == "moe" else None,
            "sparsity": {"sets": sets, "ood_minus_id": sparsity.compare(sets, "text", "ood_text")},
        })
        for arm in ARMS
    }  # fmt: skip
    return summary, curves, analyses


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    summary, curves, analyses = synthetic_study()
    path = study_report(summary, curves, analyses).write(
        tmp_path_factory.mktemp("report") / "report.html"
    )
    return summary, path


def test_report_is_self_contained_and_escaped(report):
    summary, path = report
    page = path.read_text()
    assert "<b>test</b>" not in page and "&lt;b&gt;test&lt;/b&gt;" in page
    assert "synthetic &lt;study&gt;" in page
    # no external resources: every src is a data URI, no http(s) URL or CSS url() anywhere
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) >= 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"https?://", page) and "url(" not in page
    # the plain-language summary names the arm with the least tax
    lines = plain_summary(summary)
    assert lines[0].startswith("text CE (in-distribution): 'moe' pays the least tax")
    assert "'dense' the most" in lines[0]
    assert "Tax relative to dense (paired by seed)" in page and "-3.00 ± 0.00 * pp" in page


def test_figures_tolerate_missing_values():
    fig = plots.tax_bars({"a": {"text/text": {"mean": None, "std": None}}}, {"text/text": "t"})
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
