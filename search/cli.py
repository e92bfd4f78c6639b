"""The `search` command line: one module per sub-command under search/commands/."""

from __future__ import annotations

import argparse
import importlib
import os
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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every available sub-command registered, or with `only` that one (each command
    imports what it needs: `search merge` need not import the study modules)."""
    parser = OneLineParser(prog="search", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in COMMANDS if only is None else (only,):
        try:
            module = importlib.import_module(f"search.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"search.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


# commands whose process may end without the interpreter's teardown (see _exit_now)
EXIT_WITHOUT_TEARDOWN = ("merge",)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `search` console script; returns the exit code."""
    words = sys.argv[1:] if argv is None else argv
    only = words[0] if words and words[0] in COMMANDS else None
    try:
        args = build_parser(only).parse_args(argv)  # imports the command's module: Ctrl-C may land here
        code = args.func(args) or 0
        if argv is None and args.command in EXIT_WITHOUT_TEARDOWN:
            _exit_now(code)
        return code
    except USER_ERRORS as exc:
        sys.stderr.write(f"search {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", 2)  # search.interrupts.Interrupted carries SIGINT or SIGTERM
        done = "nothing was written" if only == "merge" else "run the same command again to resume"
        sys.stderr.write(f"search: interrupted; {done}\n")
        return 128 + signum


def _exit_now(code: int) -> None:
    """End the process at once. Only after a command whose every file is written and closed: the
    interpreter's teardown (unloading torch and transformers, freeing the parents' mappings) takes
    about 0.35 s here and does nothing the kernel does not do at exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
