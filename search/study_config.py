"""Study files (studies/*.yaml): the schema, validated with errors that name the field."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merge_core.config import ConditionalValue, Slice
from merge_core.refs import split_adapter
from search.errors import StudyError
from search.samplers import SAMPLERS as SAMPLER_REGISTRY

SAMPLERS = tuple(SAMPLER_REGISTRY)
DEFAULT_FILTER = "default"  # the search-space entry that becomes the filter-less `{value: ...}`


RACING_P_THRESHOLD = 0.5  # the racing pruner's default (BENCHMARKS.md, "Search quality")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StudySection(_Strict):
    """Name, storage and budget of the Optuna study."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    storage: str | None = None  # default: sqlite:///runs/<name>.db
    sampler: Literal["tpe", "cmaes", "nsga2", "gp", "random"] = "gp"  # won on the demo: BENCHMARKS.md
    seed: int = 0
    n_trials: int = Field(default=40, gt=0)
    timeout: float | None = Field(default=None, gt=0)
    # weighted: one score (tasks weighted); per_task: one objective per task (a Pareto front).
    # Unset: per_task with the nsga2 sampler, weighted otherwise (what earlier study files meant).
    objective: Literal["weighted", "per_task"] | None = None

    def per_task(self, sampler: str) -> bool:
        """Whether the study optimises one objective per task."""
        return self.objective == "per_task" or (self.objective is None and sampler == "nsga2")


class MergeSection(_Strict):
    """What is merged: a mergekit config (any method), or the two parents of a SLERP study."""

    # a mergekit YAML path (relative to the study file; several documents make a chain) or the config inline
    config: str | dict | list[dict] | None = None
    models: list[str] | None = Field(default=None, min_length=2, max_length=2)
    base_model: str | None = None
    layer_range: tuple[int, int] | None = None
    slices: list[Slice] | None = None
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    device: str = "cpu"
    tokenizer_source: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False  # run the parents' repository code (their auto_map) to build and score
    # DARE/DELLA masks: one seed for every candidate (export with --random-seed); mergekit-yaml's range
    random_seed: int = Field(default=0, ge=0, lt=2**32)

    @model_validator(mode="after")
    def _consistent(self):
        if self.config is not None:
            extra = [k for k in ("models", "base_model", "layer_range", "slices", "tokenizer_source")
                     if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{extra[0]}: give it inside merge.config (the mergekit config), not next to it")
            return self
        if self.models is None or self.base_model is None:
            raise ValueError("give merge.config (a mergekit config), or models and base_model for a SLERP study")
        if self.base_model not in self.models:
            raise ValueError(f"base_model {self.base_model!r} must be one of models {self.models}")
        if self.models[0] == self.models[1]:
            raise ValueError("models: the two parents must differ")
        if self.layer_range is not None and self.slices is not None:
            raise ValueError("give layer_range or slices, not both")
        if self.layer_range is not None and not 0 <= self.layer_range[0] < self.layer_range[1]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(self.layer_range)}")
        return self


class SpaceEntry(_Strict):
    """One filter's t: K anchors searched in [low, high], or a fixed value."""

    anchors: int | None = Field(default=None, ge=1, le=32)
    low: float = 0.0
    high: float = 1.0
    value: float | list[float] | None = None

    @model_validator(mode="after")
    def _searched_or_fixed(self):
        if (self.anchors is None) == (self.value is None):
            raise ValueError("give either anchors (searched) or value (fixed)")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if isinstance(self.value, list) and not self.value:
            raise ValueError("value: a gradient needs at least one anchor")
        return self


class SpaceItem(_Strict):
    """One searched number of a mergekit config: a parameter, for some models, for one filter."""

    parameter: str = Field(min_length=1)
    stage: str | None = None  # in a chain study: which stage (`final` for the unnamed last document)
    models: Literal["all"] | list[str] | None = None  # per-model parameters: which models (default all)
    filter: str | None = None  # None: the entry without filter (every tensor no earlier entry takes)
    anchors: int | None = Field(default=None, ge=1, le=32)  # a gradient of K anchors
    blocks: int | None = Field(default=None, ge=1, le=64)  # one value per block of layers (layer_granularity)
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    choices: list[bool | float | str] | None = None  # categorical (normalize, int8_mask, rescale...)

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("anchors", "blocks", "choices") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of anchors (a gradient), blocks (per layer block) or choices")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log: needs low > 0")
        if self.choices is not None and not self.choices:
            raise ValueError("choices: give at least one")
        return self


class TaskEntry(_Strict):
    """One lm-eval task of the objective."""

    name: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)
    metric: str | None = None
    num_fewshot: int | None = Field(default=None, ge=0)
    fewshot_seed: int = 1234
    search_items: int | None = Field(default=None, gt=0)
    holdout_items: int = Field(default=0, ge=0)
    subset: Literal["first", "random"] = "random"
    seed: int = 0
    # items that pick the final merge among the top candidates (selection.top_k); 0: the best search score picks
    validation_items: int = Field(default=0, ge=0)


class ObjectivesSection(_Strict):
    """The tasks that score a candidate, and how to run them."""

    tasks: list[TaskEntry] = Field(min_length=1)
    include_path: list[str] = []
    batch_size: int = Field(default=16, gt=0)
    max_length: int = Field(default=2048, gt=0)


class PrunerSection(_Strict):
    """Stop a candidate early when its items are confidently worse than the trial it races."""

    type: Literal["racing", "wilcoxon", "none"] = "racing"  # search/pruners.py; chosen in BENCHMARKS.md
    # racing (anytime): the most a candidate as good as the one it races may be stopped, over its whole
    # race; wilcoxon: the test's p-value at each check. Default: 0.5 racing, 0.1 wilcoxon (BENCHMARKS.md)
    p_threshold: float = Field(default=0.1, gt=0, lt=1)
    n_startup_steps: int = Field(default=20, ge=0)
    check_every: int = Field(default=5, gt=0)  # items between pruning checks (each reads the study)
    # racing: against the best trial, or the k-th best (k = selection.top_k, the pool the final pick comes from)
    against: Literal["top_k", "best"] = "best"
    # what the sampler learns of a pruned trial: a paired estimate of its full score, or nothing (PRUNED)
    pruned_trials: Literal["estimate", "hidden"] = "estimate"
    # racing: p_threshold holds over the whole race (anytime) or at each check only (per_look)
    boundary: Literal["anytime", "per_look"] = "anytime"
    # racing: stop a candidate that trails the one it races and cannot beat it by more than this much
    # of the weighted score (an indifference zone; 0.01 chosen in BENCHMARKS.md, "Pruners, third round")
    margin: float = Field(default=0.01, ge=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _default_p_threshold(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("p_threshold") is None and data.get("type", "racing") == "racing":
            return {**data, "p_threshold": RACING_P_THRESHOLD}
        return data


class SelectionSection(_Strict):
    """How the final merge is picked and how its gain over the baseline is judged."""

    top_k: int = Field(default=5, gt=0)  # best search scores re-scored on the validation items
    alpha: float = Field(default=0.05, gt=0, lt=1)  # confidence level 1 - alpha; significant when p < alpha
    resamples: int = Field(default=10000, ge=1000)  # bootstrap resamples and sign-flip draws
    seed: int = 0


class ExportSection(_Strict):
    """What `search export` writes by default."""

    top_k: int = Field(default=3, gt=0)
    dir: str | None = None  # default: runs/<name>/export


class StudyFile(_Strict):
    """A whole study file."""

    study: StudySection
    merge: MergeSection
    search_space: dict[str, SpaceEntry] | list[SpaceItem] = Field(min_length=1)
    baseline: list[ConditionalValue] | float | list[float] | None = None
    objectives: ObjectivesSection
    pruner: PrunerSection = PrunerSection()
    selection: SelectionSection = SelectionSection()
    export: ExportSection = ExportSection()

    @field_validator("search_space")
    @classmethod
    def _default_last(cls, value):
        if isinstance(value, dict) and DEFAULT_FILTER in value and list(value)[-1] != DEFAULT_FILTER:
            raise ValueError(f"the {DEFAULT_FILTER!r} entry must come last (filters are tried in order)")
        return value

    @model_validator(mode="after")
    def _forms_agree(self):
        generic = self.merge.config is not None
        if generic and isinstance(self.search_space, dict):
            raise ValueError("search_space: with merge.config, list the searched parameters "
                             "(- {parameter: weight, anchors: 3, ...})")
        if not generic and isinstance(self.search_space, list):
            raise ValueError("search_space: a parameter list needs merge.config (a mergekit config)")
        if generic and self.baseline is not None:
            raise ValueError("baseline: with merge.config, the config itself is the baseline; remove baseline")
        if not generic and self.baseline is None:
            raise ValueError("baseline: required (the hand-written t)")
        return self

    def is_generic(self) -> bool:
        """True for a study over a mergekit config (any method), False for the two-parent SLERP form."""
        return self.merge.config is not None


def load_study_file(path: str | Path) -> StudyFile:
    """Read and validate a study YAML; every error is one line naming the file and field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"{path}: no such study file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise StudyError(f"{path}: cannot read ({type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise StudyError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', None) or 'syntax error'}") from None
    if not isinstance(data, dict):
        raise StudyError(f"{path}: expected a mapping with sections study, merge, search_space, baseline, objectives")
    merge = data.get("merge")
    if isinstance(merge, dict) and isinstance(merge.get("config"), str):
        config_path = Path(merge["config"]).expanduser()
        if not config_path.is_absolute() and (path.parent / config_path).is_file():
            merge["config"] = str(path.parent / config_path)  # relative to the study file
    try:
        return StudyFile.model_validate(resolve_paths(data, path.resolve().parent))
    except ValidationError as exc:
        raise StudyError(f"{path}: {describe(exc, data)}") from None


DEMO_SCHEME = "demo:"  # `demo:parent_a`: a demo parent, built on first use into ./runs/demo-models
DEMO_MODELS = Path("runs/demo-models")
DEMO3_MODELS = Path("runs/demo3-models")  # the second demo's base and three children (its config names them)


def model_path(text: str, folder: Path) -> str:
    """Where a model reference of a study file points.

    The rule: a reference that names something existing relative to the study file's folder, or
    that starts with ./ ../ / or ~, or that has more than one `/`, is a path, made absolute against
    the study file's folder. Anything else (`org/name`, `org/name@revision`, a bare `gpt2`) is a
    Hugging Face Hub id and stays as written. `demo:NAME` is a demo parent under ./runs/demo-models.
    In `model+adapter` (a LoRA adapter on a model) each part follows the rule.
    """
    if text.startswith(DEMO_SCHEME):
        return str((DEMO_MODELS / text.removeprefix(DEMO_SCHEME)).resolve())
    model, adapter = split_adapter(text)
    if adapter is not None:  # `model+adapter`: each part by the same rule
        return f"{model_path(model, folder)}+{model_path(adapter, folder)}"
    path = Path(text).expanduser()
    hub_like = not text.startswith((".", "/", "~")) and text.split("@")[0].count("/") <= 1
    if hub_like and not (folder / path).exists():
        return text
    return str((folder / path).resolve())


def file_path(text: str, folder: Path) -> str:
    """A file or folder path of a study file, made absolute against the study file's folder."""
    return str((folder / Path(text).expanduser()).resolve())


def storage_path(url: str, folder: Path) -> str:
    """A storage URL whose SQLite file or journal file is relative to the study file's folder."""
    from search.storage import is_journal

    if url.startswith("sqlite:///") and url != "sqlite:///:memory:" and not url.startswith("sqlite:////"):
        return "sqlite:///" + file_path(url.removeprefix("sqlite:///"), folder)
    if is_journal(url):
        prefix = "journal:" if url.startswith("journal:") else ""
        return prefix + file_path(url.removeprefix("journal:"), folder)
    return url


def resolve_paths(data: dict, folder: Path) -> dict:
    """The study data with its paths made absolute against `folder` (see model_path for models)."""

    def section(name: str) -> dict:
        value = data.get(name)
        return dict(value) if isinstance(value, dict) else value

    out = dict(data)
    merge = section("merge")
    if isinstance(merge, dict):
        if isinstance(merge.get("models"), list):
            merge["models"] = [model_reference(m, folder) for m in merge["models"]]
        if "base_model" in merge:
            merge["base_model"] = model_reference(merge["base_model"], folder)
        if isinstance(merge.get("tokenizer_source"), str) and merge["tokenizer_source"] not in ("base", "union"):
            merge["tokenizer_source"] = model_path(merge["tokenizer_source"], folder)
        if isinstance(merge.get("slices"), list):
            merge["slices"] = [_slice_paths(s, folder) for s in merge["slices"]]
        out["merge"] = merge
    objectives = section("objectives")
    if isinstance(objectives, dict) and isinstance(objectives.get("include_path"), list):
        objectives["include_path"] = [file_path(p, folder) if isinstance(p, str) else p
                                      for p in objectives["include_path"]]
        out["objectives"] = objectives
    study = section("study")
    if isinstance(study, dict) and isinstance(study.get("storage"), str):
        study["storage"] = storage_path(study["storage"], folder)
        out["study"] = study
    export = section("export")
    if isinstance(export, dict) and isinstance(export.get("dir"), str):
        export["dir"] = file_path(export["dir"], folder)
        out["export"] = export
    return out


def _slice_paths(item: Any, folder: Path) -> Any:
    if not isinstance(item, dict):
        return item
    item = dict(item)
    if "base_model" in item:
        item["base_model"] = model_reference(item["base_model"], folder)
    if isinstance(item.get("sources"), list):
        item["sources"] = [{**src, "model": model_reference(src["model"], folder)}
                           if isinstance(src, dict) and "model" in src else src
                           for src in item["sources"]]
    return item


def model_reference(value: Any, folder: Path) -> Any:
    """`model_path` applied to a model reference in any of mergekit's forms: `path`, `{path, revision}`,
    `{model: {path, revision}, lora: ...}` (anything else is left for validation to report)."""
    if isinstance(value, str):
        return model_path(value, folder)
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        return {**value, "path": model_path(value["path"], folder)}
    if isinstance(value, dict) and isinstance(value.get("model"), dict | str):
        lora = value.get("lora")
        return {**value, "model": model_reference(value["model"], folder)} | (
            {"lora": model_reference(lora, folder)} if isinstance(lora, dict | str) else {})
    return value


def describe(exc: ValidationError, data: Any) -> str:
    """The first validation error as `field.path: what is wrong`, with a did-you-mean for typos."""
    # A field that takes a mapping or a list (search_space) reports both branches' errors: keep the
    # branch of the form the file has. An unknown key usually explains a "missing" one (a typo), so
    # report it first.
    errors = [e for e in exc.errors() if _branch_fits(e["loc"], data)] or exc.errors()
    err = sorted(errors, key=lambda e: e["type"] != "extra_forbidden")[0]
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in {"float", "int", "str"}))]
    field = ".".join(str(p) for p in loc)
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key" + _did_you_mean(str(loc[-1]), _known_keys(loc[:-1], data))
    elif err["type"] == "literal_error":
        message = f"must be one of {err.get('ctx', {}).get('expected', '')}"
    elif err["type"] == "missing":
        message = "required"
    return f"{field}: {message}" if field else message


def _branch_fits(loc: tuple, data: Any) -> bool:
    """False when an error's location goes through a union branch (`dict[...]`, `list[...]`) that is
    not the form of the value found there in `data`."""
    value = data
    for part in loc:
        if isinstance(part, str) and part.startswith(("dict[", "list[")):
            if not isinstance(value, dict if part.startswith("dict[") else list):
                return False
            continue
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return True
    return True


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(choices)})" if choices else ""


def _known_keys(parent: list, data: Any) -> list[str]:
    model: Any = StudyFile
    for part in parent:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = _model_in(field.annotation)
    return list(model.model_fields) if model is not None and hasattr(model, "model_fields") else []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
