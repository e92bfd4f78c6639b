"""`search export`: the best configs as mergekit YAML files, best first."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.commands._common import add_study_arguments, load_existing, locate, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `export` sub-command."""
    parser = sub.add_parser("export", help="write the top trials as mergekit YAML")
    add_study_arguments(parser)
    parser.add_argument("--top", type=positive_int, help="how many trials (default: the study file's export.top_k)")
    parser.add_argument("--out", help="folder (default: the study file's export.dir or runs/NAME/export)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write one YAML per exported trial and print where."""
    from rich.console import Console

    study_file, storage, name = locate(args)
    study = load_existing(storage, name)
    top = args.top or (study_file.export.top_k if study_file else 3)
    out = Path(args.out or (study_file and study_file.export.dir) or Path("runs") / name / "export")
    Console().print(export_trials(study, top, out))
    return 0


def export_trials(study, top: int, out: Path):
    """Write the final pick's and the top trials' mergekit YAML into `out`, pick first; returns a rich table."""
    from rich.table import Table

    from search import results
    from search.errors import StudyError

    pick = results.final_pick(study)  # the selection's winner comes first, then the best search scores
    trials = ([pick] if pick else []) + [r for r in results.ranked(study) if pick is None or r.number != pick.number]
    trials = trials[:top]
    if not trials:
        raise StudyError(f"study {study.study_name!r} has no fully scored trial to export yet")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudyError(f"--out {out}: cannot create ({exc.strerror or exc})") from None
    table = Table(title=f"exported to {out}")
    for col in ("rank", "trial", "score", "held-out", "file"):
        table.add_column(col)
    for rank, trial in enumerate(trials, 1):
        path = out / f"{rank:02d}-trial{trial.number}.yml"
        tag = " (baseline)" if trial.baseline else ""
        header = f"# merge-search study {study.study_name}, trial {trial.number}{tag}: "
        header += f"score {trial.score:.4f}\n"
        path.write_text(header + trial.mergekit_yaml)
        held = trial.holdout
        table.add_row(str(rank), f"{trial.number}{tag}", f"{trial.score:.4f}",
                      "-" if held is None else f"{held.score:.4f}", str(path))
    return table
