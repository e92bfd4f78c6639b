"""Figures of a study as plotly objects (dashboard, HTML report) and as PNG files drawn with matplotlib."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from merge_core.gradient import interpolate, position
from search import results
from search.trial_record import StudyRecord, TrialRecord

BASELINE_COLOR = "#555555"
BEST_COLOR = "#1f77b4"
HELD_OUT_COLOR = "#d62728"
PRUNED_COLOR = "#bbbbbb"
TRIAL_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
TEMPLATE = "plotly_white"
T_AXIS = "t (0 = base model, 1 = other model)"
PANELS_PER_ROW = 4


def _message(title: str, text: str) -> go.Figure:
    """A figure that says why there is nothing to plot yet."""
    fig = go.Figure()
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 16})
    fig.update_layout(title=title, template=TEMPLATE, xaxis={"visible": False}, yaxis={"visible": False},
                      height=300)
    return fig


class Blocks(list):
    """Per-block values (`blocks: B` items, Optuna names ending `.b<i>`): constant over each block of layers."""


def searched_curves(trial: TrialRecord | optuna.trial.FrozenTrial) -> dict[str, list[float]]:
    """Each searched gradient of a trial by name (`t.mlp`, `weight.child_1.default`): its anchors in order.

    Per-block values come as a Blocks list (one value per block, in layer order).
    """
    curves: dict[str, list[float]] = {}
    for name, value in trial.params.items():
        prefix, _, index = name.rpartition(".")
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue  # a categorical switch, not a curve
        if prefix and index.isdigit():
            curves.setdefault(prefix, []).append(float(value))
        elif prefix and index[:1] == "b" and index[1:].isdigit():
            curves.setdefault(prefix, Blocks()).append(float(value))
    return curves


def t_curve(value: float | list[float], slices: list[int] | None) -> tuple[list[float], list[float]]:
    """(x, value) of one gradient: per output layer when slices are known, else anchors over depth 0..1."""
    if isinstance(value, Blocks):
        return _block_curve(value, sum(slices) if slices else None)
    anchors = [float(v) for v in value] if isinstance(value, list) else [float(value)]
    if slices is None:
        if len(anchors) == 1:
            return [0.0, 1.0], anchors * 2
        return [i / (len(anchors) - 1) for i in range(len(anchors))], anchors
    xs, ts = [], []
    for n in slices:  # each slice restarts the gradient, as mergekit does
        for i in range(n):
            xs.append(len(xs))
            ts.append(interpolate(anchors, position(i, n)))
    return xs, ts


def _block_curve(values: list[float], layers: int | None) -> tuple[list[float], list[float]]:
    """Steps: block i holds layers [i*L//B, (i+1)*L//B) (search/config_space.py cuts them so)."""
    n = len(values)
    if layers is None:  # unknown depth: each block over its share of 0..1
        xs = [x for i in range(n) for x in (i / n, (i + 1) / n)]
        return xs, [v for v in values for _ in range(2)]
    xs, ys = [], []
    for i, v in enumerate(values):
        for layer in range(i * layers // n, (i + 1) * layers // n):
            xs.append(layer)
            ys.append(v)
    return xs, ys


def _panel_title(name: str) -> str:
    return name.removesuffix(".default") + (" (all other tensors)" if name.endswith(".default") else "")


def gradient_figure(study: optuna.Study, slices: list[int] | None = None) -> go.Figure:
    """Every searched gradient across the layers: best trial (solid) against the baseline (dashed)."""
    title = "searched values across the layers"
    best, base = results.final_pick(study), results.baseline_trial(study)
    if best is None:
        return _message(title, "no fully scored trial yet")
    best_curves = searched_curves(best)
    if not best_curves:
        return _message(title, "the study searches no numeric gradient")
    if all(n.startswith("t.") for n in best_curves):
        title = "t across the layers"
    slices = slices or StudyRecord.of(study).slice_lengths
    base_curves = searched_curves(base) if base is not None else {}
    names = list(best_curves)
    cols = min(len(names), PANELS_PER_ROW)  # many searched gradients wrap onto rows of four
    rows = math.ceil(len(names) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[_panel_title(n) for n in names],
                        shared_yaxes=True, horizontal_spacing=0.04 if cols > 3 else 0.06,
                        vertical_spacing=min(0.3, 0.6 / rows))
    mode, shown = "lines+markers", [0.0, 1.0]
    for index, name in enumerate(names):
        row, col = index // cols + 1, index % cols + 1
        first = index == 0
        if name in base_curves:
            x, t = t_curve(base_curves[name], slices)
            shown += t
            label = "baseline" + (f" (trial {base.number})" if base is not None else "")
            fig.add_trace(go.Scatter(x=x, y=t, mode=mode, name=label, legendgroup="baseline", showlegend=first,
                                     line={"color": BASELINE_COLOR, "dash": "dash"},
                                     marker={"color": BASELINE_COLOR, "size": 5, "symbol": "circle"}), row, col)
        x, t = t_curve(best_curves[name], slices)
        shown += t
        fig.add_trace(go.Scatter(x=x, y=t, mode=mode, name=f"best (trial {best.number})", legendgroup="best",
                                 showlegend=first, line={"color": BEST_COLOR, "width": 3},
                                 marker={"color": BEST_COLOR, "size": 6, "symbol": "circle"}), row, col)
        x_title = "layer" if slices is not None else "relative depth (0 = first layer, 1 = last)"
        fig.update_xaxes(title_text=x_title if row == rows else None, row=row, col=col)
        if slices is not None:
            fig.update_xaxes(dtick=max(1, round(sum(slices) / 4)), row=row, col=col)
    fig.update_yaxes(title_text=T_AXIS if title.startswith("t ") else "value", row=1, col=1)
    fig.update_yaxes(range=[min(shown) - 0.03, max(shown) + 0.03])
    score = f"best trial {best.number} ({best.score:.4f})"
    if base is not None:
        score += f" against baseline ({base.score:.4f})"
    fig.update_layout(title=f"{title}: {score}", template=TEMPLATE, height=120 + 300 * rows,
                      legend={"orientation": "h", "x": 0, "y": -0.22 / rows})
    return fig


def history_figure(study: optuna.Study) -> go.Figure:
    """Weighted search score per trial, best so far, held-out scores of new bests, baseline as lines."""
    title = "optimisation history"
    scored = results.scored(study)
    if not scored:
        return _message(title, "no fully scored trial yet")
    scored = sorted(scored, key=lambda t: t.number)
    base = results.baseline_trial(study)
    fig = go.Figure()
    pruned = [r for r in results.records(study, (optuna.trial.TrialState.COMPLETE,))
              if r.pruned and r.values and len(r.values) == 1]
    if pruned:
        fig.add_trace(go.Scatter(x=[t.number for t in pruned], y=[t.values[0] for t in pruned], mode="markers",
                                 name="pruned (estimated score)",
                                 marker={"color": PRUNED_COLOR, "symbol": "x", "size": 7}))
    fig.add_trace(go.Scatter(x=[t.number for t in scored], y=[t.score for t in scored],
                             mode="markers", name="trial (search items)",
                             marker={"color": BEST_COLOR, "size": 7, "symbol": "circle"}))
    running, xs, ys = -math.inf, [], []
    for t in scored:
        running = max(running, t.score)
        xs.append(t.number)
        ys.append(running)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="best so far", line={"color": BEST_COLOR, "shape": "hv"}))
    held = [t for t in scored if t.holdout is not None]
    if held:
        fig.add_trace(go.Scatter(x=[t.number for t in held], y=[t.holdout.score for t in held], mode="markers",
                                 name="held-out items (baseline and each scored best or pick)",
                                 marker={"color": HELD_OUT_COLOR, "symbol": "diamond", "size": 9}))
    last = max([t.number for t in scored] + [t.number for t in pruned])
    if base is not None:
        score = base.score
        fig.add_trace(go.Scatter(x=[0, last], y=[score, score], mode="lines", name=f"baseline search ({score:.4f})",
                                 line={"color": BASELINE_COLOR, "dash": "dash"}))
        if base.holdout is not None:
            score = base.holdout.score
            fig.add_trace(go.Scatter(x=[0, last], y=[score, score], mode="lines",
                                     name=f"baseline held-out ({score:.4f})",
                                     line={"color": HELD_OUT_COLOR, "dash": "dot"}))
    fig.update_layout(title=title, template=TEMPLATE, height=420, xaxis={"title": "trial", "tickformat": "d"},
                      yaxis_title="weighted score", legend={"orientation": "h", "x": 0, "y": -0.22})
    return fig


def task_scores_figure(study: optuna.Study, top: int = 5) -> go.Figure:
    """Per-task search scores of the baseline and the top trials, as grouped bars."""
    title = "per-task scores: baseline and top trials"
    base = results.baseline_trial(study)
    best = results.best_trial(study)
    trials = [t for t in results.ranked(study) if base is None or t.number != base.number][:top]
    if base is not None:
        trials = [base, *trials]
    if not trials:
        return _message(title, "no fully scored trial yet")
    tasks = StudyRecord.of(study).task_names or list(trials[0].task_scores)
    categories = [*tasks, "weighted"]
    fig = go.Figure()
    for i, t in enumerate(trials):
        is_base = base is not None and t.number == base.number
        values = [t.task_scores.get(name) for name in tasks] + [t.score]
        label = f"baseline (trial {t.number})" if is_base else f"trial {t.number}"
        if best is not None and t.number == best.number:
            label += " (best)"
        color = BASELINE_COLOR if is_base else TRIAL_COLORS[(i - (base is not None)) % len(TRIAL_COLORS)]
        fig.add_trace(go.Bar(x=categories, y=values, name=label, marker={"color": color},
                             text=[f"{v:.3f}" if v is not None else "" for v in values], textposition="auto"))
    fig.update_layout(title=title, template=TEMPLATE, barmode="group", height=420, xaxis_title="task",
                      uniformtext={"minsize": 8, "mode": "hide"},
                      yaxis_title="score on search items", legend={"orientation": "h", "x": 0, "y": -0.22})
    return fig


def importance_figure(study: optuna.Study, min_trials: int = 5) -> go.Figure:
    """fANOVA importance of each anchor for the weighted search score; a message when too few trials."""
    title = "parameter importance"
    scored = [t for t in results.scored(study) if t.params]
    if len(scored) < min_trials:
        return _message(title, f"importance needs {min_trials} fully scored trials; {len(scored)} so far")
    # Pruned trials only carry a running mean: rank anchors on fully scored trials alone.
    only = optuna.create_study(directions=study.directions)
    only.add_trials([r.trial for r in scored])
    try:
        importances = optuna.importance.get_param_importances(
            only, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            target=lambda t: TrialRecord.of(t).score)
    except (RuntimeError, ValueError) as exc:  # e.g. every trial scored the same
        return _message(title, f"importance unavailable: {exc}")
    if not importances or not all(math.isfinite(v) for v in importances.values()):
        return _message(title, "importance unavailable: the scores do not vary yet")
    importances = {n: float(v) for n, v in importances.items()}
    names = sorted(importances, key=importances.get)  # least first: plotted bottom-up, most important on top
    top = max(importances.values()) or 1.0
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h", name="importance",
                           marker={"color": BEST_COLOR}, text=[f"{importances[n]:.2f}" for n in names],
                           textposition="outside", cliponaxis=False))
    fig.update_layout(title=f"{title} (fANOVA over {len(scored)} fully scored trials)", template=TEMPLATE,
                      height=max(300, 60 + 28 * len(names)),
                      xaxis={"title": "share of weighted-score variance", "range": [0, 1.15 * top]},
                      yaxis_title="searched value (parameter.filter.index)", showlegend=False,
                      uniformtext={"minsize": 8, "mode": "hide"})
    return fig


FIGURES = {
    "t-gradient": gradient_figure,
    "history": history_figure,
    "task-scores": task_scores_figure,
    "importance": importance_figure,
}


def all_figures(study: optuna.Study, slices: list[int] | None = None) -> dict[str, go.Figure]:
    """Every figure of a study, by id (also the dashboard's graph-object id and the PNG's name)."""
    return {name: build(study, slices) if build is gradient_figure else build(study)
            for name, build in FIGURES.items()}


# --- PNG: matplotlib draws the plotly figure's own traces, so the images need no browser.

_DASH = {"dash": "--", "dot": ":", "dashdot": "-.", "longdash": "--", "solid": "-", None: "-"}
_SYMBOL = {"circle": "o", "x": "x", "diamond": "D", "square": "s", "cross": "P", None: "o"}


def _axis_keys(fig: go.Figure) -> list[tuple[str, str]]:
    """(xaxis, yaxis) layout keys of each subplot, left to right."""
    keys = sorted({(t.xaxis or "x", t.yaxis or "y") for t in fig.data}, key=lambda k: int(k[0][1:] or 1))
    return keys or [("x", "y")]


def _layout_axis(fig: go.Figure, ref: str):
    return fig.layout[("xaxis" if ref[0] == "x" else "yaxis") + ref[1:]]


def _draw_scatter(ax, trace) -> None:
    label = trace.name if trace.showlegend is not False else "_nolegend_"
    line, marker = trace.line, trace.marker
    color = (line.color if line and line.color else None) or (marker.color if marker else None)
    mode = trace.mode or "lines+markers"
    kwargs = {"color": color, "label": label}
    if "lines" in mode:
        kwargs.update(linestyle=_DASH.get(line.dash, "-"), linewidth=(line.width or 2) * 0.8)
        if line.shape == "hv":
            kwargs["drawstyle"] = "steps-post"
    else:
        kwargs["linestyle"] = "none"
    if "markers" in mode:
        kwargs.update(marker=_SYMBOL.get(marker.symbol, "o"), markersize=(marker.size or 6) * 0.8)
    ax.plot(list(trace.x), list(trace.y), **kwargs)


def _draw_bars(ax, bars: list) -> None:
    horizontal = bars[0].orientation == "h"
    categories = list(bars[0].y if horizontal else bars[0].x)
    width = 0.8 / len(bars)
    for k, bar in enumerate(bars):
        offset = (k - (len(bars) - 1) / 2) * width
        positions = [i + offset for i in range(len(categories))]
        values = [v if v is not None else 0 for v in (bar.x if horizontal else bar.y)]
        label = bar.name if bar.showlegend is not False else "_nolegend_"
        draw = ax.barh if horizontal else ax.bar
        patches = draw(positions, values, width, color=bar.marker.color, label=label)
        if bar.text is not None:
            ax.bar_label(patches, labels=list(bar.text), fontsize=7, padding=2)
    (ax.set_yticks if horizontal else ax.set_xticks)(range(len(categories)), categories)
    top = max((v or 0) for b in bars for v in (b.x if horizontal else b.y)) or 1.0
    (ax.set_xlim if horizontal else ax.set_ylim)(0, top * 1.15)  # room for the value labels


def save_png(fig: go.Figure, path: Path, width: int = 1200) -> Path:
    """Draw a figure of this module to a PNG with matplotlib (no browser, works offline)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, MultipleLocator

    keys = _axis_keys(fig)
    height = fig.layout.height or 420
    mfig = Figure(figsize=(width / 100, height / 100 + 0.6), dpi=110, layout="constrained")
    axes = mfig.subplots(1, len(keys), sharey=len(keys) > 1, squeeze=False)[0]
    for ax, (xref, yref) in zip(axes, keys, strict=True):
        traces = [t for t in fig.data if (t.xaxis or "x") == xref and (t.yaxis or "y") == yref]
        for trace in traces:
            if trace.type == "scatter":
                _draw_scatter(ax, trace)
        bars = [t for t in traces if t.type == "bar"]
        if bars:
            _draw_bars(ax, bars)
        xaxis, yaxis = _layout_axis(fig, xref), _layout_axis(fig, yref)
        if xaxis.title and xaxis.title.text:
            ax.set_xlabel(xaxis.title.text)
        if yaxis.title and yaxis.title.text:
            ax.set_ylabel(yaxis.title.text)
        if yaxis.range:
            ax.set_ylim(*yaxis.range)
        if xaxis.range:
            ax.set_xlim(*xaxis.range)
        if xaxis.dtick:
            ax.xaxis.set_major_locator(MultipleLocator(xaxis.dtick))
        elif xaxis.tickformat == "d":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if xaxis.visible is False:
            ax.set_axis_off()
        ax.grid(True, color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        domain = xaxis.domain or (0, 1)
        for note in fig.layout.annotations:  # subplot titles sit above their subplot's x domain
            if note.yref == "paper" and (note.y or 0) >= 1 and domain[0] <= (note.x or 0) <= domain[1]:
                ax.set_title(note.text, fontsize=10)
    for note in fig.layout.annotations:  # a message figure's text
        if note.yref == "paper" and (note.y or 0) < 1:
            mfig.text(note.x or 0.5, note.y or 0.5, note.text, ha="center", va="center", fontsize=13)
    if fig.layout.title and fig.layout.title.text:
        mfig.suptitle(fig.layout.title.text, fontsize=12)
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    if handles and fig.layout.showlegend is not False:
        mfig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), frameon=False)
    path = Path(path)
    mfig.savefig(path)
    return path
