"""The `search` command line: one module per sub-command under search/commands/."""

from __future__ import annotations

import argparse
import importlib
import sys

from merge_core.errors import MergeInputError
from objectives.errors import TaskInputError
from search.errors import StudyError

COMMANDS = ("merge", "init", "score", "start", "status", "export", "dashboard", "report", "demo")
USER_ERRORS = (MergeInputError, TaskInputError, StudyError)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line and exits with code 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every available sub-command registered."""
    parser = OneLineParser(prog="search", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"search.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"search.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `search` console script; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)  # imports each command's module: Ctrl-C may land here
        return args.func(args) or 0
    except USER_ERRORS as exc:
        sys.stderr.write(f"search {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", 2)  # search.interrupts.Interrupted carries SIGINT or SIGTERM
        sys.stderr.write("search: interrupted; run the same command again to resume\n")
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
