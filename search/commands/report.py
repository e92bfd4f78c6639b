"""`search report`: the study's figures as one self-contained HTML page (works offline) plus PNG images."""

from __future__ import annotations

import argparse
import html
from pathlib import Path

from search.commands._common import add_study_arguments, load_existing, locate, positive_int

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; }
.figure { margin: 2em 0; }
.muted { color: #666; font-size: 0.9em; }
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `report` sub-command."""
    parser = sub.add_parser("report", help="write the study's figures as an offline HTML page and PNG images")
    add_study_arguments(parser)
    parser.add_argument("--out", help="folder (default runs/NAME/report)")
    parser.add_argument("--layers", type=positive_int,
                        help="layer count for the gradient figure when the study did not record its slices")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build every figure, draw its PNG, write index.html, list what was written."""
    from rich.console import Console
    from rich.table import Table

    from search import figures
    from search.errors import StudyError
    from search.progress import progress_bar

    study_file, storage, name = locate(args)
    study = load_existing(storage, name)
    out = Path(args.out or Path("runs") / name / "report")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as exc:
        raise StudyError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    figs = figures.all_figures(study, [args.layers] if args.layers else None)
    index = out / "index.html"
    written = [index]
    try:
        with progress_bar(transient=True) as bar:
            task = bar.add_task("drawing figures", total=len(figs))
            for fig_id, fig in figs.items():
                written.append(figures.save_png(fig, out / f"{fig_id}.png"))
                bar.advance(task)
        export_dir = study_file.export.dir if study_file else None
        index.write_text(render_html(study, figs, args.study_file, storage, export_dir), encoding="utf-8")
    except OSError as exc:  # e.g. the disk filled up part way
        raise StudyError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    table = Table(title=f"report of study {name}")
    table.add_column("file")
    for path in written:
        table.add_row(str(path))
    Console().print(table)
    return 0


def render_html(study, figs: dict, study_path: str | None = None, storage_url: str | None = None,
                export_dir: str | None = None) -> str:
    """One HTML page: summary table, best recipe, how to rebuild it, and every figure with plotly.js inline."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    from search import results
    from search.notes import reproduce_commands, score_rows
    from search.selection import comparison_table, gap_sentence, how_picked, verdict
    from search.trial_record import selection_of

    esc = html.escape
    counts = results.counts(study)
    best = results.final_pick(study)
    parts = [f"<h1>merge-search report: {esc(study.study_name)}</h1>",
             f"<p>{counts['n_complete']} complete, {counts['n_pruned']} pruned, {counts['n_failed']} failed trials; "
             f"objective: {esc(', '.join(study.metric_names or ['weighted score']))}.</p>"]
    rows = score_rows(study)
    if rows:
        base = results.baseline_trial(study)
        parts.append(f"<h2>Baseline (trial {base.number}) against best (trial {best.number})</h2><table>"
                     "<tr><th>task</th><th>baseline search</th><th>best search</th><th>baseline held-out</th>"
                     "<th>best held-out</th></tr>")
        for r in rows:
            cells = "".join(f"<td>{'-' if r[k] is None else f'{r[k]:.4f}'}</td>"
                            for k in ("base", "best", "base_held", "best_held"))
            parts.append(f"<tr><td>{esc(r['task'])}</td>{cells}</tr>")
        parts.append("</table><p class='muted'>Held-out items never steer the search or the pick.</p>")
    chosen = selection_of(study)
    if chosen is not None:
        parts.append(f"<h2>Is the gain real?</h2><p>Final pick: {esc(how_picked(chosen))}.</p>")
        header, cells = comparison_table(chosen)
        if cells:
            parts.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in ["held-out", *header[1:]]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in cells]
            parts.append("</table>")
        parts.append(f"<p><b>{esc(verdict(chosen))}</b></p>")
        gap = gap_sentence(chosen)
        if gap:
            parts.append(f"<p class='muted'>{esc(gap)}</p>")
    if best is not None:
        parts += ["<h2>Rebuild the best merge</h2>",
                  f"<pre>{esc(reproduce_commands(study, best.number, study_path, storage_url, export_dir))}</pre>",
                  f"<details><summary>mergekit YAML of trial {best.number}</summary>"
                  f"<pre>{esc(best.mergekit_yaml or '')}</pre></details>"]
    for fig_id, fig in figs.items():
        div = pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=fig_id,
                          config={"displaylogo": False, "responsive": True})
        parts.append(f"<div class='figure'>{div}<p class='muted'><a href='{fig_id}.png'>{fig_id}.png</a></p></div>")
    body = "\n".join(parts)
    # plotly.js inline rather than from a CDN: the page must open on a machine without internet.
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>merge-search: {esc(study.study_name)}</title>"
            f"<style>{STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script></head>"
            f"<body>\n{body}\n</body></html>\n")
