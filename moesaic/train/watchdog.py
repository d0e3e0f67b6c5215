"""A watchdog thread that turns a dead or failed peer into a prompt, explained exit.

Collectives already fail after `dist.timeout_s`, and torchrun stops all workers when one
exits. Neither helps a rank that is not inside a collective (or a launcher such as plain
`srun` that does not watch its tasks) within a short, bounded time; this does.

A rank inside a collective when a peer dies sees the collective fail at once (gloo: "Connection
reset by peer"). `report_failures` turns that, and any error that follows a failure another
rank reported, into `PeerFailure`: one line naming the cause (the peer's own error when it
reported one), instead of a traceback that only shows where this rank was waiting.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import re
import sys
import threading
import time
from collections.abc import Iterator

import torch.distributed as dist

from moesaic.errors import MoesaicError
from moesaic.train.distributed import World

_GENERATION = itertools.count()
# What gloo / NCCL / the store say when a peer process or its connection is gone.
_PEER_LOSS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Connection refused",
    "Broken pipe",
    "Socket closed",
    "Read error",
    "Write error",
    "NCCL communicator was aborted",
)


class PeerFailure(MoesaicError):
    """This rank stopped because another rank failed or died; the message names the cause."""

    exit_code = 1  # not this rank's user error: the command exits 1, as the watchdog does


class Watchdog:
    """A daemon thread that turns a dead or failed peer into a prompt exit with a clear reason.

    Every `timeout_s / 5` seconds it bumps this rank's heartbeat counter in the rendezvous
    store and checks (a) whether any rank reported a failure (`report_failure`) and (b) the
    heartbeat of the next rank in a ring (rank r watches r+1, so the store sees O(N) traffic):
    a counter unchanged for `timeout_s` (this rank's own clock, no clock sync needed) means the
    peer's process is gone. A store that stops answering means its host (torchrun's agent, or
    rank 0) is gone. In each case this process prints one line and exits with code 1, even
    while its main thread is blocked in a collective. `stop()` marks the rank done so peers
    that finish later do not mistake its silence for death.
    """

    def __init__(self, world: World, timeout_s: float, store=None, poll_s: float | None = None):
        self.world, self.timeout_s = world, timeout_s
        self.poll_s = poll_s or max(0.05, timeout_s / 5)
        self.store = store if store is not None else _watchdog_store(timeout_s)
        self._stop = threading.Event()
        self._reported = False
        self._exiting = threading.Lock()  # whoever holds it prints the one line
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        self._beat(0)
        self._thread = threading.Thread(target=self._run, name="moesaic-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching; peers stop watching this rank too. Call on every rank at exit."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with contextlib.suppress(Exception):
            self.store.set(f"done/{self.world.rank}", "1")

    def report_failure(self, message: str) -> None:
        """Tell every peer this rank failed (they exit within one poll interval). The first
        report stands: a later one (a consequence) does not replace it."""
        self._reported = True  # this rank raises on its own; its watchdog must not exit it
        with contextlib.suppress(Exception):
            if not self.store.check(["failed"]):
                self.store.set("failed", f"rank {self.world.rank}: {message}")

    def peer_failure(self) -> str | None:
        """The failure another rank reported ("rank R: ..."), or None."""
        with contextlib.suppress(Exception):
            if self.store.check(["failed"]):
                report = self.store.get("failed").decode()
                if not report.startswith(f"rank {self.world.rank}:"):
                    return report
        return None

    def claim_exit(self) -> bool:
        """Become the one that explains this rank's exit (False: the watchdog already is)."""
        return self._exiting.acquire(blocking=False)

    def _beat(self, n: int) -> None:
        self.store.set(f"beat/{self.world.rank}", str(n))

    def _run(self) -> None:
        peer = (self.world.rank + 1) % self.world.world_size
        beats, seen, changed = 0, None, time.monotonic()
        while not self._stop.wait(self.poll_s):
            try:
                beats += 1
                self._beat(beats)
                if not self._reported and self.store.check(["failed"]):
                    self._exit(f"stopping after a failure on {self.store.get('failed').decode()}")
                if self.store.check([f"done/{peer}"]):
                    continue
                value = (
                    self.store.get(f"beat/{peer}") if self.store.check([f"beat/{peer}"]) else None
                )
                now = time.monotonic()
                if value != seen:
                    seen, changed = value, now
                elif now - changed > self.timeout_s:
                    reason = (
                        f"rank {peer} sent no heartbeat for {self.timeout_s:g} s (process died?)"
                    )
                    self.report_failure(reason)
                    self._exit(reason)
            except Exception as e:  # the store's host is gone
                if self._stop.is_set():
                    return
                self._exit(
                    f"lost the rendezvous store ({type(e).__name__}: {e}); a peer or the "
                    "launcher died"
                )

    def _exit(self, reason: str) -> None:
        if not self.claim_exit():  # the main thread is already reporting this rank's failure
            self._stop.set()
            return
        print(f"error: rank {self.world.rank}: {reason}; exiting", file=sys.stderr, flush=True)
        os._exit(1)


def _watchdog_store(timeout_s: float):
    """A separate client of the rendezvous store, namespaced per run and restart attempt."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(
        host, port, is_master=False, timeout=datetime.timedelta(seconds=max(timeout_s, 5.0))
    )
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    # Every rank creates its watchdogs in the same order, so the n-th ones share a namespace.
    return dist.PrefixStore(f"moesaic/watchdog/{run}/{attempt}/{next(_GENERATION)}", store)


def _peer_loss(e: BaseException) -> bool:
    """Whether `e` is a collective or store failing because a peer (or its link) is gone."""
    dist_error = getattr(dist, "DistError", ())
    if isinstance(e, dist_error):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _PEER_LOSS)


def _first_line(e: BaseException) -> str:
    """The gist of an error: its first line, without gloo's source location and advice."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)
    line = line.split(". This is typically caused by")[0].rstrip(".")
    return line if len(line) <= 200 else line[:197] + "..."


@contextlib.contextmanager
def report_failures(watchdog: Watchdog | None) -> Iterator[None]:
    """Tell the peers when the body raises, so they stop now instead of at a timeout.

    An error caused by another rank's failure (a collective that failed because a peer died,
    or anything after a peer reported a failure) becomes one `PeerFailure` line naming that
    cause; this rank's own errors are reported to the peers and re-raised unchanged.
    """
    try:
        yield
    except BaseException as e:
        if watchdog is None:
            raise
        peer = None if isinstance(e, MoesaicError | KeyboardInterrupt) else watchdog.peer_failure()
        if peer is None and _peer_loss(e):
            world = watchdog.world
            who = f"rank {1 - world.rank}" if world.world_size == 2 else "a peer"
            peer = f"lost {who} during a collective ({_first_line(e)}; process died?)"
            watchdog.report_failure(peer)
        elif peer is not None:
            peer = f"stopping after a failure on {peer}"
        else:
            watchdog.report_failure(f"{type(e).__name__}: {_first_line(e)}"[:300])
        if peer is not None and watchdog.claim_exit():
            watchdog.stop()
            raise PeerFailure(f"rank {watchdog.world.rank}: {peer}") from None
        watchdog.stop()
        raise
