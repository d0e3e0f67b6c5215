"""Atomic, verifiable checkpoints: safetensors for tensors, JSON for everything else.

Layout of one checkpoint (a directory under `RUN/checkpoints/`):

    step-00000100/
        model.safetensors      model parameters and persistent buffers
        optimizer.safetensors  optimizer state tensors, keyed `<param name>/<state key>`
        rng.safetensors        RNG states (CPU, and CUDA when used) as uint8 tensors
        state.json             format tag, step, config fingerprint, optimizer hyper-parameters,
                               data-stream position, trainer counters
        manifest.json          format tag, step, size + sha256 of every other file (state.json
                               included), and the sha256 of the manifest's own content

A checkpoint is written into a hidden temporary directory (after checking that the disk has
room for it); each file is fsynced, the manifest written last, then the directory is renamed
into place and the parent fsynced. A crash at any point leaves either the complete new
checkpoint or none, so the newest complete directory is always a good "latest"; a failed write
removes its temporary directory and raises a one-line CheckpointError.

Loading verifies everything before anything is used: the manifest's own hash, the size and
sha256 of every file it lists (and that no unlisted file is present), the format tag, the config
fingerprint, and that the step agrees with the directory name, with the optimizer's own step
counters (AdamW steps once per step that was not skipped) and with the data position (every
rank's stream drew `step · batch_size · grad_accum` rows per part). Nothing is unpickled.
Checkpoints of the previous format (`moesaic-checkpoint/1`, no manifest: state.json carried
the file hashes but was not covered by one) still load after the same consistency checks.

The layout of multi-process runs (`dist_checkpoint.py`) shares the manifest, the
verification and the write/publish steps defined here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from moesaic.errors import CheckpointError
from moesaic.files import fsync_dir, fsync_file, os_error_fix, sha256_file

FORMAT = "moesaic-checkpoint/2"
OLD_FORMAT = "moesaic-checkpoint/1"  # state.json lists the file hashes; no manifest
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
STATE = "state.json"
MANIFEST = "manifest.json"
SHARDED = "sharded"  # state["layout"] of a multi-process checkpoint
DCP_DIR = "dcp"
STEP_DIR = re.compile(r"step-(\d+)")
# Room kept free on top of a checkpoint's estimated size (metadata, filesystem overhead).
SPACE_MARGIN = 16 << 20

Warn = Callable[[str], None]


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]  # the parsed state.json


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


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


# ---------------------------------------------------------------------------------- writing


def tensors_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """About the size of a safetensors file holding `tensors` (data plus a JSON header entry)."""
    return sum(t.numel() * t.element_size() + 96 + len(name) for name, t in tensors.items())


def check_free_space(root: Path, needed: int, step: int) -> None:
    """Refuse to start a checkpoint write that cannot fit on the disk of `root`."""
    try:
        st = os.statvfs(root)
    except (OSError, AttributeError):  # no statvfs here: the write itself will tell
        return
    free = st.f_bavail * st.f_frsize
    if free < needed + SPACE_MARGIN:
        mib = 1 << 20
        raise CheckpointError(
            f"not enough disk space for checkpoint step {step} in '{root}' (needs about "
            f"{(needed + SPACE_MARGIN) / mib:.0f} MiB, {free / mib:.0f} MiB free); free some "
            "space; the previous checkpoints are intact"
        )


def write_failure(root: Path, step: int, e: BaseException) -> CheckpointError:
    """A one-line CheckpointError for a failed write, with the fix for the usual causes.

    safetensors reports I/O errors as text ("... No space left on device (os error 28) ..."):
    the error number is read back from it."""
    code = re.search(r"\(os error (\d+)\)", str(e))
    if not isinstance(e, OSError) and code:
        e = OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
    return CheckpointError(
        f"cannot write checkpoint step {step} in '{root}' ({reason}); {os_error_fix(e, root)}; "
        "the previous checkpoints are intact"
    )


@contextlib.contextmanager
def writing(root: Path, step: int, create: bool = True) -> Iterator[Path]:
    """A fresh hidden temporary directory for checkpoint `step` under `root`.

    On any failure (or interrupt) the temporary directory is removed; an OSError or
    SafetensorError becomes a one-line CheckpointError saying what to do.
    """
    root = Path(root)
    tmp = root / f".tmp-{checkpoint_dir_name(step)}-{os.getpid()}"
    try:
        if create:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        yield tmp
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(root, step, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _manifest_hash(body: dict[str, Any]) -> str:
    content = {k: v for k, v in body.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _write_json(path: Path, body: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def publish(root: Path, tmp: Path, step: int, state: dict[str, Any]) -> Path:
    """Finish a checkpoint written into `tmp`: state.json, then the manifest over every file,
    fsync, and the atomic rename to `root/step-NNNNNNNN`. Returns the final path."""
    root = Path(root)
    _write_json(tmp / STATE, {**state, "format": FORMAT, "step": step})
    files = {str(p.relative_to(tmp)): _file_entry(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest: dict[str, Any] = {"format": FORMAT, "step": step, "files": files}
    manifest["sha256"] = _manifest_hash(manifest)
    _write_json(tmp / MANIFEST, manifest)
    for sub in sorted({p.parent for p in tmp.rglob("*") if p.is_file()}, reverse=True):
        fsync_dir(sub)
    final = root / checkpoint_dir_name(step)
    old = root / f".old-{final.name}-{os.getpid()}"
    if final.exists():  # a re-save of the same step (its content may be damaged): replace it
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_tensors: dict[str, torch.Tensor],
    rng_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
    warn: Warn | None = None,
    valid: Callable[[Path], bool] | None = None,
) -> Path:
    """Write checkpoint `step` under `root` atomically and keep only the newest `keep` valid
    ones (`prune_checkpoints`); `warn` receives one line per junk `step-*` directory."""
    payloads = {
        "model.safetensors": _unique_tensors(model_state),
        "optimizer.safetensors": _unique_tensors(optimizer_tensors),
        "rng.safetensors": _unique_tensors(rng_tensors),
    }
    with writing(root, step) as tmp:
        check_free_space(Path(root), sum(tensors_bytes(t) for t in payloads.values()), step)
        for name, tensors in payloads.items():
            save_file(tensors, str(tmp / name))
            fsync_file(tmp / name)
        final = publish(root, tmp, step, state)
    prune_checkpoints(root, keep, warn, _trusting(final, valid))
    return final


def _trusting(written: Path, valid: Callable[[Path], bool] | None) -> Callable[[Path], bool]:
    """`valid`, except that the checkpoint just written (and hashed) is valid without a look."""
    check = valid or is_complete
    return lambda path: path == written or check(path)


# ---------------------------------------------------------------------------------- listing


def step_of(path: Path) -> int | None:
    """The step a checkpoint directory's name stands for, or None for another name."""
    match = STEP_DIR.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: Path) -> list[Path]:
    """`step-N` directories, oldest first (complete or not; temporary directories ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(dirs, key=step_of)


def is_complete(path: Path) -> bool:
    """Cheap completeness check (no hashing): a manifest (or an old-format state.json) that
    parses, and every file it lists present with its listed size."""
    try:
        files = _listed_files(Path(path))
        return all((path / n).stat().st_size == m["bytes"] for n, m in files.items())
    except (CheckpointError, OSError, KeyError, TypeError):
        return False


_OUR_NAMES = {*TENSOR_FILES, STATE, MANIFEST, DCP_DIR}


def _is_debris(path: Path) -> bool:
    """A `step-N` directory that a checkpoint writer left incomplete: no state.json, no
    manifest, and nothing in it but names a checkpoint holds (possibly nothing at all)."""
    names = {p.name for p in path.iterdir()}
    if STATE in names or MANIFEST in names or not names <= _OUR_NAMES:
        return False
    dcp = path / DCP_DIR
    return not dcp.exists() or all(p.suffix == ".safetensors" for p in dcp.rglob("*"))


def prune_checkpoints(
    root: Path, keep: int, warn: Warn | None = None, valid: Callable[[Path], bool] | None = None
) -> None:
    """Keep the newest `keep` valid checkpoints (`valid`, default `is_complete`); remove
    temporary directories of dead writers and incomplete `step-N` directories a writer left;
    report other invalid ones, which are never counted."""
    root = Path(root)
    warn = warn or (lambda message: None)
    valid = valid or is_complete
    kept = []
    for path in list_checkpoints(root):
        if valid(path):
            kept.append(path)
        elif _is_debris(path):
            shutil.rmtree(path, ignore_errors=True)
            warn(f"removed incomplete checkpoint directory '{path}' (no state.json)")
        else:
            warn(f"'{path}' is not a valid checkpoint; it is not counted (remove it)")
    for path in kept[: max(0, len(kept) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
    for pattern in (".tmp-step-*", ".old-step-*"):  # left over by a crash mid-write
        for path in root.glob(pattern):
            if not path.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------- verifying


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"'{path}' is truncated or not JSON") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"'{path}' is not a moesaic {what}")
    return value


def _listed_files(path: Path) -> dict[str, dict[str, Any]]:
    """The files a checkpoint lists: its manifest's, or an old-format state.json's."""
    manifest = _manifest(path)
    if manifest is not None:
        return manifest["files"]
    state_path = path / STATE
    if not state_path.is_file():
        raise CheckpointError(f"'{path}' is not a moesaic checkpoint (no state.json)")
    state = _read_json(state_path, "checkpoint state")
    if state.get("format") == FORMAT:
        raise CheckpointError(f"checkpoint '{path}' is missing {MANIFEST}")
    if state.get("format") != OLD_FORMAT or not isinstance(state.get("files"), dict):
        raise CheckpointError(f"'{path}' is not a moesaic checkpoint (format tag missing)")
    return state["files"]


def _manifest(path: Path) -> dict[str, Any] | None:
    """The parsed manifest after checking its own hash, or None when there is none."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = _read_json(manifest_path, "checkpoint manifest")
    if manifest.get("sha256") != _manifest_hash(manifest) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"'{manifest_path}' is corrupt (its own sha256 does not match)")
    files = manifest.get("files")
    if not isinstance(files, dict) or STATE not in files:
        raise CheckpointError(f"'{manifest_path}' does not list state.json")
    return manifest


def _check_files(path: Path, files: dict[str, dict[str, Any]], required: list[str]) -> None:
    for name in required:
        if name not in files:
            raise CheckpointError(f"checkpoint '{path}' does not list {name}")
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint '{path}' is missing {name}")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(
                f"checkpoint file '{file}' has {size} bytes, expected {meta['bytes']} "
                "(truncated or overwritten)"
            )
        if sha256_file(file) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file '{file}' is corrupt (sha256 mismatch)")


def _required(path: Path, state: dict[str, Any], files: dict[str, Any]) -> list[str]:
    if state.get("layout") == SHARDED:
        if not any(n.startswith(DCP_DIR + "/") for n in files):
            raise CheckpointError(f"sharded checkpoint '{path}' lists no shard files")
        return ["model.safetensors", "rng.safetensors"]
    return list(TENSOR_FILES)


def _optimizer_steps(path: Path, state: dict[str, Any]) -> list[int]:
    """AdamW's per-parameter step counters stored in the checkpoint (scalars, read lazily)."""
    if state.get("layout") == SHARDED:
        files = sorted((path / DCP_DIR).rglob("*.safetensors"))
        prefix, suffix = "optimizer.state.", ".step"
    else:
        files, prefix, suffix = [path / "optimizer.safetensors"], "", "/step"
    steps = []
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key.startswith(prefix) and key.endswith(suffix):
                    steps.append(int(f.get_tensor(key).item()))
    return steps


def _stream_rows(data: Any) -> list[int]:
    """Rows drawn by every rank's stream (and every stacked part) of a data state."""
    rows = []
    for s in data if isinstance(data, list) else [data]:
        for part in s.get("parts", [s]):
            rows.append(int(part["rows"]))
    return rows


def check_consistency(path: Path, state: dict[str, Any]) -> int:
    """The step, after checking that the directory name, the optimizer's step counters and the
    data position agree with it; raise CheckpointError when they do not."""
    try:
        step = int(state["step"])
        trainer = state["trainer"]
        skipped = int(trainer["skipped_steps"])
        rows_per_step = trainer.get("rows_per_step")
        data = state["data"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}' has a malformed state.json ({e!r})") from None
    named = step_of(path)
    if named != step:
        raise CheckpointError(
            f"checkpoint '{path}' holds step {step} but its directory is named for step {named}; "
            "it cannot be trusted"
        )
    if not 0 <= skipped <= step:
        raise CheckpointError(
            f"checkpoint '{path}' counts {skipped} skipped steps of {step}; it cannot be trusted"
        )
    updates = _optimizer_steps(path, state)
    expected = step - skipped  # a skipped (non-finite) step does not step the optimizer
    if max(updates, default=0) != expected or any(u < 0 for u in updates):
        raise CheckpointError(
            f"checkpoint '{path}' is at step {step} with {skipped} skipped, but its optimizer "
            f"took {max(updates, default=0)} steps; it cannot be trusted"
        )
    if rows_per_step is not None:
        try:
            rows = _stream_rows(data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(
                f"checkpoint '{path}' has a malformed data state ({e!r})"
            ) from None
        if any(r != step * int(rows_per_step) for r in rows):
            raise CheckpointError(
                f"checkpoint '{path}' is at step {step} but its data stream drew {rows} rows "
                f"(expected {step * int(rows_per_step)}); it cannot be trusted"
            )
    return step


def verify_checkpoint(path: Path, fingerprint: str | None = None) -> Checkpoint:
    """Parse and verify one checkpoint directory (either layout); raise CheckpointError naming
    what is wrong."""
    path = Path(path)
    manifest = _manifest(path)
    files = _listed_files(path)
    if manifest is not None:  # every file is listed, and the listed state.json verifies first
        _check_files(path, {STATE: files[STATE]}, [STATE])
        present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
        unlisted = sorted(present - set(files) - {MANIFEST})
        if unlisted:
            raise CheckpointError(
                f"checkpoint '{path}' holds a file it does not list: {unlisted[0]}"
            )
    state = _read_json(path / STATE, "checkpoint state")
    if state.get("format") != (FORMAT if manifest is not None else OLD_FORMAT):
        raise CheckpointError(f"'{path}' is not a moesaic checkpoint (format tag)")
    if manifest is not None and state.get("step") != manifest.get("step"):
        raise CheckpointError(
            f"checkpoint '{path}' holds step {state.get('step')} but its manifest step "
            f"{manifest.get('step')}; it cannot be trusted"
        )
    _check_files(path, files, _required(path, state, files))
    if fingerprint is not None and state.get("config_fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint '{path}' was written by a different config; resume with the run's own "
            "config (see config.yaml in the run directory) or start a new run"
        )
    step = check_consistency(path, state)
    return Checkpoint(path=path, step=step, state=state)


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
