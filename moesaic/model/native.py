"""The CPU expert kernel (`csrc/experts.cpp`): built on first use, then loaded from a cache.

`moesaic` ships the kernel as C++ source and compiles it with `torch.utils.cpp_extension`
(ninja and a C++ compiler with OpenMP) the first time a process needs it, into a directory
under `$MOESAIC_NATIVE_DIR` (default `$MOESAIC_CACHE/native/`, that by default
`~/.cache/moesaic`) named by what determines the library: the torch version, the Python ABI
and a hash of the kernel source's content, the compiler flags and the compiler. The source is
copied into that directory and built there, so checkouts in different places with the same
source share one build (torch's builder would otherwise rebuild whenever the source path
changes). A file lock in the directory serialises builders: a second process waits for the
first build, then loads it. Later processes load the built library directly, in well under a
second. `MOESAIC_NATIVE=0` turns it off: `model.ffn.dispatch=auto` then uses the pure-PyTorch
paths, and `=native` is refused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from moesaic.errors import ConfigError
from moesaic.files import atomic_write_bytes, atomic_write_text, cache_dir

SOURCE = Path(__file__).with_name("csrc") / "experts.cpp"
NAME = "moesaic_experts"
CFLAGS = ("-O3", "-fopenmp")
BUILT = "built.json"  # written after a successful build: the library's file name


class NativeUnavailable(RuntimeError):
    """The kernel cannot be used here; the message says why in one line."""


def compiler_found() -> bool:
    """Whether the C++ compiler torch's extension builder calls (`$CXX`, else `c++`) exists."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def enabled() -> bool:
    return os.environ.get("MOESAIC_NATIVE", "1").lower() not in ("0", "false", "off", "no")


def build_dir() -> Path:
    """Where the built library lives: one directory per torch version, Python ABI, kernel source
    content, compiler flags and compiler (never per checkout path)."""
    root = os.environ.get("MOESAIC_NATIVE_DIR")
    base = Path(root) if root else cache_dir() / "native"
    abi = sysconfig.get_config_var("SOABI") or f"py{sys.version_info[0]}{sys.version_info[1]}"
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(json.dumps([list(CFLAGS), os.environ.get("CXX", "c++")]).encode())
    return base / f"torch-{torch.__version__}-{abi}-{key.hexdigest()[:16]}"


def _ninja_on_path() -> None:
    """The `ninja` wheel installs its binary next to the interpreter, which may not be on PATH."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    path = os.environ.get("PATH", "")
    if bin_dir and bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir


_module: ModuleType | None = None
_failure: str | None = None  # why the build failed, kept so a process tries only once


def load() -> ModuleType:
    """The compiled kernel module, built on the first call; raises NativeUnavailable if it
    cannot be (turned off, or no compiler / ninja, or a failed compile: tried once)."""
    global _module, _failure
    if not enabled():
        raise NativeUnavailable("MOESAIC_NATIVE=0 turns the CPU expert kernel off")
    if _module is None and _failure is None:
        try:
            _module = _build()
        except Exception as e:  # a missing compiler or ninja, or a failed compile
            _failure = f"cannot build the CPU expert kernel: {_reason(e)}"
    if _module is None:
        raise NativeUnavailable(_failure)
    return _module


def _reason(e: Exception) -> str:
    """One short line from a build error: the compiler's or shell's own complaint if there is
    one (the first line is the command ninja ran), else the first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    telling = [ln for ln in lines[1:] if "error" in ln.lower() or "not found" in ln.lower()]
    line = (telling or lines)[0]
    return line if len(line) <= 160 else line[:157] + "..."


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on `directory` (released by the OS if its holder dies)."""
    try:
        import fcntl
    except ImportError:  # no flock here: builders are not serialised
        yield
        return
    with open(directory / "build.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                "moesaic: waiting for another process building the CPU expert kernel",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _import_library(path: Path) -> ModuleType:
    """Import a built extension module from its file (what torch's loader does after a build)."""
    spec = importlib.util.spec_from_file_location(NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load '{path}'")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build() -> ModuleType:
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory):
        built = directory / BUILT
        if built.is_file():
            library = directory / json.loads(built.read_text())["library"]
            if library.is_file():
                return _import_library(library)
        print(
            "moesaic: compiling the CPU expert kernel (once per kernel source and torch "
            "version, about 40 s)",
            file=sys.stderr,
            flush=True,
        )
        source = directory / SOURCE.name
        text = SOURCE.read_bytes()
        if not source.is_file() or source.read_bytes() != text:
            atomic_write_bytes(source, text)
        (directory / "lock").unlink(missing_ok=True)  # torch's own baton, left by a killed build
        module = _compile(directory, source)
        atomic_write_text(built, json.dumps({"library": Path(module.__file__).name}))
        return module


def _compile(directory: Path, source: Path) -> ModuleType:
    from torch.utils import cpp_extension

    _ninja_on_path()
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # compiler-ABI banners; failures raise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cpp_extension.load(
                NAME,
                [str(source)],
                extra_cflags=list(CFLAGS),
                build_directory=str(directory),
                verbose=False,
            )
    finally:
        log.setLevel(level)


def available() -> bool:
    """Whether the kernel is usable here (builds it on the first call); warns once if it was
    wanted but cannot be built."""
    if not enabled():
        return False
    try:
        load()
    except NativeUnavailable as e:
        _warn_once(str(e))
        return False
    return True


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(f"{message}; using the PyTorch dispatch paths", RuntimeWarning, stacklevel=4)


def require() -> ModuleType:
    """The kernel for `model.ffn.dispatch=native`, or a one-line ConfigError."""
    try:
        return load()
    except NativeUnavailable as e:
        raise ConfigError(f"model.ffn.dispatch='native': {e}; use model.ffn.dispatch=auto") from e


def supports(x: Tensor, *weights: Tensor) -> bool:
    """CPU, one floating dtype throughout."""
    tensors = (x, *weights)
    return all(t.device.type == "cpu" and t.dtype == x.dtype for t in tensors) and (
        x.dtype.is_floating_point
    )


def chosen(backend: str, x: Tensor, *weights: Tensor) -> bool:
    """Whether a `model.ffn.dispatch` backend runs these operands on the kernel: always for
    `native` (a one-line ConfigError off CPU), for `auto` on CPU when the kernel builds."""
    if backend not in ("auto", "native"):
        return False
    ok = supports(x, *weights)
    if backend == "native" and not ok:
        raise ConfigError(
            f"model.ffn.dispatch='native' runs on CPU only (got {x.device}); "
            "use model.ffn.dispatch=auto"
        )
    return ok and (backend == "native" or available())
