"""File plumbing every room shares: atomic writes, fsync, checksums and the cache directory.

A write that must never be seen half-done (checkpoint metadata, summaries, reports, caches) goes
through `atomic_write_text`/`atomic_write_bytes`: the data goes to a hidden temporary file in
the same directory, is fsynced, renamed over the target and the directory fsynced, so a reader
sees the old content or the new one. On failure the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def os_error_fix(e: BaseException, where: Path | str) -> str:
    """What to do about a failed write (`e` an OSError) in `where`, in a few words."""
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"free some disk space for '{where}'"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make '{where}' writable"
    return f"check the disk holding '{where}'"


def cache_dir() -> Path:
    """Per-user cache of things derived deterministically from configs (tokenizers, the CPU
    kernel): `$MOESAIC_CACHE`, else `$XDG_CACHE_HOME/moesaic`, else `~/.cache/moesaic`."""
    root = os.environ.get("MOESAIC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moesaic"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
