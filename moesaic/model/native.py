"""The CPU expert kernel (`csrc/experts.cpp`): built on first use, then loaded from a cache.

`moesaic` ships the kernel as C++ source and compiles it with `torch.utils.cpp_extension`
(ninja and a C++ compiler with OpenMP) the first time a process needs it, once per torch and
Python version, into `$MOESAIC_NATIVE_DIR` (default `$MOESAIC_CACHE/native/...`, that by default
`~/.cache/moesaic`). Later processes load the built library in well under a second.
`MOESAIC_NATIVE=0` turns it off: `model.ffn.dispatch=auto` then uses the pure-PyTorch paths,
and `=native` is refused.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from moesaic.errors import ConfigError
from moesaic.files import cache_dir

SOURCE = Path(__file__).with_name("csrc") / "experts.cpp"
NAME = "moesaic_experts"


class NativeUnavailable(RuntimeError):
    """The kernel cannot be used here; the message says why in one line."""


def compiler_found() -> bool:
    """Whether the C++ compiler torch's extension builder calls (`$CXX`, else `c++`) exists."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def enabled() -> bool:
    return os.environ.get("MOESAIC_NATIVE", "1").lower() not in ("0", "false", "off", "no")


def build_dir() -> Path:
    """Where the built library lives: per torch version and Python ABI."""
    root = os.environ.get("MOESAIC_NATIVE_DIR")
    base = Path(root) if root else cache_dir() / "native"
    abi = sysconfig.get_config_var("SOABI") or f"py{sys.version_info[0]}{sys.version_info[1]}"
    return base / f"torch-{torch.__version__}-{abi}"


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


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob(f"{NAME}*.so")):
        print(
            "moesaic: compiling the CPU expert kernel (once per torch version, about 40 s)",
            file=sys.stderr,
            flush=True,
        )
    _ninja_on_path()
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # compiler-ABI banners; failures raise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cpp_extension.load(
                NAME,
                [str(SOURCE)],
                extra_cflags=["-O3", "-fopenmp"],
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
