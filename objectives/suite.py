"""A weighted suite of lm-eval tasks: built once per study, scored per candidate as an item stream."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from objectives.errors import TaskInputError
from objectives.metrics import MetricKey, aggregate, group_metrics, item_value, resolve_metric, score_doc
from objectives.requests import GenRequest, LLRequest, Tokenisation, common_prefix, item_prefix
from objectives.tasks import (
    SPLITS,
    Doc,
    LoadedTask,
    TaskSpec,
    build_docs,
    check_include_paths,
    check_specs,
    load_task,
    task_manager,
)

if TYPE_CHECKING:
    from objectives.engine import Engine, GenItem, LLItem

MIN_SHARED = 8  # a task-wide shared prefix shorter than this is not worth its own forward pass


@dataclass(frozen=True)
class ItemScore:
    """One scored item: `step` is its position in the suite's fixed order (stable across runs)."""

    step: int
    task: str
    value: float


@dataclass(frozen=True)
class ItemValues:
    """Per scored item, in the split's fixed order: its task, its metric value, its weight in the score.

    Two full passes over one split list the same items in the same order, so their values pair up
    item by item (what a paired test of two candidates needs). For a plain mean metric the suite
    score is sum(coef * value); a task's score is its items' coef-weighted mean.
    """

    tasks: tuple[str, ...]
    values: tuple[float, ...]
    coefs: tuple[float, ...]

    def as_dict(self) -> dict[str, list]:
        """JSON-ready form."""
        return {"tasks": list(self.tasks), "values": list(self.values), "coefs": list(self.coefs)}


@dataclass
class SuiteResult:
    """lm-eval metrics per task (fractions, lm-eval keys), the weighted suite score, the item values."""

    metrics: dict[str, dict[str, float]]
    task_scores: dict[str, float]
    score: float
    items_scored: int
    complete: bool
    items: ItemValues | None = None


@dataclass
class _Item:
    spec: int  # index of its TaskSpec in the suite
    doc: Doc
    ll: tuple[int, ...]  # positions in doc.instances of loglikelihood requests
    gen: tuple[int, ...]  # positions of generate_until requests
    ll_requests: tuple[LLRequest, ...]
    gen_requests: tuple[GenRequest, ...]
    prefix: int = 0  # tokens shared by all its loglikelihood requests
    coef: float = 0.0  # weight of its metric value in the suite score (score = sum coef * value)


class Suite:
    """Tasks with their requests built and tokenised once; `run` scores a live model on them."""

    def __init__(
        self,
        loaded: list[LoadedTask],
        metric_keys: list[MetricKey],
        items: dict[str, list[_Item]],
        shared: dict[tuple[int, str, str, str], tuple[int, ...]],
        tokenizer: Any,
        order_seed: int = 0,
    ) -> None:
        self.specs = [lt.spec for lt in loaded]
        self._loaded = loaded
        self._metric_keys = metric_keys
        self._items = items
        self._shared = shared
        self.tokenizer = tokenizer
        self._order = {
            split: random.Random(f"{order_seed}:{split}").sample(range(len(its)), len(its))
            for split, its in items.items()
        }

    @classmethod
    def build(
        cls,
        specs: list[TaskSpec],
        tokenizer: Any,
        include_paths: Sequence[str | os.PathLike] = (),
        max_length: int = 2048,
        order_seed: int = 0,
    ) -> Suite:
        """Load the tasks, build lm-eval's requests for both splits, and tokenise them once."""
        check_specs(specs)
        tok = Tokenisation(tokenizer, max_length)
        paths = check_include_paths(include_paths)
        manager = task_manager([s.name for s in specs], paths)
        loaded = [load_task(spec, manager) for spec in specs]
        owner: dict[str, str] = {}
        for lt in loaded:
            for leaf in lt.tasks:
                if leaf in owner:
                    raise TaskInputError(
                        f"task '{leaf}' is part of both '{owner[leaf]}' and '{lt.spec.name}'"
                    )
                owner[leaf] = lt.spec.name
        metric_keys = [resolve_metric(lt) for lt in loaded]
        for lt in loaded:
            build_docs(lt)
        items: dict[str, list[_Item]] = {}
        shared: dict[tuple[int, str, str, str], tuple[int, ...]] = {}
        for split in SPLITS:
            items[split] = [
                _tokenise(i, doc, tok) for i, lt in enumerate(loaded) for doc in lt.docs.get(split, [])
            ]
            shared.update(_shared_prefixes(items[split], split))
            _set_coefficients(items[split], loaded, metric_keys)
        return cls(loaded, metric_keys, items, shared, tokenizer, order_seed)

    def n_items(self, split: str = "search") -> int:
        """Number of items in a split ("search", "validation" or "holdout")."""
        return len(self._items[_check_split(split)])

    def item_scale(self, split: str = "search") -> float:
        """The largest factor an item's metric value is scaled by in a run's ItemScores (n_items * coef).

        For metrics in [0, 1] it is the most one item can move the paired difference of two candidates.
        """
        items = self._items[_check_split(split)]
        return max((len(items) * it.coef for it in items), default=0.0)

    def doc_ids(self, split: str = "search") -> dict[str, list[int]]:
        """Per leaf task, the indices (in its evaluation docs) of the items in a split, sorted."""
        out: dict[str, list[int]] = {}
        for item in self._items[_check_split(split)]:
            out.setdefault(item.doc.leaf, []).append(item.doc.index)
        return {leaf: sorted(ids) for leaf, ids in out.items()}

    def run(self, model: Any, split: str = "search", batch_size: int = 16) -> SuiteRun:
        """Score `model` item by item; iterate the returned SuiteRun to get ItemScores."""
        return SuiteRun(self, model, _check_split(split), batch_size)

    def evaluate(self, model: Any, split: str = "search", batch_size: int = 16) -> SuiteResult:
        """Score every item of a split and return the aggregated result."""
        run = SuiteRun(self, model, _check_split(split), batch_size, window=None)
        for _ in run:
            pass
        return run.result()


class SuiteRun:
    """One scoring pass of a model over a split; iterating yields ItemScores in the suite's order.

    ItemScore.value is the item's value of its task's optimised metric scaled by
    n_items * coef, where the suite score is sum(coef * value) over all items: a task's items share
    weight/sum(weights) equally (for a group, as lm-eval's group aggregation weighs them). So the
    mean of the values over a full run equals the suite score, and over the first k items of the
    seeded order it is an unbiased estimate of it. Metrics that lm-eval only aggregates over the
    whole corpus (e.g. f1 from (gold, pred) pairs) give nan per item.
    """

    def __init__(
        self, suite: Suite, model: Any, split: str, batch_size: int, window: int | None = -1
    ) -> None:
        from objectives.engine import Engine

        self._suite = suite
        self._split = split
        self._engine: Engine = Engine(model, suite.tokenizer, batch_size)
        # Requests computed per round before yielding: enough for full batches, small enough to prune.
        self._window = 8 * batch_size if window == -1 else window
        self._per_doc: list[dict[tuple[str, int], dict[MetricKey, Any]]] = [{} for _ in suite.specs]
        self._raw: dict[int, tuple[str, float, float]] = {}  # step -> (task, metric value, coef)
        self.items_scored = 0
        self.engine_seconds = 0.0  # wall time inside the engine (forward passes and request packing)
        self._started = False

    @property
    def forward_seconds(self) -> float:
        """Seconds spent inside the model's forward passes so far."""
        return self._engine.forward_seconds

    def __iter__(self) -> Iterator[ItemScore]:
        if self._started:
            raise RuntimeError("a SuiteRun scores once; call Suite.run again for another pass")
        self._started = True
        return self._scores()

    def _scores(self) -> Iterator[ItemScore]:
        suite, items = self._suite, self._suite._items[self._split]
        order = suite._order[self._split]
        n = len(order)
        pos = 0
        while pos < n:
            end = pos + 1 if self._window is not None else n
            if self._window is not None:
                size = _n_requests(items[order[pos]])
                while end < n and size + _n_requests(items[order[end]]) <= self._window:
                    size += _n_requests(items[order[end]])
                    end += 1
            chunk = [items[i] for i in order[pos:end]]
            responses = self._compute(chunk)
            for step, item, resps in zip(range(pos, end), chunk, responses, strict=True):
                lt = suite._loaded[item.spec]
                values = score_doc(lt.tasks[item.doc.leaf], item.doc.doc, item.doc.instances, resps)
                self._per_doc[item.spec][(item.doc.leaf, item.doc.index)] = values
                self.items_scored += 1
                value = item_value(values.get(suite._metric_keys[item.spec], math.nan))
                self._raw[step] = (lt.spec.name, value, item.coef)
                yield ItemScore(step=step, task=lt.spec.name, value=n * item.coef * value)
            pos = end

    def _compute(self, chunk: list[_Item]) -> list[list[Any]]:
        from objectives.engine import GenItem, LLItem

        t0 = time.perf_counter()
        ll_items: list[LLItem] = []
        gen_items: list[GenItem] = []
        for item in chunk:
            if item.ll_requests:
                key = (item.spec, item.doc.leaf, self._split, "ll")
                shared = self._suite._shared.get(key, ())
                ll_items.append(LLItem(key, shared, item.prefix, item.ll_requests))
            for req in item.gen_requests:
                key = (item.spec, item.doc.leaf, self._split, "gen")
                gen_items.append(GenItem(key, self._suite._shared.get(key, ()), req))
        ll_out = iter(self._engine.loglikelihood(ll_items)) if ll_items else iter(())
        gen_out = iter(self._engine.generate(gen_items)) if gen_items else iter(())
        responses = []
        for item in chunk:
            resps: list[Any] = [None] * len(item.doc.instances)
            if item.ll_requests:
                for k, res in zip(item.ll, next(ll_out), strict=True):
                    resps[k] = res
            for k in item.gen:
                resps[k] = next(gen_out)
            responses.append(resps)
        self.engine_seconds += time.perf_counter() - t0
        return responses

    def item_metrics(self) -> dict[str, dict[int, dict[str, Any]]]:
        """Per leaf task and doc index, lm-eval's per-document metric values of the items scored so far."""
        out: dict[str, dict[int, dict[str, Any]]] = {}
        for per_doc in self._per_doc:
            for (leaf, index), values in per_doc.items():
                out.setdefault(leaf, {})[index] = {f"{m},{f}": v for (m, f), v in values.items()}
        return out

    def result(self) -> SuiteResult:
        """lm-eval's aggregated metrics over the items scored so far, and the weighted score."""
        suite = self._suite
        metrics: dict[str, dict[str, float]] = {}
        task_scores: dict[str, float] = {}
        for spec_ix, lt in enumerate(suite._loaded):
            leaves: dict[str, dict[str, float]] = {}
            sizes: dict[str, int] = {}
            for leaf, task in lt.tasks.items():
                docs = sorted(idx for (name, idx) in self._per_doc[spec_ix] if name == leaf)
                if not docs:
                    continue
                raw: dict[MetricKey, list[Any]] = {}
                for idx in docs:  # doc order, as lm-eval sums them
                    for key, value in self._per_doc[spec_ix][(leaf, idx)].items():
                        raw.setdefault(key, []).append(value)
                leaves[leaf] = aggregate(task, raw)
                sizes[leaf] = len(docs)
            if not leaves:
                continue
            metrics.update(leaves)
            name = lt.spec.name
            if lt.group is not None:
                metrics[name] = group_metrics(lt.group, leaves, sizes)
            metric, filt = suite._metric_keys[spec_ix]
            value = metrics.get(name, {}).get(f"{metric},{filt}")
            if value is not None:
                task_scores[name] = value
        weights = {s.name: s.weight for s in suite.specs}
        total = sum(weights[t] for t in task_scores)
        score = sum(weights[t] * v for t, v in task_scores.items()) / total if total else math.nan
        n = len(suite._items[self._split])
        raw = [self._raw[step] for step in sorted(self._raw)]
        items = ItemValues(tuple(r[0] for r in raw), tuple(r[1] for r in raw), tuple(r[2] for r in raw))
        return SuiteResult(metrics, task_scores, score, self.items_scored, self.items_scored == n, items)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _n_requests(item: _Item) -> int:
    return len(item.ll_requests) + len(item.gen_requests)


def _tokenise(spec: int, doc: Doc, tok: Tokenisation) -> _Item:
    ll, gen, ll_requests, gen_requests = [], [], [], []
    for k, inst in enumerate(doc.instances):
        if inst.request_type == "loglikelihood":
            context, continuation = inst.args[:2]
            ll.append(k)
            ll_requests.append(tok.loglikelihood(context, continuation))
        elif inst.request_type == "generate_until":
            context, gen_kwargs = inst.args[:2]
            gen.append(k)
            gen_requests.append(tok.generation(context, gen_kwargs, doc.leaf))
        else:
            raise TaskInputError(f"task '{doc.leaf}': {inst.request_type} requests are not supported")
    item = _Item(spec, doc, tuple(ll), tuple(gen), tuple(ll_requests), tuple(gen_requests))
    if ll_requests:
        item.prefix = item_prefix(ll_requests)
    return item


def _shared_prefixes(items: list[_Item], split: str) -> dict[tuple[int, str, str, str], tuple[int, ...]]:
    """Per task split: the prompt prefix all its items share (e.g. a fixed few-shot block)."""
    groups: dict[tuple[int, str, str, str], list[tuple[int, ...]]] = {}
    for item in items:
        if item.ll_requests:
            groups.setdefault((item.spec, item.doc.leaf, split, "ll"), []).append(
                item.ll_requests[0].feed[: item.prefix]
            )
        for req in item.gen_requests:
            groups.setdefault((item.spec, item.doc.leaf, split, "gen"), []).append(req.context[:-1])
    out = {}
    for key, seqs in groups.items():
        n = common_prefix(seqs)
        if n >= MIN_SHARED:
            out[key] = tuple(seqs[0][:n])
    return out


def _set_coefficients(items: list[_Item], loaded: list[LoadedTask], metric_keys: list[MetricKey]) -> None:
    total_weight = sum(lt.spec.weight for lt in loaded)
    for spec_ix, lt in enumerate(loaded):
        mine = [it for it in items if it.spec == spec_ix]
        if not mine:
            continue
        share = lt.spec.weight / total_weight
        by_size = True  # a plain task is a mean over its items
        if lt.group is not None:
            aggs = [a for a in lt.group.aggregate_metric_list or [] if a.metric == metric_keys[spec_ix][0]]
            by_size = bool(aggs[0].weight_by_size) if aggs else True
        counts: dict[str, int] = {}
        for it in mine:
            counts[it.doc.leaf] = counts.get(it.doc.leaf, 0) + 1
        for it in mine:
            it.coef = share / len(mine) if by_size else share / (len(counts) * counts[it.doc.leaf])
