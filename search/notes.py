"""What optuna-dashboard shows of a study: trial YAML artifacts, the study's markdown note, saved figures."""

from __future__ import annotations

import logging
import re
import shlex
import tempfile
from pathlib import Path

import optuna

from merge_core.refs import mergekit_lora_flags
from search import results
from search.storage import is_journal, mask
from search.trial_record import LORA_MERGE_DTYPE, PARENTS, SLICE_LENGTHS, StudyRecord

log = logging.getLogger(__name__)


def artifact_dir(storage_url: str, study_name: str, runs_dir: Path = Path("runs")) -> Path:
    """Where a storage's artifacts live: <db file stem>-artifacts next to a file storage, else runs/<db>-artifacts."""
    if storage_url.startswith("sqlite:///") or is_journal(storage_url):
        path = Path(storage_url.removeprefix("sqlite:///").removeprefix("journal:"))
        if path.name and str(path) != ":memory:":
            return path.with_name(f"{path.stem}-artifacts")
    # A database server has no folder of its own: name the folder after the database (one per storage).
    database = re.sub(r"[^\w.-]", "_", storage_url.rsplit("/", 1)[-1].split("?")[0]) or study_name
    return runs_dir / f"{database}-artifacts"


def artifact_store(storage_url: str, study_name: str) -> optuna.artifacts.FileSystemArtifactStore:
    """The study's artifact store, its folder created if missing."""
    folder = artifact_dir(storage_url, study_name)
    folder.mkdir(parents=True, exist_ok=True)
    return optuna.artifacts.FileSystemArtifactStore(str(folder))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _delta(new: float | None, old: float | None) -> str:
    return "-" if new is None or old is None else f"{new - old:+.4f}"


def score_rows(study: optuna.Study) -> list[dict]:
    """Baseline and best per task (and weighted) on search and held-out items; [] before both exist."""
    base, best = results.baseline_trial(study), results.final_pick(study)
    if base is None or best is None:
        return []
    hb, hx = base.holdout, best.holdout
    tasks = StudyRecord.of(study).task_names or list(base.task_scores)
    rows = [{"task": name, "base": base.task_scores.get(name), "best": best.task_scores.get(name),
             "base_held": _held_task(hb, name), "best_held": _held_task(hx, name)}
            for name in tasks]
    rows.append({"task": "weighted", "base": base.score, "best": best.score,
                 "base_held": hb.score if hb else None, "best_held": hx.score if hx else None})
    return rows


def _held_task(held, name: str) -> float | None:
    return (held.task_scores or {}).get(name) if held is not None else None


def reproduce_commands(study: optuna.Study, trial_number: int, study_path: str | None = None,
                       storage_url: str | None = None, export_dir: str | None = None) -> str:
    """Shell lines that write the best trial's mergekit YAML and build the model from it."""
    q = shlex.quote
    name = study.study_name
    where = q(study_path) if study_path else f"--storage {q(mask(storage_url or '<URL>'))} --study-name {q(name)}"
    folder = (export_dir or f"runs/{name}/export").rstrip("/")
    config = q(f"{folder}/01-trial{trial_number}.yml")
    dtype = study.user_attrs.get(LORA_MERGE_DTYPE)  # what the study applied adapters in, not this process
    lora = mergekit_lora_flags([p["model"] for p in study.user_attrs.get(PARENTS) or []], dtype)
    ours = f" --lora-merge-dtype {dtype}" if lora and dtype else ""
    return (f"search export {where} --top 1 --out {q(folder)}\n"
            f"mergekit-yaml {config} ./merged-trial{trial_number}{lora}\n"
            f"# or the same merge without mergekit:\n"
            f"search merge {config} ./merged-trial{trial_number}{ours}")


def note_markdown(study: optuna.Study, reproduce: str | None = None, last_trial: int | None = None) -> str:
    """The study note: counts, baseline against best per task, the best recipe and how to rebuild it."""
    counts = results.counts(study)
    base, best = results.baseline_trial(study), results.final_pick(study)
    lines = [f"## merge-search: {study.study_name}", ""]
    names = ", ".join(study.metric_names or ["weighted score"])
    status = f"{counts['n_complete']} complete, {counts['n_pruned']} pruned, {counts['n_failed']} failed"
    updated = "" if last_trial is None else f"; updated after trial {last_trial}"
    lines += [f"**{status}**; objective: {names}{updated}.", ""]
    if best is None:
        lines.append("No fully scored trial yet.")
        return "\n".join(lines) + "\n"
    held = best.holdout
    head = f"Best: **trial {best.number}**, weighted score {best.score:.4f} on search items"
    if base is not None:
        gain = best.score - base.score
        head += f" ({gain:+.4f} against the baseline, trial {base.number})"
    if held is not None:
        head += f", {held.score:.4f} on held-out items"
    lines += [head + ".", ""]
    rows = score_rows(study)
    if rows:
        lines += ["| task | baseline search | best search | change | baseline held-out | best held-out | change |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            task = f"**{r['task']}**" if r["task"] == "weighted" else r["task"]
            search = f"{_fmt(r['base'])} | {_fmt(r['best'])} | {_delta(r['best'], r['base'])}"
            held_out = f"{_fmt(r['base_held'])} | {_fmt(r['best_held'])} | {_delta(r['best_held'], r['base_held'])}"
            lines.append(f"| {task} | {search} | {held_out} |")
        lines += ["", "Held-out items never steer the search or the pick, so a gain there is not fitted to them.", ""]
    lines += selection_markdown(study)
    if best.params:
        lines += ["### Best parameters", "", "| parameter | best | baseline |", "|---|---:|---:|"]
        base_params = base.params if base is not None else {}
        for name, value in best.params.items():
            lines.append(f"| `{name}` | {_param(value)} | {_param(base_params.get(name))} |")
        lines.append("")
    if reproduce:
        lines += ["### Rebuild the best merge", "", "```sh", reproduce, "```", ""]
        if optuna.artifacts.get_all_artifact_meta(best.trial, storage=study._storage):
            lines += [f"Trial {best.number} also carries its mergekit YAML as an artifact (trial page, Artifacts).", ""]
    lines += ["_Written by merge-search after each trial; edits here are overwritten._"]
    return "\n".join(lines) + "\n"


def selection_markdown(study: optuna.Study) -> list[str]:
    """The final pick and the paired held-out comparison with the baseline, as markdown lines."""
    from search.selection import comparison_table, gap_sentence, how_picked, verdict
    from search.trial_record import selection_of

    chosen = selection_of(study)
    if chosen is None:
        return ["_No final pick yet: `search start` makes it when the trials are done._", ""]
    lines = [f"### Final pick: {how_picked(chosen)}", ""]
    header, cells = comparison_table(chosen)
    if cells:
        lines += ["| " + " | ".join(["held-out", *header[1:]]) + " |", "|---|---:|---:|---:|---|---:|---|"]
        for row in cells:
            name = f"**{row[0]}**" if row[0] == "weighted" else row[0]
            lines.append("| " + " | ".join([name, *row[1:]]) + " |")
        lines.append("")
    lines += [f"**{verdict(chosen)}**", ""]
    gap = gap_sentence(chosen)
    if gap:
        lines += [gap[0].upper() + gap[1:] + ".", ""]
    return lines


def _param(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def save_figures(study: optuna.Study, slices: list[int] | None = None) -> None:
    """Store the study's figures for optuna-dashboard (same ids each time, so they are replaced)."""
    from optuna_dashboard import save_plotly_graph_object

    from search import figures

    for name, fig in figures.all_figures(study, slices).items():
        save_plotly_graph_object(study, fig, graph_object_id=name)


class StudyNotes:
    """Keeps a study's dashboard view current from the trial loop; never lets a failure reach the study."""

    def __init__(self, storage_url: str, study_path: str | None = None, export_dir: str | None = None,
                 slices: list[int] | None = None):
        self.storage_url = storage_url
        self.study_path = study_path
        self.export_dir = export_dir
        self.slices = slices  # layers per slice of the merge: the figures draw gradients per layer

    def attach_yaml(self, trial: optuna.Trial, mergekit_yaml: str) -> None:
        """Upload a running trial's mergekit YAML as its artifact (Optuna refuses it once the trial is finished)."""
        try:
            store = artifact_store(self.storage_url, trial.study.study_name)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"trial{trial.number}-mergekit.yml"
                path.write_text(mergekit_yaml)
                optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial,
                                                 mimetype="text/plain")
        except Exception:
            log.warning("merge-search: could not attach the mergekit YAML of trial %s", trial.number, exc_info=True)

    def update(self, study: optuna.Study, last_trial: int | None = None, figures: bool = True) -> None:
        """Rewrite the note, and the figures when asked."""
        from optuna_dashboard import save_note

        best = results.final_pick(study)
        reproduce = None
        if best is not None:
            reproduce = reproduce_commands(study, best.number, self.study_path, self.storage_url, self.export_dir)
        save_note(study, note_markdown(study, reproduce, last_trial))
        if figures:
            if self.slices and StudyRecord.of(study).slice_lengths != self.slices:
                study.set_user_attr(SLICE_LENGTHS, self.slices)  # for `search report` and the dashboard
            save_figures(study, self.slices)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna callback: the note after every trial (cheap), the figures when the trial is a new best."""
        try:
            best = results.best_trial(study)
            self.update(study, trial.number, figures=best is not None and best.number == trial.number)
        except Exception:
            log.warning("merge-search: could not update the dashboard note after trial %s", trial.number,
                        exc_info=True)

    def finish(self, study: optuna.Study) -> None:
        """At the end of a run (after late held-out scores): the note and every figure."""
        try:
            self.update(study)
        except Exception:
            log.warning("merge-search: could not update the dashboard note and figures", exc_info=True)
