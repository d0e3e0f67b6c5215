"""The command line: options and overrides in any order, and the commands that load a run
(`eval`, `sample`, `analyze`) refusing a run whose config or weights changed with one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moesaic.cli import build_parser, main
from moesaic.files import sha256_file
from moesaic.train import checkpoint as ckpt
from tests.train_utils import MICRO

# ------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["train", "tiny", "--out", "X", "--name", "Y", "train.steps=3"],
            {"config": "tiny", "overrides": ["train.steps=3"], "out": "X", "name": "Y"},
        ),
        (
            ["train", "--name", "Y", "tiny", "a.b=1", "--out", "X", "c.d=2"],
            {"config": "tiny", "overrides": ["a.b=1", "c.d=2"], "out": "X", "name": "Y"},
        ),
        (
            ["train", "train.steps=9", "--resume", "runs/x", "eval.every=0"],
            {"config": "train.steps=9", "overrides": ["eval.every=0"], "resume": "runs/x"},
        ),
        (["info", "tiny", "model.dim=64"], {"target": "tiny", "overrides": ["model.dim=64"]}),
        (
            [
                "compete",
                "--preset",
                "smoke",
                "study.steps=2",
                "--seeds",
                "1",
                "x.y=1",
                "--jobs",
                "1",
            ],
            {"args": ["study.steps=2", "x.y=1"], "preset": "smoke", "seeds": 1, "jobs": 1},
        ),
        (
            ["bench", "data", "tiny", "--seconds", "0.5", "data.seq_len=128", "--json", "j", "a=1"],
            {"config": "tiny", "overrides": ["data.seq_len=128", "a=1"], "seconds": 0.5},
        ),
        (
            ["bench", "sample", "--images", "2", "tiny", "model.dim=64", "--steps", "3", "b=2"],
            {"config": "tiny", "overrides": ["model.dim=64", "b=2"], "images": 2, "steps": 3},
        ),
    ],
)
def test_options_and_overrides_mix_in_any_order(argv, expected):
    args = build_parser().parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected


def test_unknown_options_are_still_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "tiny", "--bogus", "a=1"])
    assert exit_info.value.code == 2 and "--bogus" in capsys.readouterr().err


def test_options_after_overrides_train_a_run(tmp_path, capsys):
    argv = ["train", "tiny", *MICRO, "--out", str(tmp_path), "train.steps=1", "--name", "mixed"]
    assert main(argv) == 0
    assert f"finished 1 steps in {tmp_path / 'mixed'}" in capsys.readouterr().out


# ------------------------------------------------------------------------------- loading a run


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli")
    overrides = [*MICRO, "train.steps=2", "train.checkpoint_every=1", "eval.every=0"]
    assert main(["train", "tiny", *overrides, f"out={out}", "name=run"]) == 0
    return out / "run"


COMMANDS = {
    "eval": lambda run: ["eval", str(run), "--batches", "1"],
    "sample": lambda run: [
        "sample",
        str(run),
        "--prompt",
        "a red circle",
        "--steps",
        "1",
        "--out",
        str(run / "sample.png"),
    ],  # fmt: skip
    "analyze": lambda run: ["analyze", str(run), "--batches", "1", "--no-plots"],
}


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_run_whose_config_no_longer_matches_is_refused(trained, tmp_path, capsys, command):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("hidden: 64", "hidden: 96"))
    err = _one_line_error(COMMANDS[command](run), capsys)
    assert "was written by a different config, not by" in err
    assert "restore the run's own config.yaml" in err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_weights_of_the_wrong_shape_are_refused(trained, tmp_path, capsys, command):
    """A checkpoint that verifies (re-hashed) but whose weights do not fit the model."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    newest = ckpt.list_checkpoints(run / "checkpoints")[-1]
    weights = load_file(str(newest / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = torch.zeros(3, 3)
    save_file(weights, str(newest / "model.safetensors"))
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {
        "bytes": (newest / "model.safetensors").stat().st_size,
        "sha256": sha256_file(newest / "model.safetensors"),
    }
    manifest["sha256"] = ckpt._manifest_hash(manifest)
    (newest / "manifest.json").write_text(json.dumps(manifest))
    err = _one_line_error(COMMANDS[command](run), capsys)
    assert f"checkpoint '{newest}' does not fit the model" in err


def test_eval_says_which_checkpoint_it_used(trained, tmp_path, capsys):
    """With the newest checkpoint corrupt, eval uses the one before, prints which and why, and
    records both in eval.json."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    step1, step2 = ckpt.list_checkpoints(run / "checkpoints")
    with open(step2 / "model.safetensors", "ab") as f:
        f.write(b"\0")
    assert main(COMMANDS["eval"](run)) == 0
    out = capsys.readouterr().out
    assert "warning: skipped a newer checkpoint:" in out
    assert f"evaluating {step1} (step 1)" in out
    result = json.loads((run / "eval.json").read_text())
    assert result["checkpoint"] == str(step1) and result["step"] == 1
    [why] = result["skipped_checkpoints"]
    size = (step2 / "model.safetensors").stat().st_size
    assert f"has {size} bytes, expected {size - 1}" in why


# ------------------------------------------------------------------------------- stuck runs


def test_a_start_killed_before_its_config_was_written(tmp_path, capsys):
    """Only a temporary file of the killed start is left: --resume says how to start it, and
    a fresh start under the same name proceeds (and removes the debris)."""
    run = tmp_path / "early"
    run.mkdir()
    (run / ".config.yaml.tmp-4242").write_text("name: ea")
    err = _one_line_error(["train", "--resume", str(run)], capsys)
    assert "has no config.yaml" in err
    assert f"start it with: moesaic train CONFIG name=early out={tmp_path}" in err
    argv = ["train", "tiny", *MICRO, "train.steps=1", f"out={tmp_path}", "name=early"]
    assert main(argv) == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_unwritable_run_directory_is_one_line(tmp_path, capsys, monkeypatch):
    """An unwritable `out` (simulated: chmod does not stop root) stops with one line."""
    import errno
    import os

    from moesaic.train import loop

    def denied(path, text):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(loop, "atomic_write_text", denied)
    argv = ["train", "tiny", *MICRO, "train.steps=1", f"out={tmp_path}", "name=ro"]
    err = _one_line_error(argv, capsys)
    assert "cannot write the run directory" in err and "Permission denied" in err
    assert f"make '{tmp_path / 'ro' / 'config.yaml'}' writable" in err


def test_a_full_disk_under_the_metrics_log_is_one_line(tmp_path, capsys, monkeypatch):
    import errno
    import os

    from moesaic.train.metrics import MetricsLog

    real, calls = MetricsLog.log, []

    def log(self, record):
        calls.append(record)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, record)

    monkeypatch.setattr(MetricsLog, "log", log)
    argv = ["train", "tiny", *MICRO, "train.steps=3", f"out={tmp_path}", "name=full"]
    err = _one_line_error(argv, capsys)
    assert f"cannot write the metrics log in '{tmp_path / 'full'}'" in err
    assert "No space left on device" in err and "free some disk space" in err


def test_a_run_without_checkpoint_or_tokenizer_resumes_from_step_0(trained, tmp_path, capsys):
    """Stopped between writing config.yaml and tokenizer.json: --resume makes the tokenizer
    again (the same one) and trains from step 0."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    tokenizer = (run / "tokenizer.json").read_text()
    for name in ("checkpoints", "summary.json", "tokenizer.json", "metrics.jsonl"):
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"no checkpoint in '{run}' yet: starting it from step 0" in out
    assert f"finished 2 steps in {run}" in out
    assert (run / "tokenizer.json").read_text() == tokenizer


def test_a_reader_that_goes_away_is_not_an_error(monkeypatch):
    """`moesaic info tiny | head -1`: writing to a closed pipe ends the command quietly, rc 0."""
    import os

    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    with open(write_fd, "w", buffering=1) as closed:  # line-buffered: each line hits the pipe
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["info", "tiny"]) == 0
