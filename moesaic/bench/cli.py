"""`moesaic bench NAME`: benchmarks. Each lives in its own module providing
`add_arguments(parser)` and `run(args) -> int`; it prints a table and can write JSON (`--json`).
Every figure it reports is a ratio to a reference measured in the same process.
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "data": ("moesaic.bench.data", "generated + packed tokens per second of the data stream"),
    "moe": ("moesaic.bench.moe", "one MoE layer vs a FLOP-matched dense FFN and peer MoEs"),
    "train": ("moesaic.bench.train", "training tokens/s and MFU, dense vs MoE"),
    "sample": ("moesaic.bench.sample", "images/s and caption tokens/s; cached vs uncached"),
    "study": ("moesaic.bench.study", "a study run's steps/s against the FLOP-bound ideal"),
    "memory": ("moesaic.bench.memory", "n-gram memory's share of a training step"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_bench=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._bench(args) or 0)
