"""Arguments and look-ups shared by the study commands (start, status, export, dashboard, report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.errors import StudyError


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_study_arguments(parser: argparse.ArgumentParser, file_required: bool = False) -> None:
    """STUDY.yaml, or --storage URL --study-name NAME."""
    parser.add_argument("study_file", nargs=None if file_required else "?", metavar="STUDY.yaml",
                        help="study file" + ("" if file_required else " (or give --storage and --study-name)"))
    parser.add_argument("--storage", help="Optuna storage URL (default: the study file's, or sqlite:///runs/NAME.db)")
    parser.add_argument("--study-name", help="study name (default: the study file's study.name)")


def locate(args: argparse.Namespace):
    """(study file or None, storage URL, study name) from the arguments."""
    from search.storage import check_url, default_storage
    from search.study_config import load_study_file

    study_file = load_study_file(args.study_file) if args.study_file else None
    name = args.study_name or (study_file.study.name if study_file else None)
    if name is None:
        raise StudyError("which study? give STUDY.yaml, or --storage URL and --study-name NAME")
    storage = args.storage or (study_file.study.storage if study_file else None)
    if storage is None:  # read-only commands: a missing runs/ is reported by load_existing, not made
        storage = default_storage(study_file.study.name if study_file else name, create=False)
    else:
        check_url(storage)
    return study_file, storage, name


def load_existing(storage: str, name: str):
    """An existing study, read-only use; never creates a database."""
    import optuna

    from search.storage import is_journal, mask, open_storage

    if storage.startswith("sqlite:///") or is_journal(storage):
        path = Path(storage.removeprefix("sqlite:///").removeprefix("journal:"))
        if not path.is_file():
            raise StudyError(f"no study storage at {path}; run `search start` first")
    backend = open_storage(storage)
    try:
        return optuna.load_study(study_name=name, storage=backend)
    except KeyError:
        known = [s.study_name for s in optuna.get_all_study_summaries(backend)]
        raise StudyError(f"no study named {name!r} in {mask(storage)} (found: {', '.join(known) or 'none'})") from None


def ensure_demo_parents(study_file) -> None:
    """Build the demo models a study reads (`demo:NAME`, or runs/demo3-models/...) on first use; cached."""
    from demos.models import ThreeRecipe
    from search.study_config import DEMO3_MODELS, DEMO_MODELS

    if study_file.is_generic():
        from search.space import space_of

        refs = [Path(m).resolve() for m in space_of(study_file).parents()]  # every stage's, for a chain
    else:
        refs = [Path(m) for m in study_file.merge.models or []]
    for folder, recipe in ((DEMO_MODELS, None), (DEMO3_MODELS, ThreeRecipe())):
        if any(ref.parent == folder.resolve() for ref in refs):
            _build_with_bar(folder, recipe)


def _build_with_bar(folder: Path, recipe) -> None:
    import time

    from demos.models import build_demo_models
    from search.progress import console, progress_bar

    start = time.perf_counter()
    built = []
    with progress_bar(transient=True) as bar:
        tasks: dict[str, int] = {}

        def on_step(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"demo models: {stage}", total=total)
            bar.update(tasks[stage], completed=done)
            built.append(stage)

        build_demo_models(folder, progress=on_step, recipe=recipe)
    if built:
        console.print(f"demo models built in {folder} ({time.perf_counter() - start:.0f} s); reused from now on")
