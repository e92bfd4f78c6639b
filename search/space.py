"""Search space <-> candidate: Optuna parameters and the mergekit config each trial builds.

Two forms. A SLERP study (two parents, `search_space` keyed by filter) searches t only, with
parameters `t.<filter>.<i>` and the t list as its recipe. A study over a mergekit config
(`merge.config`) searches any of its numbers (`ConfigSpace`): parameters
`<parameter>.<model>.<filter>.<i>` (`<parameter>.<filter>.<i>` for global ones), and a recipe
mapping each searched location (`weight@<model>`, `lambda`...) to its mergekit setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from pydantic import ValidationError

from merge_core.config import SlerpConfig, describe_validation_error
from search.errors import StudyError
from search.study_config import DEFAULT_FILTER, SpaceEntry, StudyFile

Recipe = list[dict]  # mergekit `parameters.t`: [{filter: ..., value: ...}, ..., {value: ...}]


def param_name(filter_name: str, index: int) -> str:
    """The readable Optuna parameter name of one anchor."""
    return f"t.{filter_name}.{index}"


@dataclass(frozen=True)
class SearchSpace:
    """The per-filter t-gradients a study searches."""

    entries: dict[str, SpaceEntry]
    config: SlerpConfig | None = None  # the baseline's config, which recipes change the t of

    def distributions(self) -> dict[str, optuna.distributions.FloatDistribution]:
        """Every searched anchor and its range, in recipe order."""
        out = {}
        for name, entry in self.entries.items():
            for i in range(entry.anchors or 0):
                out[param_name(name, i)] = optuna.distributions.FloatDistribution(entry.low, entry.high)
        return out

    def suggest(self, trial: optuna.Trial) -> Recipe:
        """Sample a recipe for a trial."""
        params = {name: trial.suggest_float(name, d.low, d.high) for name, d in self.distributions().items()}
        return self.recipe(params)

    def recipe(self, params: dict[str, float]) -> Recipe:
        """The mergekit t list for a set of parameter values."""
        recipe = []
        for name, entry in self.entries.items():
            if entry.value is not None:
                value = entry.value
            else:
                anchors = [float(params[param_name(name, i)]) for i in range(entry.anchors)]
                value = anchors[0] if len(anchors) == 1 else anchors
            recipe.append({"value": value} if name == DEFAULT_FILTER else {"filter": name, "value": value})
        return recipe

    def config_of(self, recipe: Recipe) -> SlerpConfig:
        """The mergekit config a recipe builds."""
        return self.config.with_t(recipe)

    def params_of(self, recipe: Recipe, where: str = "baseline") -> dict[str, float]:
        """Parameter values that reproduce a recipe (the baseline), or a clear error."""
        by_filter = {entry.get("filter") or DEFAULT_FILTER: entry["value"] for entry in recipe}
        params = {}
        for name, entry in self.entries.items():
            if entry.anchors is None:
                continue
            if name not in by_filter:
                raise StudyError(f"{where}: no entry for filter {name!r}, which search_space searches")
            value = by_filter[name]
            anchors = value if isinstance(value, list) else [value]
            if len(anchors) != entry.anchors:
                raise StudyError(
                    f"{where}: {name!r} has {len(anchors)} anchors but search_space.{name}.anchors is {entry.anchors}"
                )
            for i, anchor in enumerate(anchors):
                if not entry.low <= anchor <= entry.high:
                    raise StudyError(
                        f"{where}: {name!r} anchor {anchor} is outside search_space.{name} [{entry.low}, {entry.high}]"
                    )
                params[param_name(name, i)] = float(anchor)
        return params


def space_of(study: StudyFile):
    """The search space of a study file: a SearchSpace (SLERP form), a ConfigSpace, or a ChainSpace (stages)."""
    if study.is_generic():
        from merge_core.chain import is_chain
        from merge_core.config import read_yaml_documents
        from search.chain_space import ChainSpace
        from search.config_space import ConfigSpace

        source = study.merge.config
        docs = read_yaml_documents(source) if isinstance(source, str) else (
            source if isinstance(source, list) else [source])
        where = source if isinstance(source, str) else "merge.config"
        kind = ChainSpace if is_chain(docs) else ConfigSpace
        return kind.of(docs, list(study.search_space), where)
    return SearchSpace(dict(study.search_space), merge_config(study, _slerp_baseline(study)))


def baseline_recipe(study: StudyFile):
    """The baseline's recipe: the hand-written t (SLERP form), or the config's searched settings."""
    if study.is_generic():
        return space_of(study).baseline
    return _slerp_baseline(study)


def _slerp_baseline(study: StudyFile) -> Recipe:
    baseline = study.baseline
    if isinstance(baseline, int | float) or (isinstance(baseline, list) and baseline and
                                              isinstance(baseline[0], int | float)):
        return [{"value": baseline}]
    return [e.model_dump(exclude_none=True) for e in baseline]


def merge_config(study: StudyFile, recipe) -> SlerpConfig:
    """The mergekit config of one candidate."""
    if study.is_generic():
        return space_of(study).config_of(recipe)
    merge = study.merge
    other = next(m for m in merge.models if m != merge.base_model)
    body: dict = {"merge_method": "slerp", "base_model": merge.base_model, "dtype": merge.dtype,
                  "parameters": {"t": recipe}}
    if merge.tokenizer_source:
        body["tokenizer_source"] = merge.tokenizer_source
    if merge.slices is not None:
        body["slices"] = [s.model_dump(exclude_none=True) for s in merge.slices]
    elif merge.layer_range is not None:
        rng = list(merge.layer_range)
        body["slices"] = [{"sources": [{"model": merge.base_model, "layer_range": rng},
                                       {"model": other, "layer_range": rng}]}]
    else:
        body["models"] = [{"model": merge.base_model}, {"model": other}]
    try:
        return SlerpConfig.model_validate(body)
    except ValidationError as exc:
        raise StudyError(f"merge: {describe_validation_error(exc)}") from None
