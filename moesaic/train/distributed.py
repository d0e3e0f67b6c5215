"""Scale-out on torch.distributed: process group, device meshes, FSDP2, collectives.

A run with several processes is launched by `torchrun` (or any launcher that sets the same
environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`); the same code
runs on CPU (gloo) and GPU (NCCL for CUDA tensors, gloo for CPU tensors). Model code knows
nothing of this: `parallelize` takes an unmodified `Transformer` and

* shards each MoE layer's experts over an expert-parallel group (`expert_parallel.py`), and
* applies FSDP2 (`fully_shard`) to every block and to the root, so every rank holds 1/N of
  each weight, gradient and optimizer state between uses.

Meshes. Every rank is a data-parallel rank: it reads its own shard of the data stream and its
loss is averaged with the others'. Non-expert weights are sharded over all N ranks (the `dp`
mesh). With expert parallel size P the ranks also form an `(N/P, P)` mesh: an MoE layer's
experts are split over the `ep` dimension (P consecutive ranks exchange tokens), and each
expert shard is FSDP-sharded over the `dp_mod_ep` dimension.

Failure. A collective that waits longer than `dist.timeout_s` fails; the watchdog thread of
`watchdog.py` also turns a dead peer (no heartbeat for `dist.watchdog_s`) or a failure reported
by a peer into a prompt exit with a one-line reason, even while a rank waits in a collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moesaic.config import DistConfig
from moesaic.errors import ConfigError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class World:
    """Where this process sits: global rank, number of processes, rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, shows progress and writes run files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> World:
    """The world a launcher describes in the environment (one process when it says nothing)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError(
            "RANK / WORLD_SIZE / LOCAL_RANK must be integers; launch with torchrun"
        ) from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            f"RANK={rank} must be in [0, WORLD_SIZE={world_size}); launch with torchrun"
        )
    return World(rank, world_size, local_rank)


def current_world() -> World:
    """The world of the initialised process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return World(dist.get_rank(), dist.get_world_size(), local)
    return World()


def rank_device(device: torch.device, world: World) -> torch.device:
    """A CUDA device without an index becomes this rank's local GPU (`cuda:LOCAL_RANK`)."""
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", world.local_rank % max(1, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def resolve_backend(backend: str, device: torch.device) -> str:
    """gloo on CPU; on CUDA, NCCL for CUDA tensors and gloo for CPU ones (objects, barriers)."""
    if backend == "gloo":
        return "gloo"
    if device.type == "cuda":
        return "cpu:gloo,cuda:nccl"
    if backend == "nccl":
        raise ConfigError("dist.backend='nccl' needs CUDA devices; use dist.backend=gloo on CPU")
    return "gloo"


def init_distributed(
    timeout_s: float = 600.0, backend: str = "auto", device: torch.device | None = None
) -> World:
    """Join the process group the environment describes; a no-op for a single process.

    Idempotent: a second call returns the world of the existing group.
    """
    if dist.is_initialized():
        return current_world()
    world = env_world()
    if not world.distributed:
        return world
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world.world_size} but {', '.join(missing)} is not set; launch with "
            "torchrun (see the README section on distributed training)"
        )
    device = device or torch.device("cpu")
    kwargs = {"device_id": device} if device.type == "cuda" and device.index is not None else {}
    dist.init_process_group(
        backend=resolve_backend(backend, device),
        rank=world.rank,
        world_size=world.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    return world


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- collectives


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` over all ranks in place (identity for one process); returns it.

    The callable `update_router_biases(model, all_reduce=...)` expects.
    """
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of `tensor` over ranks, in place (gloo has no AVG: sum, then divide)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_max(tensor: Tensor) -> Tensor:
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (pickled between the run's own processes only)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier(timeout_s: float | None = None) -> None:
    """Wait for all ranks; with gloo, a timeout names the ranks that did not arrive."""
    if not _active():
        return
    if "gloo" in str(dist.get_backend()).lower() and timeout_s is not None:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    else:
        dist.barrier()


def all_reduce_routing_stats(model: nn.Module) -> None:
    """Sum every MoE layer's routing counters over ranks (one collective for all layers)."""
    from moesaic.model.moe import moe_layers

    buffers = [getattr(m, f"stats_{n}") for m in moe_layers(model) for n in m.stat_shapes()]
    if not buffers or not _active():
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for b, part in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
        b.copy_(part.view_as(b))


# ---------------------------------------------------------------------------------- gradients


def _norm_weight(t: Tensor, world_size: int) -> float:
    """1 / (number of ranks holding each element of `t`): squared norms then sum exactly once."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return 1.0 / world_size
    mesh = t.device_mesh
    copies = world_size // mesh.size()  # a mesh over part of the world repeats on the rest
    for dim, placement in enumerate(t.placements):
        if placement.is_replicate():
            copies *= mesh.size(dim)
    return 1.0 / copies


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Global L2 norm of all gradients (sharded or not), clipped to `max_norm` in place.

    Works across DTensors on different meshes (FSDP weights on `dp`, experts on the 2-D expert
    mesh), which `torch.nn.utils.clip_grad_norm_` cannot combine. Returns the pre-clip norm,
    identical on every rank; the scale is `max_norm / (norm + 1e-6)` capped at 1, as in torch.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    world_size = dist.get_world_size() if _active() else 1
    if not grads:
        return torch.zeros(())
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    device = local[0].device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g, t in zip(grads, local, strict=True):
        if t.numel():
            sq = sq + _norm_weight(g, world_size) * t.float().square().sum()
    all_reduce_sum(sq)
    total = sq.sqrt()
    if math.isfinite(max_norm):
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for t in local:
            t.mul_(scale.to(t.dtype))
    return total


# ---------------------------------------------------------------------------------- meshes, FSDP


@dataclasses.dataclass
class Meshes:
    """`dp`: all ranks (data parallel, FSDP of non-expert weights). `expert`: the 2-D
    ("dp_mod_ep", "ep") mesh when expert parallel size > 1, else None."""

    dp: object
    expert: object | None = None

    @property
    def expert_parallel(self) -> int:
        return 1 if self.expert is None else self.expert["ep"].size()


def build_meshes(device_type: str, world_size: int, expert_parallel: int) -> Meshes:
    from torch.distributed.device_mesh import init_device_mesh

    ep = expert_parallel
    if world_size % ep:
        raise ConfigError(
            f"dist.expert_parallel={ep} does not divide the {world_size} processes; "
            f"use a divisor of {world_size}"
        )
    dp = init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))
    expert = None
    if ep > 1:
        expert = init_device_mesh(
            device_type, (world_size // ep, ep), mesh_dim_names=("dp_mod_ep", "ep")
        )
    return Meshes(dp, expert)


def mixed_precision_dtype(cfg: DistConfig, device: torch.device, precision: str) -> torch.dtype:
    """bf16 weights in forward/backward on CUDA with bf16 precision (reduce stays fp32)."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if cfg.mixed_precision and device.type == "cuda" and bf16:
        return torch.bfloat16
    return torch.float32


def parallelize(
    model: nn.Module, cfg: DistConfig, device: torch.device, precision: str = "auto"
) -> Meshes:
    """Apply expert parallelism, then FSDP2, to a `Transformer` in place; returns the meshes.

    Every rank must have built the model with the same seed (identical full weights): each
    keeps its own shards. Build the optimizer afterwards, over the sharded parameters.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from moesaic.model.moe import MoE
    from moesaic.train.expert_parallel import apply_expert_parallel

    world_size = dist.get_world_size()
    meshes = build_meshes(device.type, world_size, cfg.expert_parallel)
    if meshes.expert is not None:
        apply_expert_parallel(model, meshes.expert["ep"])
    dtype = mixed_precision_dtype(cfg, device, precision)
    # Inputs are not cast: the batch's float fields (noise, flow times) keep full precision;
    # autocast decides compute dtypes, FSDP only the dtype weights are gathered in.
    policy = MixedPrecisionPolicy(
        param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    fp32 = MixedPrecisionPolicy(
        param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    reshard = cfg.reshard_after_forward
    for block in model.blocks:
        ffn = block.ffn
        if isinstance(ffn, MoE):
            if dtype != torch.float32:  # router logits stay fp32 (design.md §4)
                fully_shard(
                    ffn.router, mesh=meshes.dp, reshard_after_forward=reshard, mp_policy=fp32
                )
            if meshes.expert is not None:
                experts = fully_shard(
                    ffn.experts,
                    mesh=meshes.expert["dp_mod_ep"],
                    reshard_after_forward=reshard,
                    mp_policy=policy,
                )
                # Each expert's gradient already sums the P ranks of its expert group (through
                # the all-to-all); dividing by N instead of N/P makes it the mean over all ranks.
                experts.set_gradient_divide_factor(float(world_size))
        fully_shard(block, mesh=meshes.dp, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=meshes.dp, reshard_after_forward=reshard, mp_policy=policy)
    return meshes


# ---------------------------------------------------------------------------------- the loop


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (e.g. a stop signal seen by one rank)."""
    if not _active():
        return flag
    return bool(all_reduce_max(torch.tensor([int(flag)])).item())


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the body first (filling a cache), then the others."""
    main = current_world().is_main
    if not main:
        barrier()
    yield
    if main:
        barrier()


def first_nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of a parameter with a NaN/inf on any rank's shard, the same on every rank."""
    from torch.distributed.tensor import DTensor

    names = [n for n, p in model.named_parameters()]
    bad = torch.zeros(len(names))
    for i, (_, p) in enumerate(model.named_parameters()):
        local = p.to_local() if isinstance(p, DTensor) else p
        bad[i] = float(not bool(torch.isfinite(local.detach()).all()))
    all_reduce_max(bad)
    hit = bad.nonzero()
    return names[int(hit[0])] if len(hit) else None


class NullLog:
    """Stands in for the metrics log on ranks other than 0."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
