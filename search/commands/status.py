"""`search status`: counts, baseline and best of a study, as a table or one JSON object."""

from __future__ import annotations

import argparse
import json

from search.commands._common import add_study_arguments, load_existing, locate


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `status` sub-command."""
    parser = sub.add_parser("status", help="show a study's progress, baseline and best")
    add_study_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the status of an existing study."""
    from rich.console import Console

    from search import results
    from search.report_text import print_final_table

    _, storage, name = locate(args)
    study = load_existing(storage, name)
    if args.json:
        print(json.dumps(results.status(study)))
    else:
        print_final_table(study, Console())
    return 0
