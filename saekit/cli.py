"""The `saekit` console script: a thin layer that parses flags and calls the library."""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from saekit import __version__
from saekit.errors import SaekitError, one_line

#: Subcommand modules under saekit.commands, in the order `--help` lists them.
COMMAND_MODULES: list[str] = [
    "train", "pretrained", "upload", "eval", "cache", "pretokenize", "dashboard", "hooks",
    "synthetic", "export", "autointerp",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saekit",
        description="Train, evaluate, load, share and analyse sparse autoencoders.",
    )
    parser.add_argument("--version", action="version", version=f"saekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    add_output_flags(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"saekit.commands.{name}").register(subparsers)
    # The same flags after the command (`saekit eval X --no-progress`), where a command does
    # not define them itself (`saekit train` has --progress/--no-progress from its config).
    for command in subparsers.choices.values():
        _add_output_flags_below(command)
    return parser


def _add_output_flags_below(parser: argparse.ArgumentParser) -> None:
    add_output_flags(parser, top_level=False)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):  # `saekit pretrained list`
            for sub in action.choices.values():
                _add_output_flags_below(sub)


def add_output_flags(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    """--no-progress and -q/--quiet. After a command they default to SUPPRESS, so that
    leaving them out there keeps what was given before the command."""
    default: dict[str, Any] = {} if top_level else {"default": argparse.SUPPRESS}
    taken = parser._option_string_actions
    if "--no-progress" not in taken:
        parser.add_argument(
            "--no-progress", dest="no_progress", action="store_true", **default,
            help="no progress bars or status lines (results, warnings and errors only)",
        )
    if "--quiet" not in taken and "-q" not in taken:
        parser.add_argument(
            "-q", "--quiet", action="store_true", **default,
            help="print only warnings, errors and the final results",
        )


def main(argv: Sequence[str] | None = None) -> int:
    from saekit.progress import terminal

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"saekit: error: {unknown_arguments_message(parser, argv, unknown)}",
              file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        with terminal(progress=not args.no_progress, quiet=args.quiet, verbose=args.verbose):
            code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not at exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        # Errors meant for users: the message says what was wrong and what to do; the
        # traceback is for bug reports (-v).
        if args.verbose:
            traceback.print_exc()
        print(f"saekit: error: {one_line(err)}", file=sys.stderr)
        return 2


def unknown_arguments_message(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, unknown: Sequence[str]
) -> str:
    """`unknown flag --trainng-tokens; did you mean --training-tokens?`: the first unknown
    flag, with the closest flag of the command it was given to."""
    words = list(sys.argv[1:] if argv is None else argv)
    command, options = _command_options(parser, words)
    flags = [word for word in unknown if word.startswith("--")]
    if not flags:
        return f"unexpected arguments {' '.join(unknown)}; {command} --help says what it takes"
    flag = flags[0].split("=", 1)[0]
    close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"{command} --help lists them"
    return f"unknown flag {flag}; {hint}"


def _command_options(
    parser: argparse.ArgumentParser, words: Sequence[str]
) -> tuple[str, list[str]]:
    """The (sub)command the words name (`saekit pretrained list`) and every long flag it
    takes, the top-level ones included."""
    options = [o for o in parser._option_string_actions if o.startswith("--")]
    command, current = parser.prog, parser
    for word in words:
        subparsers = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if subparsers and word in subparsers[0].choices:
            current = subparsers[0].choices[word]
            command = current.prog
            options += [o for o in current._option_string_actions if o.startswith("--")]
    return command, sorted(set(options))


#: Exceptions that are a user's mistake or the machine's state, not a bug: a `SaekitError`,
#: a `ValueError` (bad values, unreadable files) or an `OSError` (missing files, no space,
#: no network). Anything else keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (SaekitError, ValueError, OSError)


def _stdout_closed() -> int:
    """The reader of stdout went away (`saekit pretrained list | head`): stop quietly, as
    the Python docs advise (SIGPIPE note), with the exit status a shell gives for SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would fail again
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (captured)
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
