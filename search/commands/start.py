"""`search start STUDY.yaml`: run or resume the study, then show baseline against best."""

from __future__ import annotations

import argparse

from search.commands._common import add_study_arguments, positive_float, positive_int
from search.study_config import SAMPLERS


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `start` sub-command."""
    parser = sub.add_parser("start", help="run (or resume) a merge search study")
    add_study_arguments(parser, file_required=True)
    parser.add_argument("--n-trials", type=positive_int, help="total finished trials wanted (counts earlier ones)")
    parser.add_argument("--timeout", type=positive_float, help="stop starting trials after S seconds")
    parser.add_argument("--sampler", choices=SAMPLERS, help="override study.sampler")
    parser.add_argument("--seed", type=int, help="override study.seed")
    parser.add_argument("--device", help="override merge.device (cpu, cuda, cuda:N)")
    parser.add_argument("--heartbeat", type=positive_int, default=30,
                        help="seconds between worker heartbeats (default 30); a silent worker's trial is "
                             "retried after two")
    parser.add_argument("--allow-changed-parents", action="store_true",
                        help="resume or join although a parent's files changed since the study started")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; load nothing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate, set up once, run the trials with a progress bar, print the final table."""
    from search.study_config import load_study_file

    study_file = load_study_file(args.study_file)
    run_study(study_file, storage=args.storage, study_name=args.study_name, n_trials=args.n_trials,
              timeout=args.timeout, sampler=args.sampler, seed=args.seed, device=args.device,
              heartbeat=args.heartbeat, dry_run=args.dry_run, study_path=args.study_file,
              allow_changed_parents=args.allow_changed_parents)
    return 0


def run_study(study_file, storage=None, study_name=None, n_trials=None, timeout=None, sampler=None, seed=None,
              device=None, heartbeat=30, dry_run=False, study_path=None, allow_changed_parents=False):
    """Run (or resume) a study with command-line overrides; returns the Optuna study (None on a dry run)."""
    from rich.console import Console

    from search import results
    from search.commands._common import ensure_demo_parents
    from search.devices import check_device
    from search.interrupts import SignalGuard
    from search.notes import StudyNotes
    from search.progress import progress_bar
    from search.report_text import print_final_table, print_plan
    from search.runner import Candidates, RunOptions, StudyPlan, StudyRunner, parents_on_disk
    from search.space import space_of
    from search.storage import check_url, default_storage, mask

    s = study_file.study
    storage = storage or s.storage
    if storage:
        check_url(storage)
    else:  # the default; its runs/ folder is made on a real start only
        storage = default_storage(s.name, create=not dry_run)
    options = RunOptions(storage=storage, study_name=study_name or s.name, n_trials=n_trials or s.n_trials,
                         timeout=timeout or s.timeout, sampler=sampler or s.sampler,
                         seed=s.seed if seed is None else seed, device=device or study_file.merge.device,
                         heartbeat=heartbeat, allow_changed_parents=allow_changed_parents)
    if dry_run:
        # the merge checks need only the parents' headers
        if study_file.is_generic() and parents_on_disk(space_of(study_file).parents()):
            StudyPlan(study_file)
        print_plan(study_file, options, mask(storage))
        return None
    options.device = check_device(options.device)
    ensure_demo_parents(study_file)
    with SignalGuard() as guard:  # Ctrl-C / SIGTERM: the trial in flight ends FAIL "interrupted", slot back
        with progress_bar(transient=True) as bar:
            task = bar.add_task("loading parents + geometry", total=None)
            candidates = Candidates(study_file, options.device,
                                    progress=lambda _, done, total: bar.update(task, completed=done, total=total))
        notes = StudyNotes(options.storage, study_path=study_path, export_dir=study_file.export.dir,
                           slices=candidates.plan.slice_lengths())
        runner = StudyRunner(study_file, options, candidates, notes=notes, guard=guard)
        study = runner.open_study()
        with progress_bar() as bar:
            task = bar.add_task(_trial_text(study), total=options.n_trials, completed=results.n_finished(study))

            def after_trial(study, _trial):
                bar.update(task, completed=results.n_finished(study), description=_trial_text(study))

            def on_wait(running: int):
                bar.update(task, description=f"waiting for {running} running trial(s) of other workers")

            runner.optimize(study, callbacks=[after_trial, notes.after_trial], on_wait=on_wait)
        with progress_bar(transient=True) as bar:
            bar.add_task("final pick: validation and held-out items", total=None)
            runner.finalize(study)
        notes.finish(study)
    print_final_table(study, Console())
    return study


def _trial_text(study) -> str:
    from search import results

    best, base = results.best_trial(study), results.baseline_trial(study)
    if best is None or base is None:
        return "trials"
    delta = best.score - base.score
    return f"trials  best {best.score:.3f} ({delta:+.3f} vs baseline)"
