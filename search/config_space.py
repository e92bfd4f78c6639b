"""The search space of a study over a mergekit config: any parameter, per model, per filter.

Each `search_space` item expands to slots, one per (parameter, model, filter). A slot is K
gradient anchors, or a categorical choice. The slots of one location (a global parameter, or a
parameter of one model) form that location's mergekit filter list, in the order written; tensors
that no searched filter takes keep the baseline's setting, appended after the searched entries.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from merge_core import methods
from merge_core.config import MergeConfig, parse_config, read_yaml_documents
from merge_core.methods.base import REQUIRED
from search.errors import StudyError
from search.study_config import SpaceItem, StudyFile

Recipe = dict[str, Any]  # location ("lambda", "weight@<model>") -> its mergekit setting (None: unset)


@dataclass(frozen=True)
class Slot:
    """One searched (parameter, model, filter): K anchors in [low, high], or one of `choices`."""

    parameter: str
    model: str | None  # None for a global parameter
    filter: str | None  # None: the entry without filter
    anchors: int | None
    low: float
    high: float
    log: bool
    choices: tuple | None
    prefix: str  # Optuna name without the anchor index
    integer: bool = False  # whole numbers only (karcher's max_iter)

    @property
    def location(self) -> str:
        """Where the setting lives in the config."""
        return self.parameter if self.model is None else f"{self.parameter}@{self.model}"

    def names(self) -> list[str]:
        """Optuna parameter names of this slot."""
        return [self.prefix] if self.choices is not None else [f"{self.prefix}.{i}" for i in range(self.anchors)]


def model_aliases(models: list[str]) -> dict[str, str]:
    """A short readable name per model (its folder or repo name), unique within the config."""
    aliases: dict[str, str] = {}
    for model in models:
        stem = re.sub(r"[^A-Za-z0-9_\-]+", "_", Path(model.split("@")[0].rstrip("/")).name) or "model"
        alias, n = stem, 2
        while alias in aliases.values():
            alias, n = f"{stem}_{n}", n + 1
        aliases[model] = alias
    return aliases


class ConfigSpace:
    """Optuna distributions over a mergekit config's numbers; recipes and configs both ways."""

    def __init__(self, config: MergeConfig, items: list[SpaceItem]):
        self.config = config
        self.method = methods.get(config.merge_method)
        self.aliases = model_aliases(config.model_names())
        self.slots = [slot for i, item in enumerate(items) for slot in self._expand(item, f"search_space.{i}")]
        seen: dict[str, str] = {}
        for slot in self.slots:
            key = f"{slot.location} filter {slot.filter or '(none)'}"
            if key in seen:
                raise StudyError(f"search_space: {slot.parameter} for {slot.model or 'all tensors'} with filter "
                                 f"{slot.filter or '(none)'} is listed twice")
            seen[key] = slot.prefix
        self.locations = list(dict.fromkeys(s.location for s in self.slots))
        self.baseline: Recipe = {loc: self._setting_at(config, loc) for loc in self.locations}

    @classmethod
    def of(cls, study: StudyFile):
        """The space of a study file with `merge.config`: a ConfigSpace, or a ChainSpace for several stages."""
        from merge_core.chain import is_chain
        from search.chain_space import ChainSpace

        source = study.merge.config
        docs = read_yaml_documents(source) if isinstance(source, str) else (
            source if isinstance(source, list) else [source])
        where = source if isinstance(source, str) else "merge.config"
        if is_chain(docs):
            return ChainSpace.of(docs, list(study.search_space), where)
        for i, item in enumerate(study.search_space):
            if item.stage is not None:
                raise StudyError(f"search_space.{i}.stage: merge.config has one stage; remove stage")
        return cls(parse_config(docs[0] if docs else None, where), list(study.search_space))

    def parents(self) -> list[str]:
        """Every model the merge reads."""
        return self.config.model_names()

    def yaml_of(self, recipe: Recipe) -> str:
        """The mergekit YAML of a recipe."""
        return self.config_of(recipe).to_yaml()

    # --- slots --------------------------------------------------------------------------------
    def _expand(self, item: SpaceItem, where: str) -> list[Slot]:
        param = self.method.param(item.parameter)
        if param is None:
            known = [p.name for p in self.method.params]
            close = difflib.get_close_matches(item.parameter, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(known)}"
            raise StudyError(f"{where}.parameter: {self.method.name} has no parameter {item.parameter!r}; {hint}")
        if item.blocks is not None:
            raise StudyError(f"{where}.blocks: per-block values are not supported yet; use anchors (a gradient)")
        if param.kind is bool and item.choices is None:
            raise StudyError(f"{where}: {item.parameter} is true/false; search it with choices: [true, false]")
        if param.scope == "global":
            if item.models is not None:
                raise StudyError(f"{where}.models: {item.parameter} is one value for all models; remove models")
            models: list[str | None] = [None]
        else:
            models = self._models(item, param.scope, where)
        flt = item.filter or "default"
        slots = []
        for model in models:
            prefix = item.parameter if model is None else f"{item.parameter}.{self.aliases[model]}"
            slots.append(Slot(item.parameter, model, item.filter, item.anchors, item.low, item.high, item.log,
                              tuple(item.choices) if item.choices is not None else None, f"{prefix}.{flt}",
                              integer=param.kind is int))
        return slots

    def _models(self, item: SpaceItem, scope: str, where: str) -> list[str]:
        eligible = [m for m in self.config.model_names()
                    if scope == "per_model" or m != self.config.base_model]
        if item.models in (None, "all"):
            return eligible
        by_name = {m: m for m in eligible} | {self.aliases[m]: m for m in eligible}
        chosen = []
        for name in item.models:
            if name not in by_name:
                raise StudyError(f"{where}.models: {name!r} is not a model this parameter applies to; "
                                 f"use one of {', '.join(self.aliases[m] for m in eligible)}")
            chosen.append(by_name[name])
        return chosen

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Every searched value and its distribution, in search_space order."""
        out: dict[str, optuna.distributions.BaseDistribution] = {}
        for slot in self.slots:
            for name in slot.names():
                if slot.choices is not None:
                    out[name] = optuna.distributions.CategoricalDistribution(slot.choices)
                elif slot.integer:
                    out[name] = optuna.distributions.IntDistribution(int(slot.low), int(slot.high), log=slot.log)
                else:
                    out[name] = optuna.distributions.FloatDistribution(slot.low, slot.high, log=slot.log)
        return out

    # --- recipes ------------------------------------------------------------------------------
    def suggest(self, trial: optuna.Trial) -> Recipe:
        """Sample a recipe for a trial."""
        return self.recipe(suggest_all(trial, self.distributions()))

    def recipe(self, params: dict[str, Any]) -> Recipe:
        """Each searched location's mergekit setting for these parameter values."""
        recipe: Recipe = {}
        for location in self.locations:
            slots = [s for s in self.slots if s.location == location]
            entries = []
            for slot in slots:
                if slot.choices is not None:
                    value = params[slot.prefix]
                else:
                    anchors = [(int if slot.integer else float)(params[n]) for n in slot.names()]
                    value = anchors[0] if len(anchors) == 1 else anchors
                entries.append({"filter": slot.filter, "value": value} if slot.filter else {"value": value})
            if not any(s.filter is None for s in slots):  # tensors no searched filter takes keep the baseline
                searched = {s.filter for s in slots}
                entries += [e for e in _entries(self.baseline[location]) if e.get("filter") not in searched]
            if len(entries) == 1 and "filter" not in entries[0]:
                recipe[location] = entries[0]["value"]
            else:
                recipe[location] = entries
        return recipe

    def params_of(self, recipe: Recipe, where: str = "baseline") -> dict[str, Any]:
        """Parameter values that reproduce a recipe (the baseline), or one line on what lies outside."""
        params: dict[str, Any] = {}
        for slot in self.slots:
            value = self._value_for(slot, recipe.get(slot.location), where)
            label = f"{where}: {slot.parameter}" + (f" of {slot.model}" if slot.model else "") + (
                f" (filter {slot.filter})" if slot.filter else "")
            if slot.choices is not None:
                if value not in slot.choices:
                    raise StudyError(f"{label} is {value!r}, not one of search_space choices {list(slot.choices)}")
                params[slot.prefix] = value
                continue
            anchors = list(value) if isinstance(value, list | tuple) else [value] * slot.anchors
            if len(anchors) != slot.anchors:
                raise StudyError(f"{label} has {len(anchors)} anchors but search_space asks for {slot.anchors}")
            for name, anchor in zip(slot.names(), anchors, strict=True):
                if isinstance(anchor, bool) or not isinstance(anchor, int | float):
                    raise StudyError(f"{label} is {anchor!r}, not a number")
                if not slot.low <= anchor <= slot.high:
                    raise StudyError(f"{label}: {anchor:g} is outside the searched range [{slot.low:g}, {slot.high:g}]")
                params[name] = int(anchor) if slot.integer else float(anchor)
        return params

    def _value_for(self, slot: Slot, setting, where: str):
        if setting is None:
            default = self.method.param(slot.parameter).default
            if default is None or default is REQUIRED:
                raise StudyError(f"{where}: sets no {slot.parameter}" + (f" for {slot.model}" if slot.model else "")
                                 + ", which search_space searches")
            return default
        entries = _entries(setting)
        match = next((e for e in entries if e.get("filter") == slot.filter), None)
        if match is None:  # a filter the baseline does not name takes the baseline's unfiltered value
            match = next((e for e in entries if e.get("filter") is None), None)
        if match is None:
            raise StudyError(f"{where}: {slot.parameter}" + (f" of {slot.model}" if slot.model else "")
                             + f" has no entry for filter {slot.filter or '(none)'} and no entry without filter")
        return match["value"]

    def config_of(self, recipe: Recipe) -> MergeConfig:
        """The baseline config with the recipe's settings written in."""
        data = self.config.model_dump(exclude_none=True, mode="json")
        for location, setting in recipe.items():
            if setting is not None:
                _write(data, location, setting)
        return MergeConfig.model_validate(data)

    # --- where settings live ------------------------------------------------------------------
    def _setting_at(self, config: MergeConfig, location: str):
        data = config.model_dump(exclude_none=True, mode="json")
        parameter, _, model = location.partition("@")
        if not model:
            return (data.get("parameters") or {}).get(parameter)
        for entry in data.get("models") or []:
            if entry["model"] == model:
                return (entry.get("parameters") or {}).get(parameter)
        for sl in data.get("slices") or []:
            for src in sl["sources"]:
                if src["model"] == model and parameter in (src.get("parameters") or {}):
                    return src["parameters"][parameter]
        return None


def suggest_all(trial: optuna.Trial, distributions: dict) -> dict[str, Any]:
    """Ask the trial for every distribution, by name."""
    params = {}
    for name, dist in distributions.items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            params[name] = trial.suggest_int(name, dist.low, dist.high, log=dist.log)
        else:
            params[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    return params


def _entries(setting) -> list[dict]:
    """A setting as a list of `{filter?, value}` entries."""
    if setting is None:
        return []
    if isinstance(setting, dict):
        return [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        return [dict(e) for e in setting]
    return [{"value": setting}]


def _write(data: dict, location: str, setting) -> None:
    parameter, _, model = location.partition("@")
    if not model:
        data.setdefault("parameters", {})[parameter] = setting
        return
    for entry in data.get("models") or []:
        if entry["model"] == model:
            entry.setdefault("parameters", {})[parameter] = setting
    for sl in data.get("slices") or []:
        for src in sl["sources"]:
            if src["model"] == model:
                src.setdefault("parameters", {})[parameter] = setting
