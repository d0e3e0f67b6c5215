"""Atomic, verifiable checkpoints: safetensors for tensors, JSON for everything else.

Layout of one checkpoint (a directory under `RUN/checkpoints/`):

    step-00000100/
        model.safetensors      model parameters and persistent buffers
        optimizer.safetensors  optimizer state tensors, keyed `<param name>/<state key>`
        rng.safetensors        RNG states (CPU, and CUDA when used) as uint8 tensors
        state.json             format tag, step, config fingerprint, optimizer hyper-parameters,
                               data-stream position, trainer counters, size + sha256 per file

A checkpoint is written into a hidden temporary directory; each file is fsynced, then the
directory is renamed into place and the parent fsynced. A crash at any point leaves either the
complete new checkpoint or none, so the newest complete directory is always a good "latest".
Loading verifies the format tag, sizes and hashes, and the config fingerprint; nothing is
unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moesaic.errors import CheckpointError
from moesaic.files import fsync_dir, fsync_file, sha256_file

FORMAT = "moesaic-checkpoint/1"
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]  # the parsed state.json


def _unique_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied weights); store each name separately."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[name] = t.clone().contiguous() if key in seen else t.contiguous()
        seen.add(key)
    return out


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_tensors: dict[str, torch.Tensor],
    rng_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` under `root` atomically and keep only the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    payloads = {
        "model.safetensors": model_state,
        "optimizer.safetensors": optimizer_tensors,
        "rng.safetensors": rng_tensors,
    }
    files = {}
    for name, tensors in payloads.items():
        path = tmp / name
        save_file(_unique_tensors(tensors), str(path))
        fsync_file(path)
        files[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    body = {"format": FORMAT, "step": step, "files": files, **state}
    with open(tmp / "state.json", "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. after resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    prune_checkpoints(root, keep)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")]
    return sorted(dirs, key=lambda p: p.name)


def prune_checkpoints(root: Path, keep: int) -> None:
    for path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for path in Path(root).glob(".tmp-step-*"):  # left over by a crash mid-write
        if not path.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(path: Path, fingerprint: str | None = None) -> Checkpoint:
    """Parse and verify one checkpoint directory; raise CheckpointError naming what is wrong."""
    path = Path(path)
    state_path = path / "state.json"
    if not state_path.is_file():
        raise CheckpointError(f"'{path}' is not a moesaic checkpoint (no state.json)")
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"'{state_path}' is truncated or not JSON") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a moesaic checkpoint (format tag missing)")
    for name in TENSOR_FILES:
        meta = state.get("files", {}).get(name)
        file = path / name
        if meta is None or not file.is_file():
            raise CheckpointError(f"checkpoint '{path}' is missing {name}")
        if file.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"checkpoint file '{file}' is truncated ({file.stat().st_size} of "
                f"{meta['bytes']} bytes)"
            )
        if sha256_file(file) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file '{file}' is corrupt (sha256 mismatch)")
    if fingerprint is not None and state.get("config_fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint '{path}' was written by a different config; resume with the run's own "
            "config (see config.yaml in the run directory) or start a new run"
        )
    return Checkpoint(path=path, step=int(state["step"]), state=state)


def latest_checkpoint(
    root: Path,
    fingerprint: str | None = None,
    verify: Callable[[Path, str | None], Checkpoint] | None = None,
) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint that verifies, plus one message per newer one that did not.

    `verify` (default `verify_checkpoint`) checks one checkpoint directory; a config mismatch
    is raised at once rather than skipped."""
    verify = verify or verify_checkpoint
    rejected = []
    for path in reversed(list_checkpoints(root)):
        try:
            return verify(path, fingerprint), rejected
        except CheckpointError as e:
            if "different config" in str(e):
                raise
            rejected.append(str(e))
    return None, rejected


def load_tensors(ckpt: Checkpoint, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt.path / name))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read '{ckpt.path / name}': {e}") from None
