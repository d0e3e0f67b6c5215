"""The fault suite: runs killed, stopped, corrupted, poisoned or starved at chosen moments.

Each fault either resumes to bit-identical weights, metrics and final losses (compared with an
uninterrupted reference run of the same config), or stops with one line and a documented exit
code; nothing written is ever non-finite or half-written.

Faults are injected in child processes started from the distributed tests' fork server (torch
already imported, so a child costs a fork, not an interpreter start): a small driver patches
the trainer (e.g. "SIGKILL myself after step 3", "SIGKILL myself just before the checkpoint
rename") and runs the real `moesaic train` command line. Random kill points print their seed;
set MOESAIC_FAULT_SEED to replay one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moesaic.cli import main
from moesaic.train import checkpoint as ckpt
from moesaic.train.loop import Trainer
from moesaic.train.metrics import read_metrics
from tests import dist_utils
from tests.train_utils import MICRO, MOE

STEPS = 8
CONFIG = [
    *MICRO,
    f"train.steps={STEPS}",
    "train.checkpoint_every=2",
    "train.warmup=2",
    "eval.every=4",
    "logging.every=1",
]


def _argv(run_dir: Path, *extra: str) -> list[str]:
    """`moesaic train` with options and overrides intermixed, as a user may type them."""
    return ["train", "tiny", *CONFIG, "--out", str(run_dir.parent), *extra, "--name", run_dir.name]


# ------------------------------------------------------------------------------- the driver


def _after_step(n: int, action):
    """Patch the trainer to call `action()` right after optimizer step `n`."""
    real = Trainer.train_step

    def train_step(self):
        values = real(self)
        if self.step == n:
            action()
        return values

    Trainer.train_step = train_step


def _before_step(n: int, action):
    """Patch the trainer to call `action()` once step `n` is complete (logged, evaluated and
    checkpointed), before step `n + 1` begins."""
    real = Trainer.train_step

    def train_step(self):
        if self.step == n:
            action()
        return real(self)

    Trainer.train_step = train_step


def _kill_self(signum: int = signal.SIGKILL):
    return lambda: os.kill(os.getpid(), signum)


def _install(hook: str) -> None:
    """Fault hooks, by name: `kill-at:N`, `term-at:N`, `kill-before-rename:N`,
    `kill-after-tensors:N`, `term-in-final-eval`, `term-at-start`, `int-at-start`."""
    name, _, arg = hook.partition(":")
    if name == "kill-at":
        _before_step(int(arg), _kill_self())
    elif name == "term-at":
        _after_step(int(arg), _kill_self(signal.SIGTERM))
    elif name == "kill-before-rename":  # everything written, the rename not done
        real = os.rename

        def rename(src, dst):
            if Path(src).name.startswith(f".tmp-{ckpt.checkpoint_dir_name(int(arg))}"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)

        os.rename = rename
    elif name == "kill-after-tensors":  # tensor files written, no state.json / manifest yet
        real_publish = ckpt.publish

        def publish(root, tmp, step, state):
            if step == int(arg):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_publish(root, tmp, step, state)

        ckpt.publish = publish
    elif name == "term-in-final-eval":
        real_eval = Trainer.evaluate

        def evaluate(self):
            if self.step == self.cfg.train.steps:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_eval(self)

        Trainer.evaluate = evaluate
    elif name in ("term-at-start", "int-at-start"):
        real_build = Trainer._build
        signum = signal.SIGTERM if name == "term-at-start" else signal.SIGINT

        def build(self, cfg, resume):
            real_build(self, cfg, resume)
            os.kill(os.getpid(), signum)  # the run directory is written; training not begun

        Trainer._build = build
    elif name:
        raise ValueError(hook)


def _child(argv: list[str], hook: str, log: str, env: dict[str, str]) -> None:
    """A child process: stdout/stderr to files, the fault hook, then the real command line."""
    os.environ.clear()
    os.environ.update(env)
    for fd, suffix in ((1, ".out"), (2, ".err")):
        target = os.open(log + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    torch.set_num_threads(1)
    # A shell starts background jobs with SIGINT ignored, and Python keeps that; the child
    # stands for a command typed in a terminal, where Ctrl-C raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _install(hook)
    rc = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def run_child(argv: list[str], hook: str, log: Path, timeout: float = 300.0):
    """(exit code, stdout, stderr) of `moesaic <argv>` in a child with `hook` installed."""
    env = {k: v for k, v in os.environ.items() if k not in dist_utils.worker_env(0, 1, 0)}
    proc = dist_utils._context().Process(target=_child, args=(argv, hook, str(log), env))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"moesaic {' '.join(argv)} with {hook} did not finish")
    return proc.exitcode, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


# ------------------------------------------------------------------------------- checks


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every faulted run must reproduce exactly."""
    run_dir = tmp_path_factory.mktemp("faults") / "ref"
    assert main(_argv(run_dir)) == 0
    return run_dir


def _rows(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k != "tokens_per_s"}
        for r in read_metrics(run_dir / "metrics.jsonl")
    ]


def assert_nothing_half_written(run_dir: Path) -> None:
    """Every visible checkpoint verifies and holds finite tensors; every log line is whole."""
    for path in ckpt.list_checkpoints(run_dir / "checkpoints"):
        ckpt.verify_checkpoint(path)
        for file in path.rglob("*.safetensors"):  # weights, optimizer state, shards
            if file.name != "rng.safetensors":
                for key, t in load_file(str(file)).items():
                    assert torch.isfinite(t).all(), f"{file}: {key} is not finite"
    if (run_dir / "metrics.jsonl").is_file():
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert all(json.loads(line) for line in lines)


def assert_same_as(reference: Path, run_dir: Path, context: str) -> None:
    """Bit-identical final weights, metrics log and final losses."""
    final = ckpt.checkpoint_dir_name(STEPS)
    a = load_file(str(reference / "checkpoints" / final / "model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / final / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs ({context})"
    assert _rows(reference) == _rows(run_dir), context
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (reference, run_dir))
    assert sa["eval"] == sb["eval"] and sa["step"] == sb["step"] == STEPS, context
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary directories left after resuming ({context})"


def _resume(run_dir: Path, capsys) -> str:
    assert main(["train", "--resume", str(run_dir)]) == 0
    return capsys.readouterr().out


# ------------------------------------------------------------------------------- kills


@pytest.mark.parametrize("when", ["before-the-first-checkpoint", "at-a-random-step"])
def test_sigkill_resumes_bit_identically(reference, tmp_path, capsys, when):
    """SIGKILL after step 1 (no checkpoint yet: --resume starts over from step 0, and cuts the
    log back) or after a random later step (seeded; the seed is printed)."""
    seed = int(os.environ.get("MOESAIC_FAULT_SEED", random.randrange(1 << 16)))
    step = 1 if when.startswith("before") else random.Random(seed).randint(2, STEPS - 1)
    print(f"fault seed {seed}: SIGKILL after step {step}")
    run_dir = tmp_path / "cut"
    rc, _, _ = run_child(_argv(run_dir), f"kill-at:{step}", tmp_path / "log")
    assert rc == -signal.SIGKILL
    assert_nothing_half_written(run_dir)
    out = _resume(run_dir, capsys)
    if step < 2:  # killed before the first checkpoint: the run starts over, and says so
        assert f"no checkpoint in '{run_dir}' yet: starting it from step 0" in out
    assert_same_as(reference, run_dir, f"seed {seed}, killed after step {step}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "moe-bias"])
def test_sigkill_at_every_step_resumes_bit_identically(tmp_path, capsys, kind):
    """The longer variant: an MoE run (bias balancing) and a dense one, killed after every step
    in turn, each resumed to the uninterrupted run's exact result."""
    from tests.train_utils import KINDS

    reference = tmp_path / "ref"
    assert main(_argv(reference, *KINDS[kind])) == 0
    for step in range(1, STEPS):
        run_dir = tmp_path / f"cut{step}"
        rc, _, _ = run_child(_argv(run_dir, *KINDS[kind]), f"kill-at:{step}", tmp_path / "log")
        assert rc == -signal.SIGKILL
        assert_nothing_half_written(run_dir)
        _resume(run_dir, capsys)
        assert_same_as(reference, run_dir, f"{kind}, killed after step {step}")


@pytest.mark.parametrize("point", ["kill-after-tensors", "kill-before-rename"])
def test_sigkill_inside_a_checkpoint_write(reference, tmp_path, capsys, point):
    """Killed while writing step 4's checkpoint: step 2 stays the latest, the debris is never
    read and is cleared by the next save, and the resumed run is bit-identical."""
    run_dir = tmp_path / "cut"
    rc, _, _ = run_child(_argv(run_dir), f"{point}:4", tmp_path / "log")
    assert rc == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)] == ["step-00000002"]
    debris = [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-step-00000004")]
    assert len(debris) == 1 and (debris[0] / "model.safetensors").is_file()
    assert_nothing_half_written(run_dir)
    _resume(run_dir, capsys)
    assert_same_as(reference, run_dir, point)


def test_sigterm_then_a_corrupt_newest_checkpoint(reference, tmp_path, capsys):
    """SIGTERM after step 5: the step is checkpointed, exit 130 with one line. The newest
    checkpoint is then damaged: resuming says so, falls back to the one before, and still
    ends bit-identical."""
    run_dir = tmp_path / "cut"
    rc, out, err = run_child(_argv(run_dir), "term-at:5", tmp_path / "log")
    assert rc == 130 and err == ""
    assert out.strip().splitlines()[-1] == (
        f"stopped by SIGTERM at step 5; checkpoint saved. Continue with: moesaic train "
        f"--resume {run_dir}"
    )
    names = [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")]
    assert names == ["step-00000004", "step-00000005"]  # train.keep_checkpoints=2
    assert not (run_dir / "summary.json").exists()
    assert_nothing_half_written(run_dir)
    model = run_dir / "checkpoints" / "step-00000005" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    out = _resume(run_dir, capsys)
    assert "warning: skipping checkpoint:" in out and "sha256 mismatch" in out
    assert_same_as(reference, run_dir, "SIGTERM at 5, step 5 corrupted")


def test_sigterm_during_the_final_evaluation(reference, tmp_path, capsys):
    """The last checkpoint is written before the final evaluation: a signal there exits 130
    with one line, and --resume only finishes the evaluation."""
    run_dir = tmp_path / "cut"
    rc, out, err = run_child(_argv(run_dir), "term-in-final-eval", tmp_path / "log")
    assert rc == 130 and err == ""
    assert out.strip().splitlines()[-1] == (
        f"stopped by SIGTERM before the final evaluation of step {STEPS} (its checkpoint is "
        f"saved); finish it with: moesaic train --resume {run_dir}"
    )
    assert not (run_dir / "summary.json").exists()
    final = run_dir / "checkpoints" / ckpt.checkpoint_dir_name(STEPS)
    written = (final / "manifest.json").stat().st_mtime_ns
    _resume(run_dir, capsys)
    assert (final / "manifest.json").stat().st_mtime_ns == written  # not saved again
    assert_same_as(reference, run_dir, "SIGTERM in the final evaluation")


@pytest.mark.parametrize("hook, name", [("term-at-start", "SIGTERM"), ("int-at-start", "SIGINT")])
def test_a_signal_during_start_up(reference, tmp_path, capsys, hook, name):
    """Nothing to save yet: exit 130 with one line (no traceback); --resume then starts the run
    from step 0 and it ends as the reference."""
    run_dir = tmp_path / "cut"
    rc, out, err = run_child(_argv(run_dir), hook, tmp_path / "log")
    assert rc == 130 and out == ""
    assert err.strip() == (
        f"stopped by {name} during start-up, before any training; nothing to save; continue "
        f"with: moesaic train --resume {run_dir}"
    )
    out = _resume(run_dir, capsys)
    assert f"no checkpoint in '{run_dir}' yet: starting it from step 0" in out
    assert_same_as(reference, run_dir, hook)


# ------------------------------------------------------------------------------- divergence


def test_nan_steps_are_skipped_and_resume_bit_identically(tmp_path):
    """NaN losses at steps 3 and 4 are skipped (the optimizer does not step); a run stopped at
    step 5 and resumed matches the uninterrupted one, and every checkpoint is finite and
    passes the optimizer-step check."""
    poisoned = {3, 4}

    def train(name: str, stop_at: int | None = None, resume: bool = False) -> Trainer:
        cfg_args = [*CONFIG, *MOE, f"out={tmp_path}", f"name={name}"]
        from moesaic.config import load_config
        from moesaic.runconfig import load_run_config

        if resume:
            cfg = load_run_config(tmp_path / name)
            trainer = Trainer(cfg, tmp_path / name, resume=True)
        else:
            trainer = Trainer(load_config("tiny", cfg_args))
        real = trainer.model.forward

        def forward(batch, **kw):
            out = real(batch, **kw)
            if trainer.step + 1 in poisoned:
                out.loss = out.loss * float("nan")
            if stop_at is not None and trainer.step + 1 == stop_at:
                trainer.stop_signal = signal.SIGTERM
            return out

        trainer.forward = forward
        trainer.summary = trainer.run()
        return trainer

    full = train("full")
    assert full.summary["skipped_steps"] == 2
    assert train("cut", stop_at=5).summary["status"] == "interrupted"
    resumed = train("cut", resume=True)
    assert resumed.summary["skipped_steps"] == 2
    for run in ("full", "cut"):
        assert_nothing_half_written(tmp_path / run)
        newest = ckpt.latest_checkpoint(tmp_path / run / "checkpoints")[0]
        assert newest.step == STEPS and newest.state["trainer"]["skipped_steps"] == 2
    assert_same_as(tmp_path / "full", tmp_path / "cut", "NaN at steps 3-4, stopped at 5")


def test_divergence_without_a_checkpoint_says_what_to_do_and_resume_starts_over(tmp_path, capsys):
    """lr=1e38: the first update makes the weights non-finite, no checkpoint is ever written.
    One line says what to do; --resume still works (it starts over from step 0, saying so)."""
    run_dir = tmp_path / "diverged"
    argv = _argv(run_dir, "train.lr=1e38", "train.warmup=0", "train.max_bad_steps=100")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: refusing to checkpoint non-finite weights")
    assert "no checkpoint was written" in err and "lower train.lr (now 1e+38)" in err
    assert ckpt.list_checkpoints(run_dir / "checkpoints") == []
    assert main(["train", "--resume", str(run_dir)]) == 2
    captured = capsys.readouterr()
    assert f"no checkpoint in '{run_dir}' yet: starting it from step 0" in captured.out
    assert "refusing to checkpoint non-finite weights" in captured.err


# ------------------------------------------------------------------------------- full disks


def test_a_full_disk_stops_with_one_line_and_resume_continues(reference, tmp_path, monkeypatch,
                                                               capsys):  # fmt: skip
    """The disk fills up before the step-6 checkpoint: one line (what to do, how to continue),
    exit 2, no temporary directory; with room again, --resume ends bit-identical."""
    run_dir = tmp_path / "full"
    real = os.statvfs

    def statvfs(path):
        st = real(path)
        if ckpt.list_checkpoints(run_dir / "checkpoints")[-1:] != [
            run_dir / "checkpoints" / "step-00000004"
        ]:
            return st
        return os.statvfs_result((st.f_bsize, 1, st.f_blocks, 0, 0, *tuple(st)[5:]))

    monkeypatch.setattr(os, "statvfs", statvfs)
    assert main(_argv(run_dir)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not enough disk space for checkpoint step 6" in err
    assert f"then continue with: moesaic train --resume {run_dir}" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000004",
    ]
    monkeypatch.setattr(os, "statvfs", real)
    _resume(run_dir, capsys)
    assert_same_as(reference, run_dir, "disk full at step 6")


# ------------------------------------------------------------------------------- a dead rank


def _rank_child(argv: list[str], log_dir: str, victim: int, step: int) -> None:
    """One rank of a 2-process `moesaic train`: rank `victim` SIGKILLs itself after `step`."""
    rank = int(os.environ["RANK"])
    target = os.open(f"{log_dir}/rank{rank}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(target, 2)
    os.close(target)
    if rank == victim:
        _before_step(step, _kill_self())
    rc = main(argv)
    sys.stderr.flush()
    os._exit(rc)


@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_killed_rank_leaves_one_line_on_the_survivor(tmp_path, victim):
    """SIGKILL one of 2 ranks mid-run: the survivor exits 1 with exactly one line naming the
    cause (no traceback), and the last checkpoint is intact."""
    run_dir = tmp_path / "two"
    argv = _argv(run_dir, "train.steps=40", "dist.watchdog_s=30")
    procs, _, store = dist_utils.start_workers(
        _rank_child, 2, (argv, str(tmp_path), victim, 3), init=False
    )
    try:
        for p in procs:
            p.join(timeout=300)
        codes = [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        del store
    survivor = 1 - victim
    assert codes[victim] == -signal.SIGKILL and codes[survivor] == 1, codes
    err = (tmp_path / f"rank{survivor}.err").read_text()
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: rank {survivor}: lost rank {victim} during a collective (")
    assert err.rstrip().endswith("process died?)")
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step-00000002"]
    assert_nothing_half_written(run_dir)


class _Store:
    """The few rendezvous-store calls the watchdog makes, in a dict."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def set(self, key, value):
        self.data[key] = value.encode()

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)


def _watchdog(rank: int, store: _Store):
    from moesaic.train.distributed import World
    from moesaic.train.watchdog import Watchdog

    return Watchdog(World(rank, 2), 60.0, store=store)


def test_report_failures_names_the_cause_in_one_line():
    """A collective failing because the peer vanished, or any error after a peer reported its
    own failure, becomes one PeerFailure line; this rank's own errors are re-raised as they are
    and reported first-come to the peers."""
    from moesaic.errors import CheckpointError
    from moesaic.train.watchdog import PeerFailure, report_failures

    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:9: "
        "Connection reset by peer. This is typically caused by a remote worker hanging."
    )
    store = _Store()
    with pytest.raises(PeerFailure) as lost, report_failures(_watchdog(0, store)):
        raise gloo
    assert str(lost.value) == (
        "rank 0: lost rank 1 during a collective (Read error [127.0.0.1]:9: Connection reset "
        "by peer; process died?)"
    )
    assert lost.value.exit_code == 1 and store.get("failed").decode().startswith("rank 0: lost")

    store = _Store()
    with pytest.raises(ValueError, match="a bug"), report_failures(_watchdog(1, store)):
        raise ValueError("a bug on rank one")
    assert store.get("failed").decode() == "rank 1: ValueError: a bug on rank one"
    with pytest.raises(PeerFailure) as after, report_failures(_watchdog(0, store)):
        raise gloo  # rank 0 then loses rank 1: the report names rank 1's error
    assert str(after.value) == (
        "rank 0: stopping after a failure on rank 1: ValueError: a bug on rank one"
    )
    assert store.get("failed").decode().startswith("rank 1:")  # the first report stands

    with pytest.raises(CheckpointError), report_failures(_watchdog(0, _Store())):
        raise CheckpointError("no room")  # this rank's own user error stays as it is


@pytest.mark.slow
def test_a_killed_rank_under_torchrun(tmp_path):
    """The real launcher: SIGKILL one of 2 workers. The survivor's one line is all moesaic
    prints; what follows is torchrun's own report (documented in checkpoint-guarantees.md)."""
    import subprocess
    import time

    run_dir = tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [sys.executable, *launch, "-m", "moesaic", *_argv(run_dir, "train.steps=400")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not ckpt.list_checkpoints(run_dir / "checkpoints"):
            assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint appeared"
            time.sleep(0.1)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        os.kill(int(workers.stdout.split()[-1]), signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    ours = [line for line in output.splitlines() if line.startswith("error: rank")]
    # the survivor notices through the failed collective or, on a slow machine, the watchdog
    assert len(ours) == 1 and ("during a collective" in ours[0] or "rank 1" in ours[0]), output
    assert "[rank0]:" not in output and "[rank1]:" not in output  # no worker traceback
    assert proc.returncode != 0 and "ChildFailedError" in output
    assert_nothing_half_written(run_dir)
