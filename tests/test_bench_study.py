"""`moesaic bench study`: phase shares sum to one and the ideal is the in-process FLOP bound."""

import argparse
import json

import pytest

from moesaic.bench import study as bench


def test_bench_study_report(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "matmul_peak", lambda device: 2.0e10)  # a known peak
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "study.json"
    args = parser.parse_args(
        [
            "--widths",
            "32",
            "--preset",
            "smoke",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--omp-wait-policy",
            "inherit",
            "--json",
            str(out),
        ]
    )
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    assert report["matmul_peak_gflops"] == 20.0
    rows = {(r["arm"], r["variant"]): r for r in report["rows"]}
    assert set(rows) == {("dense", "text"), ("dense", "joint"), ("moe", "text"), ("moe", "joint")}
    for r in rows.values():
        assert sum(r["phase_share"].values()) == pytest.approx(1.0)
        assert r["ideal_steps_per_s"] == pytest.approx(2.0e10 / r["flops_per_step"])
        assert r["of_ideal"] == pytest.approx(r["steps_per_s"] / r["ideal_steps_per_s"])
    # the joint run stacks a text and an image batch: twice the tokens, so twice the FLOPs
    text, joint = rows[("dense", "text")], rows[("dense", "joint")]
    assert joint["flops_per_step"] == pytest.approx(2 * text["flops_per_step"])
