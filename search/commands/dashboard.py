"""`search dashboard`: optuna-dashboard on the study's storage, with its artifact store."""

from __future__ import annotations

import argparse

from search.commands._common import add_study_arguments, load_existing, locate, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `dashboard` sub-command."""
    parser = sub.add_parser("dashboard", help="open optuna-dashboard on the study")
    add_study_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=positive_int, default=8080, help="port to listen on (default 8080)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve the dashboard until interrupted."""
    from optuna_dashboard import get_note, run_server

    from search.errors import StudyError
    from search.notes import StudyNotes, artifact_dir, artifact_store
    from search.progress import console
    from search.storage import mask, open_storage

    _, storage, name = locate(args)
    study = load_existing(storage, name)
    if not get_note(study):  # a study run before notes existed: give it its note and figures once
        StudyNotes(storage).finish(study)
    backend = open_storage(storage)
    store = artifact_store(storage, name)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{host}:{args.port}/dashboard/studies/{backend.get_study_id_from_name(name)}"
    console.print(f"optuna-dashboard for study {name} ({mask(storage)}, artifacts in {artifact_dir(storage, name)})",
                  soft_wrap=True)
    console.print(f"open {url}  (Ctrl-C to stop)", soft_wrap=True)
    try:
        run_server(backend, host=args.host, port=args.port, artifact_store=store)
    except OSError as exc:  # the port is taken or the address is not ours: nothing was served yet
        raise StudyError(f"--host {args.host} --port {args.port}: cannot listen ({exc.strerror or exc})") from None
    return 0
