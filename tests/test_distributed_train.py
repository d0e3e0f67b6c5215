"""The training loop and `moesaic train` with several processes (gloo on CPU): exact sharded
resume, resume with a different number of processes (2 → 1 → 2), rank-0-only run files, and
the real `torchrun` command line (slow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moesaic.cli import main
from moesaic.config import load_config
from moesaic.runconfig import load_run_config
from moesaic.train.loop import Trainer
from moesaic.train.metrics import read_metrics
from tests.dist_utils import run_distributed
from tests.train_utils import MICRO, MOE

BASE = [*MICRO, "eval.every=0", "train.checkpoint_every=2", "train.warmup=2"]


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == kind]


def _train(out: str, name: str, extra: list[str]) -> dict:
    trainer = Trainer(load_config("tiny", [*BASE, f"out={out}", f"name={name}", *extra]))
    try:
        return trainer.run()
    finally:
        trainer.close()


def _resume(run_dir: str, steps: int) -> dict:
    """Resume on every rank; the eval losses right after loading, then the finished run."""
    trainer = Trainer(load_run_config(Path(run_dir), [f"train.steps={steps}"]), run_dir, True)
    try:
        loaded = trainer.evaluate()[0]
        return {"loaded": loaded, "summary": trainer.run(), "world": trainer.world.world_size}
    finally:
        trainer.close()


def test_sharded_resume_at_the_same_world_size_is_exact(tmp_path):
    """MoE with bias balancing and expert parallelism: resuming the step-2 checkpoint of a
    4-step run replays steps 3-4 exactly (weights, optimizer, biases, every rank's data)."""
    extra = [*MOE, "model.ffn.bias_rate=0.01", "dist.expert_parallel=2", "train.steps=4"]
    full = run_distributed(_train, 2, str(tmp_path), "run", extra)
    assert [s["status"] for s in full] == ["finished", "finished"]
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "step-00000002"
    assert (ckpt / "dcp").is_dir() and (ckpt / "model.safetensors").is_file()
    assert not list(ckpt.rglob("*.metadata"))
    first = _records(run_dir, "train")
    assert [r["step"] for r in first] == [1, 2, 3, 4]  # rank 0 alone wrote the log
    final_eval = _records(run_dir, "eval")[-1]
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")
    (run_dir / "summary.json").unlink()

    run_distributed(_resume, 2, str(run_dir), 4)
    again = _records(run_dir, "train")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for x, y in zip(first, again, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7)
        assert x["tokens"] == y["tokens"] == x["step"] * 2 * 2 * 64  # ranks × rows × seq_len
    assert _records(run_dir, "eval")[-1]["losses"] == pytest.approx(final_eval["losses"], rel=1e-6)


def _cli(out: str) -> int:
    overrides = [*BASE, *MOE, "train.steps=2", f"out={out}", "name=cli"]
    return main(["train", "tiny", *overrides])


def test_resume_with_another_number_of_processes(tmp_path):
    """2 ranks (through the CLI) → 1 process → 2 ranks: each resume starts from exactly the
    saved weights (same eval losses), continues the step count and the log."""
    assert run_distributed(_cli, 2, str(tmp_path)) == [0, 0]
    run_dir = tmp_path / "cli"
    saved_eval = _records(run_dir, "eval")[-1]
    assert saved_eval["step"] == 2 and (run_dir / "summary.json").is_file()

    one = _resume(str(run_dir), 3)  # this process: WORLD_SIZE unset
    assert one["world"] == 1
    assert one["loaded"]["losses"] == pytest.approx(saved_eval["losses"], rel=1e-5)
    # the 2-rank eval dealt the batches out and summed the routing counts over ranks
    assert one["loaded"]["routing"] == saved_eval["routing"] and saved_eval["routing"]
    assert one["summary"]["step"] == 3
    step3 = run_dir / "checkpoints" / "step-00000003"
    assert (step3 / "optimizer.safetensors").is_file() and not (step3 / "dcp").exists()

    two = run_distributed(_resume, 2, str(run_dir), 4)
    after_one = _records(run_dir, "eval")[-2]
    assert after_one["step"] == 3
    for rank in two:
        assert rank["world"] == 2
        assert rank["loaded"]["losses"] == pytest.approx(after_one["losses"], rel=1e-5)
        assert rank["loaded"]["routing"] == after_one["routing"]
    train = _records(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    tokens = [r["tokens"] for r in train]
    assert tokens == [256, 512, 640, 896]  # 2 ranks, then 1, then 2 again


@pytest.mark.slow
def test_torchrun_command_line(tmp_path):
    """`torchrun --nproc_per_node 2 -m moesaic train tiny ...` end to end (fresh processes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOESAIC_CACHE": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "moesaic",
        "train",
        "tiny",
        *BASE,
        *MOE,
        "train.steps=2",
        "dist.expert_parallel=2",
        f"out={tmp_path}",
        "name=torchrun",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("finished 2 steps") == 1  # printed by rank 0 only
    assert [r["step"] for r in _records(tmp_path / "torchrun", "train")] == [1, 2]
    assert (tmp_path / "torchrun" / "checkpoints" / "step-00000002" / "dcp").is_dir()
