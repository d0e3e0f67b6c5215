import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import SafetensorError
from torch import nn

from moesaic.config import TrainConfig
from moesaic.errors import CheckpointError
from moesaic.files import atomic_write_text, sha256_file
from moesaic.train import checkpoint as ckpt
from moesaic.train.optim import (
    build_optimizer,
    load_optimizer_state,
    lr_at,
    optimizer_state_to_tensors,
)


def _state(step, fingerprint="abc", skipped=0, rows_per_step=2):
    """A state.json body consistent with `step` (as the trainer writes it)."""
    return {
        "config_fingerprint": fingerprint,
        "data": {"pos": step, "rows": step * rows_per_step},
        "trainer": {"skipped_steps": skipped, "rows_per_step": rows_per_step, "tokens_seen": 0},
    }


def _save(root, step, value=1.0, keep=3, fingerprint="abc", skipped=0, optimizer_step=None):
    model = {"w": torch.full((4, 4), value), "b": torch.arange(3.0)}
    updates = step - skipped if optimizer_step is None else optimizer_step
    optimizer = {"w/exp_avg": torch.zeros(4, 4), "w/step": torch.tensor(float(updates))}
    return ckpt.save_checkpoint(
        root,
        step,
        model,
        optimizer,
        {"cpu": torch.get_rng_state()},
        _state(step, fingerprint, skipped),
        keep=keep,
    )


def test_roundtrip_and_latest(tmp_path):
    _save(tmp_path, 5, 1.0)
    _save(tmp_path, 10, 2.0)
    found, rejected = ckpt.latest_checkpoint(tmp_path, "abc")
    assert rejected == [] and found.step == 10
    assert torch.equal(ckpt.load_tensors(found, "model.safetensors")["w"], torch.full((4, 4), 2.0))
    assert found.state["data"] == {"pos": 10, "rows": 20}
    manifest = json.loads((found.path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"state.json", *ckpt.TENSOR_FILES}


def test_keeps_last_k(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]


def test_tied_tensors_are_saved(tmp_path):
    shared = torch.randn(3, 2)
    path = ckpt.save_checkpoint(
        tmp_path, 1, {"a": shared, "b": shared}, {"a/step": torch.tensor(1.0)},
        {"cpu": torch.get_rng_state()}, _state(1), keep=1,
    )  # fmt: skip
    loaded = ckpt.load_tensors(ckpt.verify_checkpoint(path), "model.safetensors")
    assert torch.equal(loaded["a"], shared) and torch.equal(loaded["b"], shared)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_state", "garbage_state"])
def test_damaged_checkpoint_is_refused_and_previous_used(tmp_path, damage):
    _save(tmp_path, 1, 1.0)
    newest = _save(tmp_path, 2, 2.0)
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete_state":
        (newest / "state.json").unlink()
    else:
        (newest / "state.json").write_text('{"format": "moesaic-che')
    with pytest.raises(CheckpointError) as err:
        ckpt.verify_checkpoint(newest)
    assert str(newest) in str(err.value)
    found, rejected = ckpt.latest_checkpoint(tmp_path, "abc")
    assert found.step == 1 and len(rejected) == 1


def test_not_ours_and_other_config(tmp_path):
    foreign = tmp_path / "step-00000001"
    foreign.mkdir()
    (foreign / "state.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a moesaic checkpoint"):
        ckpt.verify_checkpoint(foreign)
    other = _save(tmp_path / "other", 3, fingerprint="zzz")
    with pytest.raises(CheckpointError, match="different config"):
        ckpt.verify_checkpoint(other, fingerprint="abc")


def _rewrite(path, name, edit):
    """Edit one file of a checkpoint and re-hash it in the manifest (a "valid" forgery)."""
    edit(path / name)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["step"] = json.loads((path / "state.json").read_text())["step"]
    for listed in [name] if name != "manifest.json" else []:
        manifest["files"][listed] = {
            "bytes": (path / listed).stat().st_size,
            "sha256": sha256_file(path / listed),
        }
    manifest["sha256"] = ckpt._manifest_hash(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _edit_json(**changes):
    def edit(file):
        body = json.loads(file.read_text())
        for key, value in changes.items():
            target = body
            *parents, last = key.split(".")
            for p in parents:
                target = target[p]
            target[last] = value
        file.write_text(json.dumps(body, indent=1, sort_keys=True))

    return edit


def test_edited_state_is_refused_and_previous_used(tmp_path):
    """state.json is covered by the manifest: an edited step is caught, the older one used."""
    _save(tmp_path, 3)
    newest = _save(tmp_path, 4)
    _edit_json(step=1000)(newest / "state.json")
    with pytest.raises(CheckpointError, match=r"state.json' has \d+ bytes, expected \d+"):
        ckpt.verify_checkpoint(newest)
    found, rejected = ckpt.latest_checkpoint(tmp_path, "abc")
    assert found.step == 3 and len(rejected) == 1


@pytest.mark.parametrize(
    "forgery, message",
    [
        ({"step": 1000}, "named for step 4"),
        ({"trainer.skipped_steps": 1}, "its optimizer took 4 steps"),
        ({"data.rows": 9}, "drew \\[9\\] rows \\(expected 8\\)"),
        ({"trainer.skipped_steps": 7}, "counts 7 skipped steps of 4"),
    ],
)
def test_inconsistent_state_is_refused_even_when_rehashed(tmp_path, forgery, message):
    """The step must agree with the directory name, the optimizer's counters and the data
    position, whatever the checksums say."""
    path = _save(tmp_path, 4)
    ckpt.verify_checkpoint(path)
    _rewrite(path, "state.json", _edit_json(**forgery))
    with pytest.raises(CheckpointError, match=message):
        ckpt.verify_checkpoint(path)


def test_skipped_steps_do_not_step_the_optimizer(tmp_path):
    """4 steps with 1 skipped: AdamW took 3 steps, which is consistent."""
    assert ckpt.verify_checkpoint(_save(tmp_path, 4, skipped=1)).step == 4
    with pytest.raises(CheckpointError, match="its optimizer took 4 steps"):
        ckpt.verify_checkpoint(_save(tmp_path / "b", 4, skipped=1, optimizer_step=4))


def test_renamed_directory_is_refused(tmp_path):
    path = _save(tmp_path, 4)
    os.rename(path, tmp_path / "step-00000009")
    found, rejected = ckpt.latest_checkpoint(tmp_path, "abc")
    assert found is None and "named for step 9" in rejected[0]


def test_manifest_damage_and_unlisted_files_are_refused(tmp_path):
    path = _save(tmp_path, 2)
    (path / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="does not list: extra.safetensors"):
        ckpt.verify_checkpoint(path)
    (path / "extra.safetensors").unlink()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model.safetensors"]["bytes"] += 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="manifest.json' is corrupt"):
        ckpt.verify_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="missing manifest.json"):
        ckpt.verify_checkpoint(path)


def test_a_larger_file_is_not_called_truncated(tmp_path):
    path = _save(tmp_path, 2)
    model = path / "model.safetensors"
    size = model.stat().st_size
    model.write_bytes(model.read_bytes() + b"\0" * 5)
    with pytest.raises(CheckpointError) as err:
        ckpt.verify_checkpoint(path)
    assert f"has {size + 5} bytes, expected {size}" in str(err.value)


def test_previous_format_still_loads_after_the_consistency_checks(tmp_path):
    """moesaic-checkpoint/1: no manifest, file hashes in state.json."""
    path = _save(tmp_path, 4)
    state = json.loads((path / "state.json").read_text())
    files = json.loads((path / "manifest.json").read_text())["files"]
    del files["state.json"]
    (path / "manifest.json").unlink()
    (path / "state.json").write_text(
        json.dumps({**state, "format": ckpt.OLD_FORMAT, "files": files})
    )
    assert ckpt.verify_checkpoint(path, "abc").step == 4
    _edit_json(step=1000)(path / "state.json")
    with pytest.raises(CheckpointError, match="named for step 4"):
        ckpt.verify_checkpoint(path)


def test_junk_step_directories_never_take_a_retention_slot(tmp_path):
    empty = tmp_path / "step-99999998"  # ours and incomplete: removed
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"half")
    foreign = tmp_path / "step-99999999"  # someone else's files: reported, kept, not counted
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    warnings = []
    for step in (1, 2, 3):
        ckpt.save_checkpoint(
            tmp_path, step, {"w": torch.ones(2)}, {"w/step": torch.tensor(float(step))},
            {"cpu": torch.get_rng_state()}, _state(step), keep=2, warn=warnings.append,
        )  # fmt: skip
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-00000002", "step-00000003", "step-99999999"]
    assert not empty.exists() and (foreign / "notes.txt").read_text() == "mine"
    assert any("removed incomplete" in w and str(empty) in w for w in warnings)
    assert any("not a valid checkpoint" in w and str(foreign) in w for w in warnings)
    found, rejected = ckpt.latest_checkpoint(tmp_path, "abc")
    assert found.step == 3 and "no state.json" in rejected[0]


def _statvfs_with(free_bytes):
    real = os.statvfs

    def fake(path):
        st = real(path)
        return os.statvfs_result(
            (st.f_bsize, 1, st.f_blocks, free_bytes, free_bytes, *tuple(st)[5:])
        )

    return fake


def test_no_room_is_refused_before_writing(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    monkeypatch.setattr(os, "statvfs", _statvfs_with(1 << 20))
    with pytest.raises(CheckpointError) as err:
        _save(tmp_path, 2)
    message = str(err.value)
    assert "\n" not in message and "not enough disk space for checkpoint step 2" in message
    assert "MiB free" in message and "free some space" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


@pytest.mark.parametrize(
    "code, fix",
    [(errno.ENOSPC, "free some disk space"), (errno.EROFS, "writable"), (errno.EACCES, "writable")],
)
def test_failed_write_cleans_up_and_says_what_to_do(tmp_path, monkeypatch, code, fix):
    """Disk full, read-only or permission denied mid-write (simulated: chmod does not stop
    root): a one-line CheckpointError, no temporary directory left, the older one intact."""
    _save(tmp_path, 1)
    real = ckpt.save_file
    calls = []

    def failing(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # safetensors reports the error as text
            raise SafetensorError(
                f"Error while serializing: I/O error: {os.strerror(code)} (os error {code}) at "
                f'path "{path}.tmp"'
            )
        real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(CheckpointError) as err:
        _save(tmp_path, 2)
    message = str(err.value)
    assert "\n" not in message and os.strerror(code) in message and fix in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    assert ckpt.latest_checkpoint(tmp_path, "abc")[0].step == 1


def test_kill_during_write_leaves_previous_latest(tmp_path):
    """SIGKILL in the middle of writing a checkpoint: the older one stays the usable latest."""
    _save(tmp_path, 1, 1.0)
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        import safetensors.torch as st
        from moesaic.train import checkpoint as ckpt
        real = st.save_file
        calls = []
        def dying_save(tensors, path):
            calls.append(path)
            if len(calls) == 2:  # the second file of the checkpoint: write half, then die
                real(tensors, path)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            real(tensors, path)
        ckpt.save_file = dying_save
        ckpt.save_checkpoint({str(tmp_path)!r}, 2, {{"w": torch.ones(64, 64)}},
                             {{"w/exp_avg": torch.ones(64, 64)}}, {{"cpu": torch.get_rng_state()}},
                             {_state(2)!r}, keep=3)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".tmp-step-00000002") for p in tmp_path.iterdir())
    found, rejected = ckpt.latest_checkpoint(tmp_path, "abc")
    assert found.step == 1 and rejected == []
    _save(tmp_path, 3)  # the next save clears the debris
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_optimizer_state_roundtrip_continues_identically():
    torch.manual_seed(0)
    cfg = TrainConfig(lr=1e-2)

    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        return m, build_optimizer(m, cfg)

    x = torch.randn(16, 4)

    def step(m, opt):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()

    m1, o1 = make()
    for _ in range(3):
        step(m1, o1)
    tensors, meta = optimizer_state_to_tensors(o1, m1)
    json.dumps(meta)  # JSON-safe
    m2, o2 = make()
    m2.load_state_dict(m1.state_dict())
    load_optimizer_state(o2, m2, tensors, meta)
    for _ in range(2):
        step(m1, o1)
        step(m2, o2)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_no_decay_on_norms_biases_embeddings():
    m = nn.ModuleDict(
        {"tok_embed": nn.Embedding(5, 4), "proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4)}
    )
    opt = build_optimizer(m, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(m["proj"].weight)}


def test_lr_schedule_shape():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    mids = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(mids, mids[1:], strict=False))


def test_atomic_write_text(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and os.listdir(tmp_path) == ["x.json"]
