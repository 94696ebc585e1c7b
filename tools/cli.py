"""The `streamspec` command line: one sub-command per module in `tools/commands/`.

`streamspec bench` also names the other benchmarks (`streamspec bench precision ...`):
each is a command of its own, named by the two words.

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args)`.
Modules import their heavy dependencies (torch, transformers) inside `run`, so
`streamspec --help` and the runtime commands stay light.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
import threading
from typing import Callable, Iterator, Optional, Sequence

from streamspec import __version__
from streamspec.errors import StreamspecError

# command name -> module under streamspec.tools.commands
COMMANDS = {
    "distill": "distill",
    "train": "train",
    "export": "export",
    "generate": "generate",
    "serve": "serve",
    "build-ops": "build_ops",
    "profile": "profile",
    "report": "report",
    "demo": "demo",
    "bench": "bench",
    "bench precision": "bench_precision",
    "bench pruning": "bench_pruning",
    "bench attention": "bench_attention",
    "bench distill": "bench_distill",
    "bench kernels": "bench_kernels",
    "tune": "tune",
}


class UsageError(StreamspecError):
    """A command line that argparse refuses (unknown option, a value out of range)."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one sentence and exit code 1 (as every other bad
    input), not argparse's usage block and exit code 2. Sub-command parsers inherit it."""

    def error(self, message: str):
        # "argument --port: must be between 1 and 65535, got 0" -> "--port must be ...":
        # the checked types (commands/arguments.py) word their messages for this.
        match = re.fullmatch(r"argument ([^:/ ]+)(?:/\S+)?: (must|is|cannot) (.*)", message, re.S)
        if match:
            message = f"{match[1]} {match[2]} {match[3]}"
        raise UsageError(self.prog, f"{message.rstrip('.')}; see `{self.prog} --help`.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="streamspec",
        description="Speculative Streaming for edge devices: train streams into a model, "
                    "export it to ONNX, generate fast with ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"streamspec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"streamspec.tools.commands.{module_name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP,
                                 epilog=getattr(module, "EPILOG", None),
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def join_command(argv: Sequence[str]) -> list[str]:
    """["bench", "precision", ...] -> ["bench precision", ...]: a two-word command is one
    sub-parser (argparse cannot take `bench [DIR]` and `bench precision` under one parser:
    the optional folder would be read as a sub-command's name). A folder named like a
    benchmark is passed as ./precision."""
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in COMMANDS:
        return [f"{argv[0]} {argv[1]}", *argv[2:]]
    return list(argv)


def bench_main(kind: str) -> Callable[[Optional[Sequence[str]]], int]:
    """The `main` of `python -m streamspec.tools.bench_<kind>`: `streamspec bench <kind>`
    with the same arguments (the modules ran as scripts before they were commands)."""

    def run(argv: Optional[Sequence[str]] = None) -> int:
        return main(["bench", kind, *(sys.argv[1:] if argv is None else argv)])

    return run


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(join_command(sys.argv[1:] if argv is None else argv))
    except UsageError as error:
        print(f"{error.prog}: {error}", file=sys.stderr)
        return 1
    if args.command is None:
        parser.print_help(sys.stderr)
        return 1
    try:
        with exit_on_sigterm():
            return int(args.run(args) or 0)
    except StreamspecError as error:
        print(f"streamspec {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"streamspec {args.command}: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 1


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """SIGTERM (systemd, `kill`) exits through Python's cleanup, like Ctrl-C: an
    interrupted export then removes its temporary folder. By default SIGTERM ends the
    process on the spot, cleanup skipped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_stdout() -> None:
    """The reader of stdout left (`streamspec generate ... | head -c1`): not an error worth
    a traceback. Point stdout at /dev/null so that the interpreter's last flush at exit
    does not raise again (what the Python documentation advises for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no real file (tests capture it)
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
