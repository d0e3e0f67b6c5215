"""`moesaic bench memory`: the report has its schema; figures are ratios to the reference."""

import json

import pytest

from moesaic.cli import main
from moesaic.config import MemoryConfig
from tests.train_utils import MICRO


def test_bench_memory_writes_ratios_to_the_reference(tmp_path, capsys):
    out = tmp_path / "memory.json"
    args = ["--table-rows", "1009", "--heads", "2", "--dim", "8", "--steps", "1", "--rounds", "2",
            "--warmup", "1", "--threads", "1", "--omp-wait-policy", "inherit",
            "--json", str(out)]  # fmt: skip
    assert main(["bench", "memory", "tiny", *MICRO, *args]) == 0
    report = json.loads(out.read_text())
    assert {"machine", "torch", "threads", "memory", "rows", "optimizer_step"} <= set(report)
    rows = {r["config"]: r for r in report["rows"]}
    assert set(rows) == {"reference", "memory, lazy Adam", "memory, dense AdamW"}
    ref = rows["reference"]
    assert ref["ratio_to_reference"] == 1.0 and ref["memory_share"] == 0.0
    assert ref["ratio_per_round"] == [1.0, 1.0]
    tables = 1 + sum(MemoryConfig(layers=[1], heads=2, table_rows=1009).table_moduli())
    assert report["memory"]["table_rows_total"] == tables
    for name in ("memory, lazy Adam", "memory, dense AdamW"):
        r = rows[name]
        assert r["ratio_to_reference"] == pytest.approx(r["step_s"] / ref["step_s"])
        assert r["memory_share"] == pytest.approx(1 - ref["step_s"] / r["step_s"])
        assert r["cpu_memory_share"] == pytest.approx(1 - ref["cpu_step_s"] / r["cpu_step_s"])
        assert (
            r["params_total"] - ref["params_total"] == tables * 8 + 2 * 4 * 8 * 32 + 7 * 32
        )  # gate norms, conv + norm
        assert (
            r["params_active"] - ref["params_active"] == 4 * 8 + 2 * 4 * 8 * 32 + 7 * 32
        )  # gate norms, conv + norm
    opt = report["optimizer_step"]
    assert opt["table_rows"] == tables and opt["lookups"] == 2 * 64 * 4
    assert opt["dense_adamw_share_of_reference_step"] > 0 < opt["lazy_rows_share_of_reference_step"]
    assert opt["cpu_dense_adamw_share_of_reference_step"] > 0
    assert "memory, lazy Adam" in capsys.readouterr().out
