"""Run a test function in N CPU processes joined by a gloo process group.

`run_distributed(fn, world_size, *args)` starts `world_size` processes, initialises the process
group in each exactly as a `torchrun` worker would (the `RANK`/`WORLD_SIZE`/`MASTER_*`
environment and `moesaic.train.distributed.init_distributed`), calls `fn(*args)` and returns
the list of results in rank order. A failure on any rank stops the others and re-raises with
that rank's traceback; a run that exceeds `timeout` is killed, so a hung collective fails the
test instead of hanging the suite.

Processes come from a fork server that imports torch and moesaic once per test session, so a
2-process run costs a fraction of a second instead of two fresh interpreter imports. The
rendezvous store lives in the test process (like torchrun's agent store) on a port the OS
picked, so concurrent test sessions never collide on ports.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

PRELOAD = [
    "pytest",
    "torch",
    "torch._dynamo",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "moesaic.model",
    "moesaic.train.dist_checkpoint",
    "moesaic.train.distributed",
    "moesaic.train.expert_parallel",
    "moesaic.train.loop",
]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def worker_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment torchrun gives a worker whose agent hosts the store on `port`."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RESTART_COUNT": "0",
        "OMP_NUM_THREADS": "1",
    }


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker(fn, args, env, timeout_s, init, results) -> None:
    os.environ.clear()  # the fork server's environment is that of its start: use the test's
    os.environ.update(env)
    rank = int(env["RANK"])
    torch.set_num_threads(1)
    try:
        if init:
            from moesaic.train.distributed import init_distributed

            init_distributed(timeout_s=timeout_s, backend="gloo")
        value = fn(*args)
        results.put((rank, "ok", _dumps(value)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        results.close()
        results.join_thread()  # flush the message before exiting hard
        os._exit(1)  # peers blocked in a collective are stopped by the parent
    if init and dist.is_initialized():
        dist.destroy_process_group()


def start_workers(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout_s: float = 30.0,
    init: bool = True,
):
    """Start the workers; returns (processes, result queue, store). For tests that kill ranks."""
    ctx = _context()
    store = dist.TCPStore("127.0.0.1", 0, world_size, True, wait_for_workers=False)
    results = ctx.Queue()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, **worker_env(rank, world_size, store.port)}
        p = ctx.Process(target=_worker, args=(fn, args, env, timeout_s, init, results))
        p.start()
        procs.append(p)
    return procs, results, store


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout: float = 60.0,
    collective_timeout_s: float = 30.0,
) -> list[Any]:
    """Run `fn(*args)` on every rank of a fresh gloo group; results in rank order.

    `fn` must be importable by name (a module-level function). Results travel back with
    `torch.save`, so tensors and plain containers are fine.
    """
    procs, results, store = start_workers(fn, world_size, args, collective_timeout_s)
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(out))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout} s")
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                dead = [r for r in dead if r not in out]
                if dead:
                    time.sleep(0.5)  # give the error message a moment to arrive
                    if results.empty():
                        raise RuntimeError(
                            f"rank {dead[0]} exited with code {procs[dead[0]].exitcode}"
                        ) from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        del store
    return [out[r] for r in range(world_size)]
