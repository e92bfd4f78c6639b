"""The search space of a study over a mergekit config: any parameter, per model, per filter.

Each `search_space` item expands to slots, one per (parameter, model, filter). A slot is K
gradient anchors, one value per block of layers (`blocks: B`), or a categorical choice. The slots
of one location (a global parameter, or a parameter of one model) form that location's mergekit
filter list, in the order written; tensors that no searched filter takes keep the baseline's
setting, appended after the searched entries.

Blocks are exported as mergekit-evolve exports its layer_granularity: the config becomes `slices:`
cut into consecutive runs of layers (B blocks of L layers: block i holds layers [i*L//B,
(i+1)*L//B)), and each slice carries its block's values in its sources' parameters (per-model
parameters) or in its own parameters (global ones). A `models:` config becomes one slice over every
layer first (the base appended when not listed), as mergekit plans it. Every slice restarts a
gradient, so once blocks add cuts, the config may hold no gradient elsewhere. Recipes of such a
space hold, per location, `{"per_slice": [setting of slice 0, ...]}`.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from merge_core import methods
from merge_core.config import MergeConfig, parse_config
from merge_core.methods.base import REQUIRED
from search.errors import StudyError
from search.study_config import SpaceItem

Recipe = dict[str, Any]  # location ("lambda", "weight@<model>") -> its mergekit setting (None: unset)
PER_SLICE = "per_slice"  # a recipe's setting of a location in a space cut into blocks: one per slice


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
    blocks: int | None = None  # one value per block of consecutive layers
    where: str = "search_space"  # the study file item it comes from, for messages

    @property
    def location(self) -> str:
        """Where the setting lives in the config."""
        return self.parameter if self.model is None else f"{self.parameter}@{self.model}"

    def names(self) -> list[str]:
        """Optuna parameter names of this slot."""
        if self.choices is not None:
            return [self.prefix]
        if self.blocks is not None:
            return [f"{self.prefix}.b{i}" for i in range(self.blocks)]
        return [f"{self.prefix}.{i}" for i in range(self.anchors)]


def model_aliases(models: list[str]) -> dict[str, str]:
    """A short readable name per model (its folder or repo name; `model+adapter` for one with a LoRA
    adapter), unique within the config."""
    aliases: dict[str, str] = {}
    for model in models:
        stem = "+".join(re.sub(r"[^A-Za-z0-9_\-]+", "_", Path(part.split("@")[0].rstrip("/")).name)
                        for part in model.split("+")).strip("+") or "model"
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
        self.pieces: list[tuple[int, int]] | None = None  # output layers of each slice, when blocks cut them
        self._absent: set[tuple[str, int]] = set()  # (location, slice) where the location's model is not a source
        self.n_layers: int | None = None  # output layers, known once blocks cut them
        if any(s.blocks for s in self.slots):
            self._cut_into_blocks()
            self.baseline: Recipe = {loc: {PER_SLICE: [self._piece_setting(p, loc) for p in range(len(self.pieces))]}
                                     for loc in self.locations}
        else:
            self.baseline = {loc: self._setting_at(config, loc) for loc in self.locations}

    @classmethod
    def of(cls, docs: list, items: list[SpaceItem], where: str) -> ConfigSpace:
        """The space of a one-stage study: `docs` is its mergekit config as a list of one document."""
        for i, item in enumerate(items):
            if item.stage is not None:
                raise StudyError(f"search_space.{i}.stage: merge.config has one stage; remove stage")
        return cls(parse_config(docs[0] if docs else None, where), items)

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
            hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(known) or 'no parameters'}"
            raise StudyError(f"{where}.parameter: {self.method.name} has no parameter {item.parameter!r}; {hint}")
        if item.blocks is not None and param.kind is not float and param.kind is not int:
            raise StudyError(f"{where}.blocks: {item.parameter} is not a number; search it with choices")
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
                              integer=param.kind is int, blocks=item.blocks, where=where))
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
            if self.pieces is None:
                recipe[location] = self._setting(location, params, self.baseline[location], None)
                continue
            recipe[location] = {PER_SLICE: [
                None if (location, piece) in self._absent else self._setting(location, params, base, piece)
                for piece, base in enumerate(self.baseline[location][PER_SLICE])]}
        return recipe

    def _setting(self, location: str, params: dict[str, Any], baseline, piece: int | None):
        """One location's setting (in one slice, when blocks cut the layers)."""
        slots = [s for s in self.slots if s.location == location]
        entries = []
        for slot in slots:
            if slot.choices is not None:
                value = params[slot.prefix]
            elif slot.blocks is not None:
                value = (int if slot.integer else float)(params[slot.names()[self._block_of(slot, piece)]])
            else:
                anchors = [(int if slot.integer else float)(params[n]) for n in slot.names()]
                value = anchors[0] if len(anchors) == 1 else anchors
            entries.append({"filter": slot.filter, "value": value} if slot.filter else {"value": value})
        if not any(s.filter is None for s in slots):  # tensors no searched filter takes keep the baseline
            searched = {s.filter for s in slots}
            entries += [e for e in _entries(baseline) if e.get("filter") not in searched]
        if len(entries) == 1 and "filter" not in entries[0]:
            return entries[0]["value"]
        return entries

    def params_of(self, recipe: Recipe, where: str = "baseline") -> dict[str, Any]:
        """Parameter values that reproduce a recipe (the baseline), or one line on what lies outside."""
        params: dict[str, Any] = {}
        for slot in self.slots:
            label = f"{where}: {slot.parameter}" + (f" of {slot.model}" if slot.model else "") + (
                f" (filter {slot.filter})" if slot.filter else "")
            if self.pieces is not None:
                params |= self._piece_params(slot, recipe.get(slot.location), where, label)
                continue
            value = self._value_for(slot, recipe.get(slot.location), where)
            if slot.choices is not None:
                if value not in slot.choices:
                    raise StudyError(f"{label} is {value!r}, not one of search_space choices {list(slot.choices)}")
                params[slot.prefix] = value
                continue
            anchors = list(value) if isinstance(value, list | tuple) else [value] * slot.anchors
            if len(anchors) != slot.anchors:
                raise StudyError(f"{label} has {len(anchors)} anchors but search_space asks for {slot.anchors}")
            params |= _numbers(slot, slot.names(), anchors, label)
        return params

    def _piece_params(self, slot: Slot, setting, where: str, label: str) -> dict[str, Any]:
        """A slot's parameter values from a recipe that holds one setting per slice."""
        per_slice = setting[PER_SLICE] if isinstance(setting, dict) and PER_SLICE in setting else (
            [setting] * len(self.pieces))
        values = {piece: self._value_for(slot, s, where) for piece, s in enumerate(per_slice)
                  if (slot.location, piece) not in self._absent}
        if slot.blocks is None:  # one value (or gradient) for every slice
            distinct = list({repr(v): v for v in values.values()}.values())
            if len(distinct) > 1:
                raise StudyError(f"{label} differs between slices ({distinct[0]!r}, {distinct[1]!r}); "
                                 "search it with blocks, or give it one value")
            value = distinct[0]
            if slot.choices is not None:
                if value not in slot.choices:
                    raise StudyError(f"{label} is {value!r}, not one of search_space choices {list(slot.choices)}")
                return {slot.prefix: value}
            anchors = list(value) if isinstance(value, list | tuple) else [value] * slot.anchors
            if len(anchors) != slot.anchors:
                raise StudyError(f"{label} has {len(anchors)} anchors but search_space asks for {slot.anchors}")
            return _numbers(slot, slot.names(), anchors, label)
        per_block = []
        for block in range(slot.blocks):
            start, end = _bounds(self.n_layers, slot.blocks)[block:block + 2]
            inside = {repr(v): v for piece, v in values.items() if self._block_of(slot, piece) == block}
            layers = f"block {block} (layers {start}-{end - 1})"
            if len(inside) > 1:
                a, b = list(inside.values())[:2]
                raise StudyError(f"{label} differs inside {layers}: {a!r} and {b!r}; use blocks that match the "
                                 "config's slices")
            value = next(iter(inside.values()))
            if isinstance(value, list | tuple):
                if len(value) != 1:
                    raise StudyError(f"{label} is the gradient {value!r} in {layers}; blocks search one value per "
                                     "block: give one value per slice")
                value = value[0]
            per_block.append(value)
        return _numbers(slot, slot.names(), per_block, label)

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
        if self.pieces is not None:
            data = copy.deepcopy(self._cut)
            for location, setting in recipe.items():
                per_slice = setting[PER_SLICE] if isinstance(setting, dict) and PER_SLICE in setting else (
                    [setting] * len(self.pieces))
                for sl, value in zip(data["slices"], per_slice, strict=True):
                    if value is not None:
                        _write_in_slice(sl, location, value)
            return MergeConfig.model_validate(data)
        data = self.config.model_dump(exclude_none=True, mode="json")
        for location, setting in recipe.items():
            if setting is not None:
                _write(data, location, setting)
        return MergeConfig.model_validate(data)

    # --- blocks of layers ---------------------------------------------------------------------
    def _cut_into_blocks(self) -> None:
        """The config as slices cut at every block boundary (and its own slice boundaries)."""
        data = self.config.model_dump(exclude_none=True, mode="json")
        if data.get("models") is not None:
            data = _as_one_slice(data, self._layer_count(data["models"][0]["model"]))
        lengths = [sl["sources"][0]["layer_range"][1] - sl["sources"][0]["layer_range"][0] for sl in data["slices"]]
        self.n_layers = sum(lengths)
        starts = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
        cuts = set(starts)
        for slot in self.slots:
            if slot.blocks is None:
                continue
            if slot.blocks > self.n_layers:
                raise StudyError(f"{slot.where}.blocks: {slot.blocks} blocks but the merge has {self.n_layers} "
                                 f"layers; use at most {self.n_layers}")
            cuts |= set(_bounds(self.n_layers, slot.blocks))
        cuts_sorted = sorted(cuts)
        slices, self.pieces = [], []
        for sl, start, end in zip(data["slices"], starts, starts[1:], strict=False):
            inner = [c for c in cuts_sorted if start <= c <= end]
            for a, b in zip(inner, inner[1:], strict=False):
                piece = copy.deepcopy(sl)
                for src in piece["sources"]:
                    first = src["layer_range"][0]
                    src["layer_range"] = [first + a - start, first + b - start]
                slices.append(piece)
                self.pieces.append((a, b))
        data["slices"] = slices
        self._cut = data
        if len(self.pieces) > len(lengths):
            self._refuse_restarted_gradients()

    def _layer_count(self, model: str) -> int:
        from merge_core.layers import layer_count
        from merge_core.refs import config_folder
        from merge_core.weights import read_config

        where = next(s.where for s in self.slots if s.blocks)
        try:
            count = layer_count(read_config(config_folder(model, allow_pickle=True)))
        except Exception as exc:  # a stage name of a chain, a missing folder: no config.json to read
            raise StudyError(f"{where}.blocks: cannot read how many layers {model} has ({exc}); "
                             "give merge.config as slices") from None
        if count is None:
            raise StudyError(f"{where}.blocks: {model}'s config.json does not say how many layers it has; "
                             "give merge.config as slices")
        return count

    def _refuse_restarted_gradients(self) -> None:
        """Each slice restarts a gradient: once blocks add cuts, a gradient elsewhere would change meaning."""
        blocked = {(s.location, s.filter) for s in self.slots if s.blocks}
        first = next(s for s in self.slots if s.blocks)
        for slot in self.slots:
            if slot.anchors is not None and slot.anchors > 1:
                raise StudyError(f"{slot.where}.anchors: {first.where}.blocks cuts the layers into slices, and "
                                 "each slice would restart this gradient; use anchors: 1, or blocks")
        for sl in self._cut["slices"]:
            scopes = [(None, self._cut.get("parameters")), (None, sl.get("parameters"))]
            scopes += [(src["model"], src.get("parameters")) for src in sl["sources"]]
            for model, parameters in scopes:
                for name, setting in (parameters or {}).items():
                    for entry in _entries(setting):
                        value = entry.get("value")
                        location = name if model is None else f"{name}@{model}"
                        if not isinstance(value, list) or len(value) < 2 or (location, entry.get("filter")) in blocked:
                            continue
                        what = name + (f" of {model}" if model else "") + (
                            f" (filter {entry['filter']})" if entry.get("filter") else "")
                        raise StudyError(f"{first.where}.blocks: cutting the layers into blocks restarts the "
                                         f"gradient of {what} in every slice; give it one value, or search it "
                                         "with blocks too")

    def _block_of(self, slot: Slot, piece: int) -> int:
        """The block of `slot` that holds a slice (slices never straddle a block)."""
        start = self.pieces[piece][0]
        bounds = _bounds(self.n_layers, slot.blocks)
        return max(i for i in range(slot.blocks) if bounds[i] <= start)

    def _piece_setting(self, piece: int, location: str):
        """A location's effective setting in one slice: the source's, then the slice's, then the config's."""
        parameter, _, model = location.partition("@")
        sl = self._cut["slices"][piece]
        scopes = [sl.get("parameters"), self._cut.get("parameters")]
        if model:
            sources = [src for src in sl["sources"] if src["model"] == model]
            if not sources:
                self._absent.add((location, piece))  # the model is not in this slice: nothing to write there
                return None
            scopes.insert(0, sources[0].get("parameters"))
        entries = [e for scope in scopes for e in _entries((scope or {}).get(parameter))]
        if not entries:
            return None
        if len(entries) == 1 and "filter" not in entries[0]:
            return entries[0]["value"]
        return entries

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


def _bounds(n_layers: int, blocks: int) -> list[int]:
    """Where each of `blocks` consecutive blocks of layers starts, and the end."""
    return [i * n_layers // blocks for i in range(blocks + 1)]


def _numbers(slot: Slot, names: list[str], values: list, label: str) -> dict[str, Any]:
    """Optuna values of a slot's numbers, or one line on the first outside its range."""
    params = {}
    for name, value in zip(names, values, strict=True):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise StudyError(f"{label} is {value!r}, not a number")
        if not slot.low <= value <= slot.high:
            raise StudyError(f"{label}: {value:g} is outside the searched range [{slot.low:g}, {slot.high:g}]")
        params[name] = int(value) if slot.integer else float(value)
    return params


def _as_one_slice(data: dict, n_layers: int) -> dict:
    """A `models:` config as one slice over every layer (base appended when not listed), as mergekit plans it."""
    sources = [{"model": m["model"], "layer_range": [0, n_layers]} | (
        {"parameters": m["parameters"]} if m.get("parameters") else {}) for m in data.pop("models")]
    if data.get("base_model") and data["base_model"] not in [s["model"] for s in sources]:
        sources.append({"model": data["base_model"], "layer_range": [0, n_layers]})
    return data | {"slices": [{"sources": sources}]}


def _entries(setting) -> list[dict]:
    """A setting as a list of `{filter?, value}` entries."""
    if setting is None:
        return []
    if isinstance(setting, dict):
        return [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        return [dict(e) for e in setting]
    return [{"value": setting}]


def _write_in_slice(sl: dict, location: str, setting) -> None:
    """Write a setting into one slice: a per-model one into the model's source, a global one into the slice."""
    parameter, _, model = location.partition("@")
    if not model:
        sl.setdefault("parameters", {})[parameter] = setting
        return
    for src in sl["sources"]:
        if src["model"] == model:
            src.setdefault("parameters", {})[parameter] = setting


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
