"""`search demo`: build the two tiny demo parents (once), run studies/demo.yaml, export the best."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.commands._common import positive_int
from search.study_config import SAMPLERS

DEMO_STUDY = Path("studies/demo.yaml")
DEMO_MODELS = Path("runs/demo-models")  # where studies/demo.yaml expects the parents


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `demo` sub-command."""
    parser = sub.add_parser("demo", help="run the offline demo study end to end (minutes on a laptop CPU)")
    parser.add_argument("--study", default=str(DEMO_STUDY), help=f"study file (default {DEMO_STUDY})")
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

    from search.commands.export import export_trials
    from search.commands.start import run_study
    from search.demo_models import build_demo_models
    from search.progress import progress_bar
    from search.study_config import load_study_file

    study_file = load_study_file(args.study)  # a broken study file fails before minutes of training
    # Models this small run fastest on one thread, and a busy laptop does not make it spin-wait.
    torch.set_num_threads(1)
    console = Console()
    start = time.perf_counter()
    with progress_bar(transient=True) as bar:
        tasks: dict[str, int] = {}

        def on_step(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        paths = build_demo_models(DEMO_MODELS, progress=on_step)
    console.print(f"demo parents ready in {paths['parent_a'].parent} ({time.perf_counter() - start:.0f} s)")
    study = run_study(study_file, storage=args.storage, study_name=args.study_name, n_trials=args.n_trials,
                      sampler=args.sampler, seed=args.seed, study_path=args.study)
    out = Path(study_file.export.dir or Path("runs") / study.study_name / "export")
    console.print(export_trials(study, study_file.export.top_k, out))
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s; merge the best with: "
                  f"search merge {out}/01-*.yml OUT_DIR   (or mergekit-yaml)")
    return 0
