"""Metrics computed by lm-eval's own task objects: filters, process_results, aggregations, groups."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from objectives.errors import TaskInputError

if TYPE_CHECKING:
    from lm_eval.api.group import Group
    from lm_eval.api.instance import Instance
    from lm_eval.api.task import Task

    from objectives.tasks import LoadedTask

MetricKey = tuple[str, str]  # (metric, filter), reported by lm-eval as "metric,filter"


def filter_names(task: Task) -> list[str]:
    """Names of the task's filter ensembles, in lm-eval's order ("none" when it defines none)."""
    filter_list = getattr(task.config, "filter_list", None)
    return [f["name"] for f in filter_list] if filter_list else ["none"]


def filter_ensembles(task: Task) -> list[Any]:
    """The task's filter ensembles, built from its public config with lm-eval's build_filter_ensemble.

    The same construction lm-eval's ConfigurableTask makes for its private `_filters` (a task
    without `filter_list` gets "none" = take_first); fresh objects, so runs never share state.
    """
    from lm_eval.filters import build_filter_ensemble

    filter_list = getattr(task.config, "filter_list", None)
    if not filter_list:
        return [build_filter_ensemble("none", [["take_first", None]])]
    return [build_filter_ensemble(f["name"], [[fn["function"], {k: v for k, v in fn.items() if k != "function"}]
                                              for fn in f["filter"]])
            for f in filter_list]


def resolve_metric(loaded: LoadedTask) -> MetricKey:
    """The (metric, filter) a spec optimises: its `metric` field, else the task's (or group's) first."""
    spec = loaded.spec
    first_task = next(iter(loaded.tasks.values()))
    if loaded.group is not None:
        aggs = loaded.group.aggregate_metric_list or []
        names = [a.metric for a in aggs]
        filters_of = {a.metric: list(a.filter_list or filter_names(first_task)) for a in aggs}
    else:
        names = list(first_task.aggregation())
        filters_of = {name: filter_names(first_task) for name in names}
    if not names:
        raise TaskInputError(f"task '{spec.name}' reports no metric to optimise")
    if spec.metric is None:
        return names[0], filters_of[names[0]][0]
    metric, _, filt = spec.metric.partition(",")
    if metric not in filters_of:
        raise TaskInputError(f"task '{spec.name}' has no metric '{metric}'; it reports {', '.join(names)}")
    if filt and filt not in filters_of[metric]:
        raise TaskInputError(
            f"task '{spec.name}' has no filter '{filt}' for {metric}; "
            f"its filters are {', '.join(filters_of[metric])}"
        )
    return metric, filt or filters_of[metric][0]


def score_doc(
    task: Task, doc: Any, instances: Sequence[Instance], responses: Sequence[Any]
) -> dict[MetricKey, Any]:
    """lm-eval's per-document metrics for one doc, for every filter: apply filters, then process_results."""
    # Fresh Instance copies: lm-eval's objects are shared by every run of a suite.
    fresh = [
        dataclasses.replace(inst, resps=[resp] * (inst.repeats or 1), filtered_resps={})
        for inst, resp in zip(instances, responses, strict=True)
    ]
    for ensemble in filter_ensembles(task):
        ensemble.apply(fresh)
    out: dict[MetricKey, Any] = {}
    for filt in fresh[0].filtered_resps:
        values = task.process_results(doc, [inst.filtered_resps[filt] for inst in fresh])
        for metric, value in values.items():
            out[(metric, filt)] = value
    return out


def aggregate(task: Task, raw: dict[MetricKey, list[Any]]) -> dict[str, float]:
    """Aggregate per-doc values with the task's aggregation functions (mean when it names none)."""
    from lm_eval.api.metrics import mean

    aggregations = task.aggregation()
    return {f"{m},{f}": float(aggregations.get(m, mean)(values)) for (m, f), values in raw.items() if values}


def group_metrics(
    group: Group, leaves: dict[str, dict[str, float]], sizes: dict[str, int]
) -> dict[str, float]:
    """A group's aggregate metrics from its leaves' metrics, by lm-eval's Group.aggregate."""
    table = {name: {**metrics, "sample_len": sizes[name]} for name, metrics in leaves.items()}
    result = group.aggregate(table)
    return {k: float(v) for k, v in result.items() if "," in k and "_stderr" not in k and _number(v)}


def item_value(value: Any) -> float:
    """A per-item metric value as a float (nan when the metric is corpus-level, e.g. a (gold, pred) pair)."""
    return float(value) if _number(value) else math.nan


def _number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
