"""Rich tables for the terminal: the dry-run plan and the baseline-against-best table."""

from __future__ import annotations

import optuna
from rich.console import Console
from rich.table import Table

from search import results
from search.space import space_of


def print_plan(study_file, options, storage_shown: str, console: Console | None = None) -> None:
    """What `search start --dry-run` shows: models, parameters, tasks, items per trial."""
    console = console or Console()
    console.print(f"[bold]study[/] {options.study_name}  storage {storage_shown}  sampler {options.sampler} "
                  f"(seed {options.seed})  n_trials {options.n_trials}  device {options.device}")
    merge = study_file.merge
    space = space_of(study_file)
    params = Table(title="search space")
    for col in ("parameter", "low", "high"):
        params.add_column(col)
    if study_file.is_generic():
        space.params_of(space.baseline)  # the config must be a point of the space: say so before any load
        stages = getattr(space, "stages", None)
        spaces = space.spaces.values() if stages else [space]
        for i, sub in enumerate(spaces):
            config = sub.config
            label = f"stage {stages[i].name or 'final'}: " if stages else ""
            models = ", ".join(f"{sub.aliases[m]}={m}" for m in config.model_names())
            console.print(f"[bold]merge[/] {label}{config.merge_method}  base {config.base_model or '(none)'}  "
                          f"models {models}  dtype {config.dtype or '(as stored)'}  random seed {merge.random_seed}",
                          soft_wrap=True)
    else:
        other = next(m for m in merge.models if m != merge.base_model)
        layers = f"layers {list(merge.layer_range)}" if merge.layer_range else (
            f"{len(merge.slices)} slices" if merge.slices else "all layers")
        console.print(f"[bold]merge[/] slerp  v0 (base) {merge.base_model}  v1 {other}  {layers}  {merge.dtype}")
    for name, dist in space.distributions().items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            params.add_row(name, "choices", ", ".join(str(c) for c in dist.choices))
        else:
            params.add_row(name, f"{dist.low:g}", f"{dist.high:g}")
    if not study_file.is_generic():
        for name, entry in study_file.search_space.items():
            if entry.value is not None:
                params.add_row(f"t.{name}", "fixed", str(entry.value))
    console.print(params)
    tasks = Table(title="objectives")
    for col in ("task", "weight", "metric", "shots", "search items", "validation items", "held-out items"):
        tasks.add_column(col)
    for t in study_file.objectives.tasks:
        tasks.add_row(t.name, f"{t.weight:g}", t.metric or "(task default)",
                      "default" if t.num_fewshot is None else str(t.num_fewshot),
                      "all" if t.search_items is None else f"{t.search_items} ({t.subset})", str(t.validation_items),
                      str(t.holdout_items))
    console.print(tasks)
    per_trial = [t.search_items for t in study_file.objectives.tasks]
    total = "all items" if None in per_trial else f"{sum(per_trial)} items"
    console.print(f"each trial: one in-memory merge + {total}; pruner {study_file.pruner.type}")
    pick = study_file.selection
    if any(t.validation_items for t in study_file.objectives.tasks):
        console.print(f"final pick: the best validation score among the top {pick.top_k} by search score; "
                      f"reported against the baseline on held-out items (paired, alpha {pick.alpha:g})")
    else:
        console.print("final pick: the best search score (no validation_items: give some to pick on items the "
                      "search did not see); reported against the baseline on held-out items")


def print_final_table(study: optuna.Study, console: Console) -> None:
    """Baseline and best, per task, on search items and on held-out items."""
    base, best = results.baseline_trial(study), results.final_pick(study)
    counts = results.counts(study)
    console.print(f"study {study.study_name}: {counts['n_complete']} complete, {counts['n_pruned']} pruned, "
                  f"{counts['n_failed']} failed")
    if base is None or best is None:
        console.print("no fully scored trial yet")
        return
    table = Table(title=f"baseline (trial {base.number}) against best (trial {best.number})")
    for col in ("task", "baseline search", "best search", "baseline held-out", "best held-out"):
        table.add_column(col, justify="right" if col != "task" else "left")
    hb, hx = base.holdout, best.holdout
    for name in base.task_scores:
        table.add_row(name, _fmt(base.task_scores.get(name)), _fmt(best.task_scores.get(name)),
                      _fmt(_held_task(hb, name)), _fmt(_held_task(hx, name)))
    table.add_row("[bold]weighted", _fmt(base.score), _fmt(best.score),
                  _fmt(hb.score if hb else None), _fmt(hx.score if hx else None))
    console.print(table)
    print_selection(study, console)


def print_selection(study: optuna.Study, console: Console) -> None:
    """How the final pick was made and whether its held-out gain over the baseline is significant."""
    from search.selection import comparison_rows, comparison_table, gap_sentence, how_picked, verdict
    from search.trial_record import selection_of

    chosen = selection_of(study)
    if chosen is None:
        console.print("no final pick yet: `search start` makes it when the trials are done")
        return
    console.print(f"final pick: {how_picked(chosen)}")
    rows = comparison_rows(chosen)
    if rows:
        header, cells = comparison_table(chosen)
        table = Table(title=f"held-out: final pick (trial {chosen['winner']}) - baseline (trial {chosen['baseline']})")
        for col in header[:-1]:  # the test column goes to the footnote: the table fits 80 columns
            table.add_column(col, justify="left" if col == "task" else "right")
        for row in cells:
            table.add_row(f"[bold]{row[0]}" if row[0] == "weighted" else row[0], *row[1:-1])
        console.print(table)
        tests = ", ".join(f"{name}: {test}" for test, name in
                          {r.test: ", ".join(x.name for x in rows if x.test == r.test) for r in rows}.items())
        console.print(f"paired over {rows[-1].n_items} held-out items; p-values from {tests}; n.s. = not "
                      f"significant at alpha {chosen['alpha']:g}", style="dim")
    console.print(verdict(chosen))
    gap = gap_sentence(chosen)
    if gap:
        console.print(gap)


def _held_task(held, name: str) -> float | None:
    return (held.task_scores or {}).get(name) if held is not None else None


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
