"""Sharded checkpoints of multi-process runs; they resume with any number of processes.

A run with one process writes the single-process layout of `checkpoint.py`. A run with N > 1
processes writes, under the same `step-XXXXXXXX` name and with the same atomic rename:

    step-00000100/
        dcp/shard-0000R-model-00001-of-00001.safetensors
                           each rank's shards of the model and optimizer state, written by
                           torch.distributed.checkpoint (DCP) with its safetensors storage: the
                           global offset of every shard is JSON in the file header
        model.safetensors  the full model weights, gathered on rank 0: the file to share, and
                           what evaluation and sampling read, as for a single-process run
        rng.safetensors    every rank's RNG state (`cpu/<rank>`, `cuda/<rank>`)
        state.json         format tag, `"layout": "sharded"`, world size, step, config
                           fingerprint, every rank's data-stream position, trainer counters
        manifest.json      size + sha256 of every other file, as for a single process

Loading reads the shards through DCP, which reshards them onto whatever layout the loading
model has: N ranks, M ranks, any expert-parallel size, or one process with plain tensors.
Nothing is unpickled: DCP's default file storage keeps its index as a pickle (`.metadata`),
which is why this module uses DCP's safetensors storage instead, whose index is the JSON in
the shard headers. Checkpoints in that other format (written by other tools) must only be
loaded from trusted sources; share weights as `model.safetensors`.

A run resumed with a different number of processes cannot continue each rank's data stream
exactly (the documents are dealt out round-robin by rank); `restart_stream_state` starts the
new ranks after every document any old rank drew, so no document is seen twice.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from moesaic.errors import CheckpointError
from moesaic.files import fsync_file
from moesaic.train import checkpoint as ckpt
from moesaic.train.distributed import all_gather_object, barrier, broadcast_object, current_world

LAYOUT = ckpt.SHARDED
DCP_DIR = ckpt.DCP_DIR


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns whenever it runs without a process group; here that is intended."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Model and optimizer tensors keyed by parameter name (sharded where the model is).

    Optimizer hyper-parameters are left out (they come from the config), so only tensors go
    to disk. Creates the optimizer's state first if it has none yet.
    """
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": {"state": optim_sd["state"]}}


def save_dcp(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Every rank writes its own shards of model (+ optimizer) state into `directory`."""
    writer = dcp.HuggingFaceStorageWriter(str(directory), save_distributed=True)
    with _single_process_ok():
        dcp.save(sharded_state(model, optimizer), storage_writer=writer, no_dist=not _distributed())


def load_dcp(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load shards written by `save_dcp` at any world size into this model's layout."""
    state = sharded_state(model, optimizer)
    reader = dcp.HuggingFaceStorageReader(str(directory))
    try:
        with _single_process_ok():
            dcp.load(state, storage_reader=reader, no_dist=not _distributed())
    except (Exception, dcp.CheckpointException) as e:  # names the mismatched keys
        raise CheckpointError(
            f"sharded checkpoint '{directory}' does not fit the model ({str(e).splitlines()[0]})"
        ) from None
    if optimizer is not None:
        groups = get_state_dict(model, optimizer)[1]["param_groups"]
        optim_sd = {"state": state["optimizer"]["state"], "param_groups": groups}
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_sd)
    else:
        set_model_state_dict(model, state["model"])


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """All model weights as full CPU tensors on rank 0 (empty elsewhere); all ranks must call."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # Gathering 2-D (FSDP x expert) shards takes two all-gathers, which torch warns about.
    log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return get_model_state_dict(model, options=options)
    finally:
        log.setLevel(level)


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_tensors: dict[str, torch.Tensor],
) -> None:
    """Load a single-process checkpoint (full tensors on every rank) into a sharded model.

    `optimizer_tensors` are named `<param name>/<state key>` as in `optim.py`.
    """
    groups = get_state_dict(model, optimizer)[1]["param_groups"]
    state: dict[str, dict[str, torch.Tensor]] = {}
    for full_name, value in optimizer_tensors.items():
        name, key = full_name.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    try:
        set_state_dict(
            model,
            optimizer,
            model_state_dict=model_state,
            optim_state_dict={"state": state, "param_groups": groups},
            options=StateDictOptions(full_state_dict=True),
        )
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint does not fit the model ({e})") from None


# ---------------------------------------------------------------------------------- layout


def is_sharded(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def _local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's shards of the weights and optimizer state (what DCP writes)."""
    from torch.distributed.tensor import DTensor

    def size(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    total = sum(size(p) for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(size(v) for v in state.values() if torch.is_tensor(v))
    return total


def _write_error(root: Path, step: int, e: BaseException) -> CheckpointError:
    """A one-line error for a failed sharded write (DCP wraps every rank's exception)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    return ckpt.write_failure(root, step, e)


def save_sharded_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
    warn: ckpt.Warn | None = None,
    valid: Callable[[Path], bool] | None = None,
) -> Path:
    """Write checkpoint `step` of a multi-process run atomically; every rank must call.

    `rng_tensors` and `state["data"]` are this rank's; the rest of `state` is rank 0's. A
    failure on any rank (no room, an unwritable directory) raises the same one-line
    CheckpointError on every rank, after rank 0 removed the temporary directory.
    """
    world = current_world()
    root = Path(root)
    final = root / ckpt.checkpoint_dir_name(step)
    tmp = root / broadcast_object(f".tmp-{final.name}-{os.getpid()}")
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    needed = sum(all_gather_object(_local_bytes(model, optimizer))) + full_bytes
    failure = None
    if world.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / DCP_DIR).mkdir(parents=True)
            ckpt.check_free_space(root, needed, step)
        except CheckpointError as e:
            failure = str(e)
        except OSError as e:
            failure = str(ckpt.write_failure(root, step, e))
    _raise_on_all_ranks(failure, tmp)
    try:
        save_dcp(tmp / DCP_DIR, model, optimizer)
    except (OSError, SafetensorError, dcp.CheckpointException) as e:
        _raise_on_all_ranks(str(_write_error(root, step, e)), tmp)
    weights = full_model_state(model)
    rngs = all_gather_object({k: v.cpu() for k, v in rng_tensors.items()})
    data = all_gather_object(state.get("data"))
    if world.is_main:
        rng = {f"{k}/{r}": v for r, d in enumerate(rngs) for k, v in d.items()}
        body = {**state, "layout": LAYOUT, "world_size": world.world_size, "data": data}
        try:
            with ckpt.writing(root, step, create=False):
                for name, tensors in (("model.safetensors", weights), ("rng.safetensors", rng)):
                    save_file(ckpt._unique_tensors(tensors), str(tmp / name))
                    fsync_file(tmp / name)
                ckpt.publish(root, tmp, step, body)
        except CheckpointError as e:
            failure = str(e)
    _raise_on_all_ranks(failure, tmp)
    if world.is_main:
        ckpt.prune_checkpoints(root, keep, warn, ckpt._trusting(final, valid))
    barrier()
    return final


def _raise_on_all_ranks(failure: str | None, tmp: Path) -> None:
    """Rank 0's failure (or None) on every rank: each raises it, rank 0 after cleaning up."""
    if failure is not None and current_world().is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    failure = broadcast_object(failure)
    if failure is not None:
        raise CheckpointError(failure)


def verify_any(path: Path, fingerprint: str | None = None) -> ckpt.Checkpoint:
    """Verify a checkpoint of either layout (`checkpoint.verify_checkpoint` reads both)."""
    return ckpt.verify_checkpoint(path, fingerprint)


def latest_any_checkpoint(
    root: Path, fingerprint: str | None = None
) -> tuple[ckpt.Checkpoint | None, list[str]]:
    """The newest checkpoint of either layout that verifies, plus why newer ones did not."""
    return ckpt.latest_checkpoint(root, fingerprint, verify_any)


# ---------------------------------------------------------------------------------- data, RNG


def stream_states(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-rank data-stream states of a checkpoint of either layout."""
    data = state["data"]
    return list(data) if isinstance(data, list) else [data]


def restart_stream_state(states: list[dict[str, Any]], rank: int, world_size: int) -> dict:
    """A stream state for `rank` of `world_size` that follows every document `states` drew.

    Rank r of N draws the documents g ≡ r (mod N) of each kind, so the old ranks drew only
    documents g < max_r counters_r·N; the new ranks start at the first multiple of the new
    world size past that. Documents the old ranks held over for their next row are skipped,
    never repeated. Token shares (`produced`) are carried over per rank, so the mix stays on
    target; counts of skipped records and statistics go to rank 0. `rows` stays the rows each
    rank has drawn per step so far (the position checkpoints are checked against).
    """
    if "parts" in states[0]:  # stacked sub-batches: every part restarts on its own
        parts = [
            restart_stream_state([s["parts"][i] for s in states], rank, world_size)
            for i in range(len(states[0]["parts"]))
        ]
        return {**states[0], "rank": rank, "world_size": world_size, "parts": parts}
    try:
        old = len(states)
        kinds = list(states[0]["counters"])
        counters, produced = {}, {}
        for k in kinds:
            start = max(int(s["counters"][k]) * old for s in states)
            counters[k] = math.ceil(start / world_size)
            produced[k] = round(sum(int(s["produced"][k]) for s in states) / world_size)
        totals: dict[str, dict[str, int]] = {"stats": {}, "skipped": {}}
        for name, total in totals.items():
            for s in states:
                for key, v in s.get(name, {}).items():
                    total[key] = total.get(key, 0) + int(v)
        rows = max(int(s["rows"]) for s in states)  # rows per rank: step · batch rows
        return {
            "version": states[0]["version"],
            "rank": rank,
            "world_size": world_size,
            "counters": counters,
            "produced": produced,
            "pending": [],
            "rows": rows,
            "stats": totals["stats"] if rank == 0 else {},
            "skipped": totals["skipped"] if rank == 0 else {},
        }
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"cannot move this checkpoint's data-stream position to {world_size} processes "
            f"(unexpected stream state: {e!r}); resume with the world size it was saved with"
        ) from None


def rank_stream_state(state: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's stream state: its own when the world size is unchanged, else a restart."""
    states = stream_states(state)
    if len(states) == world_size:
        return states[rank]
    return restart_stream_state(states, rank, world_size)


def rank_rng(rng: dict[str, torch.Tensor], rank: int, world_size: int, saved_world: int):
    """This rank's saved RNG states ({"cpu": ..., "cuda": ...}) or {} if the world changed."""
    if saved_world != world_size:
        return {}
    if world_size == 1 and "cpu" in rng:
        return rng
    prefix = f"/{rank}"
    return {k[: -len(prefix)]: v for k, v in rng.items() if k.endswith(prefix)}
