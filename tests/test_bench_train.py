"""`moesaic bench train`: the report has its schema; figures are ratios to the dense preset."""

import argparse
import json

import pytest

from moesaic.bench import train as bench


def test_bench_train_writes_report(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "train.json"
    args = parser.parse_args(
        [
            "--steps",
            "1",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--no-memory",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--omp-wait-policy",
            "inherit",
            "--json",
            str(out),
        ]  # fmt: skip
    )
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    import torch

    assert report["torch"] == torch.__version__ and report["threads"] == 1
    rows = {r["preset"]: r for r in report["rows"]}
    assert set(rows) == {"tiny-dense", "tiny-moe"}
    assert rows["tiny-dense"]["ratio_to_dense"] == 1.0
    moe, dense = rows["tiny-moe"], rows["tiny-dense"]
    assert moe["ratio_to_dense"] == pytest.approx(moe["tokens_per_s"] / dense["tokens_per_s"])
    assert dense["ratio_per_round"] == [1.0, 1.0] and len(moe["ratio_per_round"]) == 2
    lo, hi = min(moe["ratio_per_round"]), max(moe["ratio_per_round"])
    assert lo <= moe["ratio_to_dense"] * 1.000001 and moe["ratio_to_dense"] <= hi * 1.000001
    assert moe["params_total"] > moe["params_active"]  # experts not all active
    assert dense["params_total"] == dense["params_active"]
    assert abs(moe["params_active"] / dense["params_active"] - 1) < 0.01  # matched compute
    for r in rows.values():
        peak = r["matmul_peak_gflops"] * 1e9
        assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / peak)
        assert 0 < r["mfu"] < 1.5  # a step cannot run far faster than a large matmul
