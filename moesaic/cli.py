"""The `moesaic` command. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `run(args) -> int`; this file only wires them together.

User errors (`MoesaicError`) print one line on stderr, without a traceback, and exit 2;
skipped data records print as one `warning:` line each.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moesaic.data.reading import data_warnings_as_lines
from moesaic.errors import MoesaicError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("moesaic.commands.train", "train a model from a config, or resume a run exactly"),
    "eval": ("moesaic.commands.eval", "held-out losses of a run's latest checkpoint"),
    "info": (
        "moesaic.commands.info",
        "parameters (total/active), FLOPs per token, tokens per step",
    ),
    "sample": ("moesaic.commands.sample", "generate an image, a caption or an answer from a run"),
    "compete": ("moesaic.commands.compete", "the modality-competition study: tax per arm + report"),
    "analyze": ("moesaic.commands.analyze", "expert specialisation and activation sparsity"),
    "bench": ("moesaic.bench.cli", "run a benchmark (prints a table; --json writes the figures)"),
    "data": (
        "moesaic.commands.data",
        "data helpers: `data example DIR` writes a real-data example",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesaic",
        description="Unified multimodal pretraining with per-token sparse capacity.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from moesaic import __version__

    return f"moesaic {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        with data_warnings_as_lines():
            return int(args._run(args) or 0)
    except MoesaicError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
