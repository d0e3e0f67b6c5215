import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moesaic.cli import main
from moesaic.config import load_config
from moesaic.errors import CheckpointError, ConfigError
from moesaic.train.loop import Trainer, TrainingDiverged
from moesaic.train.metrics import read_metrics
from tests.train_utils import KINDS, MICRO, MOE


def _cfg(tmp_path, *extra):
    return load_config("tiny", [*MICRO, f"out={tmp_path}", *extra])


def _losses(run_dir):
    return [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_loss_decreases(tmp_path, kind):
    cfg = _cfg(tmp_path, *KINDS[kind], "train.steps=40", "train.warmup=5", "eval.every=0")
    summary = Trainer(cfg).run()
    assert summary["status"] == "finished" and summary["skipped_steps"] == 0
    rows = _losses(tmp_path / "tiny")

    def mean(key, part):
        return sum(r[key] for r in part) / len(part)

    # 40 steps of 128 tokens: text falls by well over half a nat; image loss is noisier (one
    # flow time per image), so only the total is required to fall with it.
    assert mean("text_loss", rows[-5:]) < mean("text_loss", rows[:5]) - 0.5
    assert mean("loss", rows[-5:]) < mean("loss", rows[:5]) - 0.5
    assert set(summary["eval"]) >= {"text/text", "ood_text/text", "image/image"}


def _train_cmd(run_dir: Path, extra):
    return [
        sys.executable, "-m", "moesaic", "train", "tiny", *MICRO, *extra,
        f"out={run_dir.parent}", f"name={run_dir.name}",
    ]  # fmt: skip


def _run(cmd, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path.cwd(), **kw)


@pytest.mark.parametrize("kind", ["dense", "moe-bias"])
def test_sigkill_resume_is_bit_identical(tmp_path, kind):
    # Killed between steps 5 and 14 of 24: the remaining steps leave the killer time to act
    # before the run could finish on a fast machine.
    extra = [*KINDS[kind], "train.steps=24", "train.checkpoint_every=4", "eval.every=8"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    Trainer(load_config("tiny", [*MICRO, *extra, f"out={tmp_path}", "name=ref"])).run()

    kill_at = random.Random(f"{kind}-kill").randint(5, 14)
    print(f"killing the {kind} run after step {kill_at}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_train_cmd(cut, extra), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        rows = _losses(cut) if (cut / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= kill_at:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "summary.json").exists(), "killed too late to test anything"
    resumed = _run([sys.executable, "-m", "moesaic", "train", "--resume", str(cut)])
    assert resumed.returncode == 0, resumed.stderr

    a = load_file(str(sorted((ref / "checkpoints").iterdir())[-1] / "model.safetensors"))
    b = load_file(str(sorted((cut / "checkpoints").iterdir())[-1] / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume from step {kill_at}"
    strip = ("tokens_per_s",)
    rows = [
        [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(d / "metrics.jsonl")]
        for d in (ref, cut)
    ]
    assert rows[0] == rows[1]
    sa = json.loads((ref / "summary.json").read_text())
    sb = json.loads((cut / "summary.json").read_text())
    assert sa["eval"] == sb["eval"]


def test_sigterm_saves_checkpoint_and_exits(tmp_path):
    run_dir = tmp_path / "term"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    extra = ["train.steps=500", "train.checkpoint_every=0", "eval.every=0"]
    proc = subprocess.Popen(_train_cmd(run_dir, extra), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in out
    ckpts = list((run_dir / "checkpoints").iterdir())
    assert len(ckpts) == 1 and not (run_dir / "summary.json").exists()


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=8", "train.max_bad_steps=3", "eval.every=0")
    trainer = Trainer(cfg)
    real_forward = trainer.model.forward
    poisoned = {2, 3, 6}

    def forward(batch, **kw):
        out = real_forward(batch, **kw)
        if trainer.step in poisoned:
            out.loss = out.loss * float("nan")
        return out

    trainer.forward = forward
    summary = trainer.run()
    assert summary["skipped_steps"] == 3
    rows = _losses(tmp_path / "tiny")
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 2, 3, 3]
    ckpt_dir = next((tmp_path / "tiny" / "checkpoints").iterdir())
    for t in load_file(str(ckpt_dir / "model.safetensors")).values():
        assert torch.isfinite(t).all()


def test_consecutive_non_finite_steps_stop_the_run(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=20", "train.max_bad_steps=3", "train.checkpoint_every=2",
               "eval.every=0")  # fmt: skip
    trainer = Trainer(cfg)
    real_forward = trainer.model.forward

    def forward(batch, **kw):
        out = real_forward(batch, **kw)
        if trainer.step >= 4:
            out.loss = out.loss * float("inf")
        return out

    trainer.forward = forward
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        trainer.run()
    latest = sorted((tmp_path / "tiny" / "checkpoints").iterdir())[-1]
    for t in load_file(str(latest / "model.safetensors")).values():
        assert torch.isfinite(t).all()


def test_resume_refusals(tmp_path, capsys):
    cfg = _cfg(tmp_path, "train.steps=4", "eval.every=0", "train.checkpoint_every=2")
    Trainer(cfg).run()
    run_dir = tmp_path / "tiny"
    assert main(["train", "--resume", str(run_dir), "model.dim=64"]) == 2
    assert "cannot change when resuming" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="already exists"):
        Trainer(cfg)
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    # newest checkpoint truncated: reported and skipped, the previous one is used
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    model_file = newest / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    trainer = Trainer(load_config(run_dir / "config.yaml", ["train.steps=6"]), run_dir, resume=True)
    assert trainer.step == 2
    # a checkpoint written by another config is refused
    other = _cfg(tmp_path / "other", "train.steps=2", "model.ffn.hidden=96")
    Trainer(other).run()
    foreign = sorted((tmp_path / "other" / "tiny" / "checkpoints").iterdir())[-1]
    os.rename(foreign, run_dir / "checkpoints" / "step-00000009")
    with pytest.raises(CheckpointError, match="different config"):
        Trainer(load_config(run_dir / "config.yaml"), run_dir, resume=True)


def test_cli_errors_are_one_line(tmp_path, capsys):
    res = subprocess.run([sys.executable, "-m", "moesaic", "train", "tiny", "model.ffn.expert=3"],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (
        "error: unknown config key 'model.ffn.expert'; did you mean 'model.ffn.experts'?"
    )
    for args, fragment in [
        (["train", "tiny", "train.lr=fast"], "must be a number"),
        (["train", "no-such-preset"], "no preset"),
        (["eval", str(tmp_path)], "not a moesaic run directory"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and fragment in err


def test_info_reports_sizes(capsys):
    assert main(["info", "tiny-moe"]) == 0
    out = capsys.readouterr().out
    total = int(out.split("params total")[1].split()[0].replace(",", ""))
    active = int(out.split("params active")[1].split()[0].replace(",", ""))
    flops = float(out.split("FLOPs/token")[1].split()[0].replace(",", ""))
    cfg = load_config("tiny-moe")
    ffn, D, L = cfg.model.ffn, cfg.model.dim, cfg.model.layers
    expert = 3 * D * ffn.expert_hidden  # SwiGLU: gate, up and down
    moe_layers = len(range(ffn.every - 1, L, ffn.every))
    assert total - active == moe_layers * (ffn.experts - ffn.active_experts) * expert
    # 6 FLOPs per matmul parameter (active, minus the embedding lookup and norm weights) plus
    # the attention term 12·L·D·seq_len
    embed, norms = cfg.data.vocab_size * D, (2 * L + 1) * D + 2 * L * (D // cfg.model.heads)
    assert flops == 6 * (active - embed - norms) + 12 * L * D * cfg.data.seq_len


def test_adamw_is_fused_for_plain_tensors_and_foreach_otherwise():
    from moesaic.train.optim import build_optimizer

    cfg = load_config(None, MICRO)
    model = torch.nn.Linear(4, 4)
    assert build_optimizer(model, cfg.train).defaults["fused"]
    meta = torch.nn.Linear(4, 4, device="meta")  # a device fused AdamW does not run on
    opt = build_optimizer(meta, cfg.train)
    assert not opt.defaults["fused"] and opt.defaults["foreach"]


@pytest.mark.filterwarnings("ignore")
def test_compiled_moe_training_matches_eager(tmp_path):
    """train.compile=true runs an MoE model (dispatch stays eager inside the compiled graph).

    Two threads: the compiler's parallel scatter code is what failed on the balancing loss."""
    evals, threads = {}, torch.get_num_threads()
    try:
        for flag in ("false", "true"):
            cfg = load_config(
                "tiny",
                [*MICRO, *MOE, "model.ffn.aux_loss=0.01", "model.ffn.z_loss=1e-4",
                 "train.steps=2", "eval.every=0", "train.checkpoint_every=0", "train.threads=2",
                 f"train.compile={flag}", f"out={tmp_path / flag}"],
            )  # fmt: skip
            evals[flag] = Trainer(cfg).run()["eval"]
    finally:
        torch.set_num_threads(threads)
    assert evals["true"].keys() == evals["false"].keys()
    for key, value in evals["false"].items():
        assert evals["true"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("kind", list(KINDS))
def test_bf16_mixed_precision_trains_every_ffn_kind(tmp_path, kind):
    """train.precision=bf16 (the CUDA default) on CPU: balancing losses stay fp32, norms keep
    their fused kernel, and every loss is finite."""
    import warnings

    extra = ["model.ffn.aux_loss=0.01", "model.ffn.z_loss=1e-4"] if "moe" in kind else []
    cfg = _cfg(tmp_path, *KINDS[kind], *extra, "train.precision=bf16", "train.steps=3",
               "eval.every=0", "train.checkpoint_every=0")  # fmt: skip
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch's warn-once warnings too, whatever ran before
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = Trainer(cfg).run()
    finally:
        torch.set_warn_always(warn_always)
    assert summary["status"] == "finished" and summary["skipped_steps"] == 0
    assert all(math.isfinite(v) for v in summary["eval"].values())
    assert not [w for w in caught if "Mismatch dtype" in str(w.message)]
