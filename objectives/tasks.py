"""lm-eval task loading: names and include paths to Task objects, item subsets, requests per split.

Everything here goes through lm-eval's own code paths (TaskManager.load, set_fewshot_seed,
build_all_requests) so prompts and few-shot contexts are the ones `simple_evaluate` builds.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import os
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from objectives.errors import TaskInputError

if TYPE_CHECKING:
    from lm_eval.api.group import Group
    from lm_eval.api.instance import Instance
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

# search: the items that steer the search; validation: re-scores the top candidates to pick the final
# merge (items the search never saw); holdout: reports that pick against the baseline, used for nothing else.
SPLITS = ("search", "validation", "holdout")
SUBSETS = ("first", "random")
# Loggers of the libraries that lm-eval drives while it builds tasks; silenced so library code stays quiet.
_NOISY_LOGGERS = ("lm_eval", "datasets", "huggingface_hub", "fsspec", "filelock")


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite: what to score, on which items, and how much it counts."""

    name: str
    weight: float = 1.0
    metric: str | None = None
    num_fewshot: int | None = None
    fewshot_seed: int = 1234
    search_items: int | None = None
    holdout_items: int = 0
    subset: str = "random"
    validation_items: int = 0
    seed: int = 0


@dataclass
class Doc:
    """One scored item: an lm-eval document of a leaf task and the requests lm-eval built for it."""

    leaf: str
    index: int  # position in the task's evaluation docs (lm-eval's `samples` index)
    doc: Any
    instances: list[Instance]


@dataclass
class LoadedTask:
    """A spec resolved to lm-eval objects: leaf tasks, optional group, and the docs of each split."""

    spec: TaskSpec
    tasks: dict[str, Task]
    group: Group | None
    docs: dict[str, list[Doc]] = field(default_factory=dict)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence lm-eval's logging, tqdm bars and warnings while it builds tasks."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def check_specs(specs: Sequence[TaskSpec]) -> None:
    """Reject specs that cannot describe a scoring run, with a line naming the field."""
    if not specs:
        raise TaskInputError("no tasks given; name at least one lm-eval task")
    seen: set[str] = set()
    for spec in specs:
        where = f"task '{spec.name}'"
        if not spec.name or not spec.name.strip():
            raise TaskInputError("a task name is empty; give lm-eval task names such as arc_challenge")
        if spec.name in seen:
            raise TaskInputError(f"{where} is listed twice; list each task once")
        seen.add(spec.name)
        if not spec.weight > 0:
            raise TaskInputError(f"{where}: weight must be > 0, got {spec.weight}")
        if spec.search_items is not None and spec.search_items <= 0:
            raise TaskInputError(
                f"{where}: limit/search_items must be a positive number, got {spec.search_items}"
            )
        if spec.holdout_items < 0:
            raise TaskInputError(f"{where}: holdout_items must be >= 0, got {spec.holdout_items}")
        if spec.validation_items < 0:
            raise TaskInputError(f"{where}: validation_items must be >= 0, got {spec.validation_items}")
        if spec.num_fewshot is not None and spec.num_fewshot < 0:
            raise TaskInputError(f"{where}: num_fewshot must be >= 0, got {spec.num_fewshot}")
        if spec.subset not in SUBSETS:
            raise TaskInputError(f"{where}: subset must be 'first' or 'random', got '{spec.subset}'")


def check_include_paths(include_paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Each include path must be a folder holding lm-eval task YAML files."""
    from lm_eval.tasks import TaskManager

    paths = []
    for raw in include_paths:
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise TaskInputError(
                f"include path {path} is not a folder; pass a folder of lm-eval task YAML files"
            )
        has_yaml = any(path.rglob("*.yaml")) or any(path.rglob("*.yml"))
        if has_yaml:
            with quiet():
                has_yaml = bool(TaskManager(include_path=str(path), include_defaults=False).all_tasks)
        if not has_yaml:
            raise TaskInputError(
                f"include path {path} holds no lm-eval task YAML (no *.yaml with a 'task:' key); "
                "point it at a folder of task configs"
            )
        paths.append(path)
    return paths


def task_manager(names: Sequence[str], include_paths: Sequence[Path]) -> TaskManager:
    """A TaskManager that knows every name; the 11 s registry scan is skipped when include paths suffice."""
    from lm_eval.tasks import TaskManager

    with quiet():
        if include_paths:
            local = TaskManager(include_path=[str(p) for p in include_paths], include_defaults=False)
            if all(name in local.task_index for name in names):
                return local
        manager = TaskManager(include_path=[str(p) for p in include_paths] or None)
    for name in names:
        if name not in manager.task_index:
            raise TaskInputError(_unknown_task(name, manager, include_paths))
    return manager


def _unknown_task(name: str, manager: TaskManager, include_paths: Sequence[Path]) -> str:
    where = "the lm-eval registry" + "".join(f" or {p}" for p in include_paths)
    close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
    hint = (
        f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; `lm-eval ls tasks` lists them"
    )
    return f"unknown task '{name}': not found in {where}{hint}"


def load_task(spec: TaskSpec, manager: TaskManager) -> LoadedTask:
    """Build the lm-eval Task (or Group of tasks) a spec names, its data loaded (offline cache only)."""

    try:
        with quiet():
            obj = manager.load([_with_local_data(spec.name, manager)])
    except KeyError as exc:
        raise TaskInputError(f"task '{spec.name}' could not be built: missing {exc}") from None
    except Exception as exc:  # datasets/lm-eval raise many types for missing data and bad YAML
        raise TaskInputError(_load_error(spec.name, manager, exc)) from None
    tasks: dict[str, Task] = obj["tasks"]
    groups: dict[str, Group] = obj.get("groups", {})
    group = groups.get(spec.name)
    if group is None and len(tasks) != 1:
        raise TaskInputError(
            f"'{spec.name}' is a tag of {len(tasks)} tasks without an aggregate score; "
            "list the tasks separately"
        )
    if group is not None and not group.has_aggregation:
        raise TaskInputError(
            f"group '{spec.name}' defines no aggregate_metric_list, so it has no single score; "
            "list its tasks separately"
        )
    for name, task in tasks.items():
        output_type = getattr(task, "OUTPUT_TYPE", None)
        if output_type not in ("multiple_choice", "loglikelihood", "generate_until"):
            raise TaskInputError(
                f"task '{name}' has output_type {output_type}; only multiple_choice, loglikelihood and "
                "generate_until are supported"
            )
        if getattr(task, "MULTIMODAL", False):
            raise TaskInputError(f"task '{name}' is multimodal; only text tasks are supported")
        _set_fewshot(task, spec)
    return LoadedTask(spec=spec, tasks=tasks, group=group)


def _load_error(name: str, manager: TaskManager, exc: Exception) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    offline = os.environ.get("HF_DATASETS_OFFLINE", "") in (
        "1",
        "ON",
        "YES",
        "TRUE",
        "true",
    ) or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "ON", "YES", "TRUE", "true")
    if isinstance(exc, FileNotFoundError) and message.startswith("Unable to find"):
        return f"task '{name}': {message[0].lower()}{message[1:]}; fix the data_files in its YAML"
    missing = isinstance(exc, (ConnectionError, FileNotFoundError)) or "offline" in message.lower()
    if offline and missing:
        dataset = _dataset_named(message) or _dataset_path(name, manager) or name
        return (
            f"task '{name}': dataset {dataset} is not in the local cache and HF_DATASETS_OFFLINE=1; "
            "download it once with network access, or use a task folder with local data"
        )
    return f"task '{name}' could not be loaded: {type(exc).__name__}: {message}"


def _dataset_named(message: str) -> str | None:
    match = re.search(r"'([\w.\-]+/[\w.\-]+)'", message)
    return match.group(1) if match else None


def _dataset_path(name: str, manager: TaskManager) -> str | None:
    entry = manager.task_index.get(name)
    if entry is None or not entry.yaml_path:
        return None
    try:
        from lm_eval.tasks._yaml_loader import load_yaml

        config = load_yaml(entry.yaml_path, resolve_func=False, recursive=True)
    except Exception:  # only used to word an error message
        return None
    return config.get("dataset_path") if isinstance(config, dict) else None


def _with_local_data(name: str, manager: TaskManager) -> str | dict[str, Any]:
    """The task's load spec; relative `data_files` of a task YAML resolve against the YAML's folder.

    So a study and its task folder run from any working directory. A relative path that exists
    only relative to the working directory (the old behaviour) is kept as written.
    """
    entry = manager.task_index.get(name)
    if entry is None or not entry.yaml_path:
        return name
    try:
        from lm_eval.tasks._yaml_loader import load_yaml

        config = load_yaml(entry.yaml_path, resolve_func=False, recursive=True)
    except Exception:  # lm-eval reports a broken YAML itself, with its own message
        return name
    kwargs = config.get("dataset_kwargs") if isinstance(config, dict) else None
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if files is None:
        return name
    folder = Path(entry.yaml_path).parent

    def local(value):
        if isinstance(value, str):
            path = Path(value).expanduser()
            if path.is_absolute() or "://" in value or (not (folder / path).exists() and path.exists()):
                return value
            return str(folder / path)
        if isinstance(value, list):
            return [local(v) for v in value]
        if isinstance(value, dict):
            return {k: local(v) for k, v in value.items()}
        return value

    resolved = local(files)
    if resolved == files:
        return name
    # An inline config is not merged with the registered YAML: pass the whole YAML (functions resolved).
    full = load_yaml(entry.yaml_path, resolve_func=True, recursive=True)
    return {**full, "task": name, "dataset_kwargs": {**full.get("dataset_kwargs", {}), "data_files": resolved}}


def _set_fewshot(task: Task, spec: TaskSpec) -> None:
    # Same rule as simple_evaluate: a task whose config pins num_fewshot to 0 is never overridden.
    default = task.get_config("num_fewshot")
    if spec.num_fewshot is not None:
        if default != 0:
            task.set_config(key="num_fewshot", value=spec.num_fewshot)
    elif default is None:
        task.set_config(key="num_fewshot", value=0)


def select_docs(loaded: LoadedTask) -> dict[str, dict[str, int | list[int] | None]]:
    """Docs per split and leaf task: None = all docs, an int = lm-eval's `limit`, a list = its `samples`.

    'first' applies lm-eval's limit to each leaf task (search = first N, holdout = the last M docs,
    validation = the V docs before those).
    'random' draws from the union of the leaf tasks' docs with a seeded shuffle: the held-out items
    are drawn first, then the validation items, so changing search_items never moves an item
    between splits.
    """
    spec = loaded.spec
    sizes = {name: len(task.eval_docs) for name, task in loaded.tasks.items()}
    hold, val, search = spec.holdout_items, spec.validation_items, spec.search_items
    out: dict[str, dict[str, int | list[int] | None]] = {split: {} for split in SPLITS}
    if spec.subset == "first":
        for name, size in sizes.items():
            if hold + val >= size:
                raise TaskInputError(f"task '{spec.name}': {_taken(hold, val)} leaves none of the {size} items "
                                     f"of {name} to search")
            n_search = size - hold - val if search is None else min(search, size - hold - val)
            out["search"][name] = None if n_search == size else n_search
            if hold:
                out["holdout"][name] = list(range(size - hold, size))
            if val:
                out["validation"][name] = list(range(size - hold - val, size - hold))
        return out
    pool = [(name, i) for name, size in sizes.items() for i in range(size)]
    if hold + val >= len(pool):
        raise TaskInputError(f"task '{spec.name}': {_taken(hold, val)} leaves none of its {len(pool)} items to search")
    order = random.Random(spec.seed).sample(pool, len(pool))
    rest = order[hold + val:]
    chosen = {
        "holdout": order[:hold],
        "validation": order[hold:hold + val],
        "search": rest if search is None else rest[:search],
    }
    for split, pairs in chosen.items():
        for name in sizes:
            picked = sorted(i for leaf, i in pairs if leaf == name)
            if split == "search" and len(picked) == sizes[name]:
                out[split][name] = None  # every doc: identical to an lm-eval run without limit
            elif picked:
                out[split][name] = picked
    return out


def _taken(hold: int, val: int) -> str:
    return f"holdout_items={hold}" if not val else f"holdout_items={hold} + validation_items={val}"


def build_docs(loaded: LoadedTask) -> None:
    """Build lm-eval's requests for every split once (few-shot rng reset per split, as a fresh run)."""
    selection = select_docs(loaded)
    for split in SPLITS:
        docs: list[Doc] = []
        for name, task in loaded.tasks.items():
            if name not in selection[split]:
                continue
            chosen = selection[split][name]
            limit = chosen if isinstance(chosen, int) else None
            indices = chosen if isinstance(chosen, list) else None
            task.set_fewshot_seed(seed=loaded.spec.fewshot_seed)
            try:
                with quiet():
                    task.build_all_requests(limit=limit, samples=indices, rank=0, world_size=1)
            except Exception as exc:  # bad prompt templates in a user's YAML surface here
                raise TaskInputError(
                    f"task '{name}': building its prompts failed: {type(exc).__name__}: {exc}"
                ) from None
            docs.extend(_group_instances(name, task.instances, indices))
        loaded.docs[split] = docs


def _group_instances(name: str, instances: list[Instance], indices: list[int] | None) -> list[Doc]:
    by_doc: dict[int, list[Instance]] = {}
    for inst in instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    docs = []
    for doc_id in sorted(by_doc):
        group = sorted(by_doc[doc_id], key=lambda inst: inst.idx)
        index = indices[doc_id] if indices is not None else doc_id
        docs.append(Doc(leaf=name, index=index, doc=group[0].doc, instances=group))
    return docs
