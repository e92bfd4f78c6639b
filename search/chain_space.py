"""The search space of a multi-stage study: one ConfigSpace per stage, parameters named by stage.

A chain study's `merge.config` is a mergekit-multi file (or an inline list of documents). Each
`search_space` item names its `stage` (`final` for the unnamed last document); its Optuna
parameters are `<stage>.<parameter>.<model>.<filter>.<i>`. The baseline is the whole chain as
written, and every candidate is a whole chain, built in memory and exported for mergekit-multi.
"""

from __future__ import annotations

from typing import Any

import optuna

from merge_core.chain import Stage, chain_yaml, parse_chain
from search.config_space import ConfigSpace, suggest_all
from search.errors import StudyError
from search.study_config import SpaceItem

FINAL = "final"  # the label of the unnamed last document


class ChainSpace:
    """Optuna distributions over the numbers of every stage of a chain."""

    def __init__(self, stages: list[Stage], items: list[SpaceItem]):
        self.stages = stages
        labels = [s.name or FINAL for s in stages]
        for i, item in enumerate(items):
            if item.stage not in labels:
                hint = "required in a chain study" if item.stage is None else f"no stage {item.stage!r}"
                raise StudyError(f"search_space.{i}.stage: {hint}; use one of {', '.join(labels)}")
        self.spaces = {label: ConfigSpace(stage.config, [i for i in items if i.stage == label])
                       for label, stage in zip(labels, stages, strict=True)}
        self.baseline = {label: space.baseline for label, space in self.spaces.items()}
        self.config = stages[-1].config  # the final stage, for what reads one config

    @classmethod
    def of(cls, docs: list, items: list[SpaceItem], source: str) -> ChainSpace:
        """The space of a chain file's documents."""
        return cls(parse_chain(docs, source), items)

    def parents(self) -> list[str]:
        """Every model the chain reads from disk or the Hub (stage names excluded)."""
        names = {s.name for s in self.stages}
        return list(dict.fromkeys(m for s in self.stages for m in s.config.model_names() if m not in names))

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Every searched value of every stage."""
        return {f"{label}.{name}": d for label, space in self.spaces.items()
                for name, d in space.distributions().items()}

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample a chain recipe for a trial."""
        return self.recipe(suggest_all(trial, self.distributions()))

    def recipe(self, params: dict[str, Any]) -> dict[str, Any]:
        """Each stage's recipe for these parameter values."""
        return {label: space.recipe({n.removeprefix(f"{label}."): v for n, v in params.items()
                                     if n.startswith(f"{label}.")})
                for label, space in self.spaces.items()}

    def params_of(self, recipe: dict[str, Any], where: str = "baseline") -> dict[str, Any]:
        """Parameter values that reproduce a chain recipe, or one line on what lies outside the space."""
        return {f"{label}.{n}": v for label, space in self.spaces.items()
                for n, v in space.params_of(recipe[label], f"{where} (stage {label})").items()}

    def config_of(self, recipe: dict[str, Any]) -> list[Stage]:
        """The chain a recipe builds."""
        return [Stage(s.name, self.spaces[s.name or FINAL].config_of(recipe[s.name or FINAL])) for s in self.stages]

    def yaml_of(self, recipe: dict[str, Any]) -> str:
        """The mergekit-multi YAML of a chain recipe."""
        return chain_yaml(self.config_of(recipe))
