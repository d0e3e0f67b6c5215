import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from moesaic.config import TrainConfig
from moesaic.errors import CheckpointError
from moesaic.files import atomic_write_text
from moesaic.train import checkpoint as ckpt
from moesaic.train.optim import (
    build_optimizer,
    load_optimizer_state,
    lr_at,
    optimizer_state_to_tensors,
)


def _save(root, step, value=1.0, keep=3, fingerprint="abc"):
    model = {"w": torch.full((4, 4), value), "b": torch.arange(3.0)}
    return ckpt.save_checkpoint(
        root,
        step,
        model,
        {"w/exp_avg": torch.zeros(4, 4)},
        {"cpu": torch.get_rng_state()},
        {"config_fingerprint": fingerprint, "data": {"pos": step}},
        keep=keep,
    )


def test_roundtrip_and_latest(tmp_path):
    _save(tmp_path, 5, 1.0)
    _save(tmp_path, 10, 2.0)
    found, rejected = ckpt.latest_checkpoint(tmp_path, "abc")
    assert rejected == [] and found.step == 10
    assert torch.equal(ckpt.load_tensors(found, "model.safetensors")["w"], torch.full((4, 4), 2.0))
    assert found.state["data"] == {"pos": 10}


def test_keeps_last_k(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]


def test_tied_tensors_are_saved(tmp_path):
    shared = torch.randn(3, 2)
    path = ckpt.save_checkpoint(
        tmp_path, 1, {"a": shared, "b": shared}, {}, {"cpu": torch.get_rng_state()}, {}, keep=1
    )
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
                             {{"config_fingerprint": "abc"}}, keep=3)
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
