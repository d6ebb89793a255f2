"""The `slimquant` command: one sub-command per module in entrypoints/commands/."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

from slimquant.errors import RankFailure

# Each module defines register(subparsers) that adds its parser and sets func=run(args) -> int.
COMMANDS = ("demo", "quantize", "inspect", "generate", "chat", "eval", "bench", "serve")


class CommandParser(argparse.ArgumentParser):
    """Sub-command parser that keeps the line breaks of descriptions and examples."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="slimquant",
        description="Quantize LLMs to int8 (ascend / ModelSlim W8A8 format) and run them.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name in COMMANDS:
        importlib.import_module(f"slimquant.entrypoints.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors are one clear line unless --debug."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s")
    code = _run(args)
    if getattr(args, "exit_at_once", False):  # a thread may be inside a C++ call the interpreter's exit would abort
        _exit_now(code)
    return code


def _run(args: argparse.Namespace) -> int:
    """args.func(args)'s exit status; its errors said in one line unless --debug."""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, TypeError, RankFailure) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


def _exit_now(code: int) -> NoReturn:
    """Leave the process with code at once, its output flushed (os._exit: no interpreter shutdown)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
