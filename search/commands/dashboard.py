"""`search dashboard`: optuna-dashboard on the study's storage."""

from __future__ import annotations

import argparse

from search.commands._common import add_study_arguments, load_existing, locate, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `dashboard` sub-command."""
    parser = sub.add_parser("dashboard", help="open optuna-dashboard on the study")
    add_study_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=positive_int, default=8080)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve the dashboard until interrupted."""
    from optuna_dashboard import run_server

    from search.progress import console
    from search.storage import open_storage

    _, storage, name = locate(args)
    load_existing(storage, name)
    console.print(f"optuna-dashboard for study {name}: http://{args.host}:{args.port}/dashboard/ (Ctrl-C to stop)")
    run_server(open_storage(storage, heartbeat_interval=None), host=args.host, port=args.port)
    return 0
