"""`search demo`: build the tiny demo models (once), run a demo study (studies/demo.yaml), export the best."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.commands._common import positive_int
from search.study_config import SAMPLERS

SHIPPED = ("demo", "demo3", "demo-chain")  # demo studies `--study NAME` finds inside the package


def demo_study(name: str = "demo") -> Path:
    """A demo study that ships with the package (studies/<name>.yaml of a checkout, or of the wheel)."""
    try:
        from importlib.resources import files

        shipped = Path(str(files("search._studies") / f"{name}.yaml"))
        if shipped.is_file():
            return shipped
    except ModuleNotFoundError:  # a checkout used without installing the package data
        pass
    return Path(__file__).resolve().parents[2] / "studies" / f"{name}.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `demo` sub-command."""
    parser = sub.add_parser("demo", help="run the offline demo study end to end (minutes on a laptop CPU)")
    parser.add_argument("--study", help="study file, or the name of a shipped demo study: demo (default), demo3, "
                        "demo-chain")
    parser.add_argument("--n-trials", type=positive_int, help="override study.n_trials")
    parser.add_argument("--sampler", choices=SAMPLERS, help="override study.sampler")
    parser.add_argument("--seed", type=int, help="override study.seed")
    parser.add_argument("--storage", help="override the study's storage URL")
    parser.add_argument("--study-name", help="override study.name")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the parents with a progress bar, run the study, export the top configs."""
    import time

    import torch
    from rich.console import Console

    from search.commands._common import ensure_demo_parents
    from search.commands.export import export_trials
    from search.commands.start import run_study
    from search.study_config import load_study_file

    args.study = args.study or "demo"
    if args.study in SHIPPED and not Path(args.study).exists():
        args.study = str(demo_study(args.study))
    study_file = load_study_file(args.study)  # a broken study file fails before minutes of training
    # Models this small run fastest on one thread, and a busy laptop does not make it spin-wait.
    torch.set_num_threads(1)
    console = Console()
    start = time.perf_counter()
    ensure_demo_parents(study_file)
    study = run_study(study_file, storage=args.storage, study_name=args.study_name, n_trials=args.n_trials,
                      sampler=args.sampler, seed=args.seed, study_path=args.study)
    out = Path(study_file.export.dir or Path("runs") / study.study_name / "export")
    console.print(export_trials(study, study_file.export.top_k, out))
    # DARE-style masks depend on the seed; the exported YAML says it too
    seed = f" --random-seed {study_file.merge.random_seed}" if study_file.is_generic() else ""
    tool = "mergekit-multi" if study_file.is_generic() and _is_chain(study_file) else "mergekit-yaml"
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s; merge the best with: "
                  f"search merge {out}/01-*.yml OUT_DIR{seed}   (or {tool})")
    return 0


def _is_chain(study_file) -> bool:
    from search.space import space_of

    return hasattr(space_of(study_file), "stages")
