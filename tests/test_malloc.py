"""The CPU allocator setting: freed memory is reused instead of being mapped (and faulted) again."""

import os
import subprocess
import sys

import pytest

from moesaic.train import malloc

# Ten forward/backward steps of a fine-grained MoE layer (its [T·k, D] expert-ordered buffers
# are the allocations that glibc hands back to the kernel between steps by default).
PROBE = """
import dataclasses, resource, torch
from moesaic.bench.moe import SHAPES, build_moe, _meta
from moesaic.train.malloc import retain_freed_memory
applied = retain_freed_memory()
torch.set_num_threads(1)
shape = dataclasses.replace(SHAPES["fine"], tokens=1024)
moe = build_moe(shape, "auto", 0)
x = torch.randn(shape.tokens, shape.dim, requires_grad=True)
meta = _meta(shape.tokens, x.device)
def step():
    y, aux = moe(x, meta)
    (y.sum() + aux).backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(setting: str) -> tuple[bool, int]:
    env = {**os.environ, "MOESAIC_MALLOC": setting}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, capture_output=True)
    applied, faults = out.stdout.decode().split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not malloc.retain_freed_memory(), reason="C library is not glibc")
def test_retained_memory_is_not_faulted_again():
    applied, tuned = _faults("")
    default_applied, default = _faults("default")
    assert applied and not default_applied
    assert default > 10_000  # glibc alone maps and faults the buffers again every step
    assert tuned < default / 10
