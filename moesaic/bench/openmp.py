"""The OpenMP wait policy CPU benchmarks run under.

libgomp's default policy busy-waits: between parallel regions the worker threads spin. On a
machine whose cores are shared with other jobs, a spinning worker is preempted, and the next
parallel region waits for it to be scheduled again: each region can then cost a scheduler time
slice (milliseconds), and a benchmark measures how many parallel regions each implementation
opens rather than the work it does. With `OMP_WAIT_POLICY=passive` the workers sleep between
regions and a region costs microseconds on a busy machine as on an idle one.

OpenMP reads the policy once, when torch loads it, so a benchmark that wants another policy
runs itself again in a child process with the variable set.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

POLICIES = ("passive", "active", "inherit")


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--omp-wait-policy",
        choices=POLICIES,
        default="passive",
        help="OpenMP wait policy the timings run under (passive: workers sleep between "
        "parallel regions; active: they spin, libgomp's default; inherit: this process as is)",
    )


def current() -> str:
    return os.environ.get("OMP_WAIT_POLICY", "").lower() or "default"


def rerun_if_needed(benchmark: str, policy: str) -> int | None:
    """Exit code of this benchmark re-run under `policy`, or None to run it in this process.

    Only when the process was started as `moesaic bench BENCHMARK ...` (a caller that imports
    the benchmark and calls `run` gets it in-process, under whatever policy it has).
    """
    if policy == "inherit" or sys.argv[1:3] != ["bench", benchmark] or current() == policy:
        return None
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--omp-wait-policy":
            skip = True
        elif not a.startswith("--omp-wait-policy="):
            argv.append(a)
    cmd = [sys.executable, "-m", "moesaic", *argv, "--omp-wait-policy", "inherit"]
    env = {**os.environ, "OMP_WAIT_POLICY": policy.upper()}
    print(f"(timing with OMP_WAIT_POLICY={policy.upper()} in a child process)", flush=True)
    return subprocess.run(cmd, env=env, check=False).returncode
