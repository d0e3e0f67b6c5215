"""Independent jobs in spawned worker processes, stopped as a whole on Ctrl-C / SIGTERM.

When the parent is interrupted (or a job reports failure by raising), a shared stop event is
set; every worker then sends itself SIGINT — a running `Trainer` takes that as its usual
"checkpoint and stop" signal — and jobs still queued return at once without starting. The
parent waits for the workers to finish cleanly before re-raising.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

_stop_event: Any = None
_signalled = False


def _note_signal(signum, frame) -> None:
    global _signalled
    _signalled = True


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop_requested() -> bool:
    """True inside a worker once the study is being stopped."""
    return _signalled or (_stop_event is not None and _stop_event.is_set())


def _init_worker(stop: Any) -> None:
    global _stop_event
    _stop_event = stop
    signal.signal(signal.SIGINT, _note_signal)
    signal.signal(signal.SIGTERM, _note_signal)

    def forward_stop() -> None:
        stop.wait()
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=forward_stop, daemon=True).start()


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    if stop_requested():
        return None
    return fn(item)


def run_parallel(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    jobs: int,
    on_result: Callable[[Any, Any], None],
) -> None:
    """`on_result(item, fn(item))` in the parent, in completion order, `jobs` at a time.

    `fn` and the items must be picklable (a module-level function or a partial of one). An
    exception from `fn` or `on_result`, Ctrl-C or SIGTERM stops all workers, then propagates.
    """
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with cf.ProcessPoolExecutor(
            jobs, mp_context=ctx, initializer=_init_worker, initargs=(stop,)
        ) as pool:
            futures = {pool.submit(_call, fn, item): item for item in items}
            try:
                for fut in cf.as_completed(futures):
                    result = fut.result()
                    if result is not None:
                        on_result(futures[fut], result)
            except BaseException:
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        signal.signal(signal.SIGTERM, previous)
