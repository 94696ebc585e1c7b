"""The `streamspec` command line: one sub-command per module in `tools/commands/`.

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args)`.
Modules import their heavy dependencies (torch, transformers) inside `run`, so
`streamspec --help` and the runtime commands stay light.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

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
    "tune": "tune",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamspec",
        description="Speculative Streaming for edge devices: train streams into a model, "
                    "export it to ONNX, generate fast with ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"streamspec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"streamspec.tools.commands.{module_name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except StreamspecError as error:
        print(f"streamspec {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"streamspec {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
