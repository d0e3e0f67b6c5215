"""The `moesaic` command. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `run(args) -> int`; this file only wires them together.

User errors (`MoesaicError`) print one line on stderr, without a traceback, and exit 2;
skipped data records print as one `warning:` line each.
Options and positional arguments (a config and its `key=value` overrides) mix in any order.
SIGTERM is treated like Ctrl-C from the first moment: a command that is not training (or a
training run still starting up) stops with one line and exit code 130; the training loop
itself checkpoints first (`moesaic.train.loop`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def interrupt_name(e: KeyboardInterrupt) -> str:
    return "SIGTERM" if isinstance(e, Terminated) else "SIGINT"


class IntermixedParser(argparse.ArgumentParser):
    """Options and positionals in any order (`train tiny --out X k=v --name Y`).

    argparse's own parser stops filling a `nargs="*"` positional at the first option; its
    intermixed mode does not, but refuses parsers with subcommands, which keep the plain mode.
    """

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesaic",
        description="Unified multimodal pretraining with per-token sparse capacity.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=IntermixedParser)
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
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        with data_warnings_as_lines():
            return int(args._run(args) or 0)
    except MoesaicError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt as e:
        print(f"stopped by {interrupt_name(e)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`moesaic info tiny | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
