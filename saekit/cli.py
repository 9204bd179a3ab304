"""The `saekit` console script: a thin layer that parses flags and calls the library."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from saekit import __version__

#: Subcommand modules under saekit.commands, in the order `--help` lists them.
COMMAND_MODULES: list[str] = [
    "train", "pretrained", "upload", "eval", "cache", "pretokenize", "dashboard"
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saekit",
        description="Train, evaluate, load, share and analyse sparse autoencoders.",
    )
    parser.add_argument("--version", action="version", version=f"saekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"saekit.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as err:
        # Errors meant for users: their message says what was wrong and what to do.
        print(f"saekit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
