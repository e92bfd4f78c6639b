"""Multi-stage merges (mergekit-multi's YAML): named stages whose outputs later stages merge, in memory.

A chain file holds several mergekit configs as YAML documents; each has a `name:` except at most
one final unnamed document. A later document that names an earlier stage as a model reads that
stage's output. No intermediate model goes to disk: a stage's output is a `StageOutput`, a tensor
source like `ModelWeights` (names, shapes, `get`), whose tensors are merged when read. Stages of
randomised methods are merged whole on first read, in their own order with their own seed, since
mergekit-multi reseeds every stage (`--random-seed`) and draws in each stage's tensor order.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from merge_core.config import MergeConfig, parse_config
from merge_core.errors import MergeInputError
from merge_core.plan import MergePlan
from merge_core.refs import split_adapter


@dataclass(frozen=True)
class Stage:
    """One document of a chain: its name (None for the final unnamed one) and its config."""

    name: str | None
    config: MergeConfig


@dataclass(frozen=True)
class _Info:
    dtype: torch.dtype
    shape: tuple[int, ...]


class StageOutput:
    """A stage's merged model as a tensor source: tensors are merged when read (or all at once if random)."""

    def __init__(self, plan: MergePlan, device: torch.device, seed: int | None, reads_stages: bool = False):
        self.plan = plan
        self.device = device
        self.seed = seed
        self.config = plan.merged_config()
        self.folder = plan.reference.folder  # the tokenizer a later stage copies
        # the stage's own tokenizer where it writes one (tokenizer_source, chat_template), not its donor's files
        self.tokenizer = plan.output_tokenizer()[1]
        self.index = {o.name: _Info(plan.output_dtype(o), tuple(plan.shape(o))) for o in plan.outputs}
        self._by_name = {o.name: i for i, o in enumerate(plan.outputs)}
        self._config = plan.config
        self._values = None
        self._whole: dict[str, torch.Tensor] | None = None
        # what depends on the parents alone is prepared once per study; against a merged input, per candidate
        self._states: dict | None = None if reads_stages else {}

    def use(self, config: MergeConfig, values: list | None = None) -> None:
        """Merge this stage with another config of the same structure from now on (a chain candidate)."""
        self._config = config
        self._values = values  # the plan's values for this config, when the caller has them already
        self._whole = None

    def names(self) -> list[str]:
        """Output tensor names, in merge order."""
        return list(self.index)

    def get(self, name: str) -> torch.Tensor:
        """The merged tensor `name` of this stage."""
        from merge_core.merger import merge_output, stream_tensors

        if self.plan.method.randomised:
            if self._whole is None:
                self._whole = dict(stream_tensors(self.plan, self.device, seed=self.seed, config=self._config))
            return self._whole[name]
        if self._values is None:
            self._values = self.plan.values(self._config)
        i = self._by_name[name]
        return merge_output(self.plan, self.plan.outputs[i], self._values[i], None, self.device, states=self._states)


class ChainPlan:
    """Every stage planned in dependency order; `final` is the stage a chain builds."""

    def __init__(self, stages: list[Stage], allow_pickle: bool = False, device: str | torch.device = "cpu",
                 seed: int | None = None, source: str = "config", truncate_vocabulary: bool = False,
                 allow_crimes: bool = False):
        self.stages = _ordered(stages, source)
        self.device = torch.device(device)
        outputs: dict[str, StageOutput] = {}
        self.plans: list[MergePlan] = []
        self.reads_stages: list[bool] = []  # per stage: whether it merges an earlier stage's output
        for stage in self.stages:
            label = f"{source}: stage {stage.name or '(final)'}"
            try:
                plan = MergePlan(stage.config, allow_pickle, sources=outputs, truncate_vocabulary=truncate_vocabulary,
                                 allow_crimes=allow_crimes)
            except MergeInputError as exc:
                names = [s.name for s in self.stages if s.name]
                typo = [difflib.get_close_matches(m, names, n=1) for m in stage.config.model_names() if m not in names]
                hint = next((f"; did you mean stage {t[0]!r}?" for t in typo if t), "")
                raise type(exc)(f"{label}: {exc}{hint}") from None
            self.plans.append(plan)
            self.reads_stages.append(any(m in outputs for m in stage.config.model_names()))
            if stage.name is not None:
                outputs[stage.name] = StageOutput(plan, self.device, seed, self.reads_stages[-1])
        self.outputs = outputs
        self.seed = seed
        self.final = self.plans[-1]

    def use(self, stages: list[Stage]) -> list:
        """Point every stage at a candidate's configs (same names and structure); the final stage's values."""
        by_name = {s.name: s.config for s in stages}
        if set(by_name) != {s.name for s in self.stages}:
            raise ValueError("a chain candidate must name the same stages as the plan")
        values = []
        for stage, plan in zip(self.stages, self.plans, strict=True):
            values = plan.values(by_name[stage.name])  # same structure, parameters valid: once per candidate
            if stage.name is not None:
                self.outputs[stage.name].use(by_name[stage.name], values)
        return values

    def yaml(self) -> str:
        """The chain as mergekit-multi YAML, stages in dependency order."""
        return chain_yaml(self.stages)


class ChainMerger:
    """Builds a chain candidate into a live model: earlier stages merged per tensor as the final stage reads them.

    What depends on an intermediate (SLERP's theta against a merged tensor) is computed per
    candidate; what a stage prepares from models on disk alone is kept for the study.
    """

    def __init__(self, chain: ChainPlan):
        self.chain = chain
        self.plan = chain.final
        self._live: tuple[torch.nn.Module, dict[str, torch.Tensor]] | None = None
        self._states: dict | None = None if chain.reads_stages[-1] else {}

    @torch.no_grad()
    def build_into(self, model: torch.nn.Module, stages: list[Stage] | None = None) -> None:
        """Write the chain candidate (the plan's own stages when None) into the live model."""
        from merge_core.merger import _generator, live_targets, merge_output, release_free_heap

        first = self._states is not None and not self._states

        final_values = self.chain.use(stages or self.chain.stages)
        if self._live is None or self._live[0] is not model:
            self._live = (model, live_targets(self.plan, model))
        targets = self._live[1]
        plan = self.plan
        rng = _generator(plan, self.chain.device, self.chain.seed)
        for out, values in zip(plan.outputs, final_values, strict=True):
            if out.name not in targets and rng is None:  # a tensor the live model does not have
                continue
            # (drawn into a scratch tensor under a randomised method, so later masks stay `search merge`'s)
            merge_output(plan, out, values, rng, self.chain.device, targets.get(out.name), self._states)
        if first:  # this build ran the per-study prepare of the final stage: drop its temporaries
            release_free_heap()

    def new_model(self) -> torch.nn.Module:
        """An empty live model of the chain's final shape."""
        from merge_core.merger import new_live_model

        return new_live_model(self.plan, self.chain.device)


def chain_yaml(stages: list[Stage]) -> str:
    """Stages as mergekit-multi YAML (documents separated by ---), in the given order."""
    docs = []
    for stage in stages:
        body = stage.config.to_yaml()
        docs.append(f"name: {stage.name}\n{body}" if stage.name else body)
    return "---\n".join(docs)


def is_chain(data_docs: list) -> bool:
    """True when a YAML file holds several documents or a named one (mergekit-multi's format)."""
    return len(data_docs) > 1 or (len(data_docs) == 1 and isinstance(data_docs[0], dict) and "name" in data_docs[0])


def parse_chain(docs: list, source: str = "config") -> list[Stage]:
    """Validate every document; names unique, at most one unnamed document and it comes last."""
    stages: list[Stage] = []
    for i, doc in enumerate(docs):
        where = f"{source}: document {i + 1}"
        if not isinstance(doc, dict):
            raise MergeInputError(f"{where}: expected a mapping of mergekit keys")
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise MergeInputError(f"{where}: name must be a non-empty string")
        if name is None and i != len(docs) - 1:
            raise MergeInputError(f"{where}: only the final document may be unnamed (a later one would have no way "
                                  "to use it); give it a name:")
        if name is not None and any(s.name == name for s in stages):
            raise MergeInputError(f"{where}: stage name {name!r} is used twice")
        stages.append(Stage(name, parse_config(_sorted_tokens(doc), f"{where} ({name or 'final'})")))
    if not stages:
        raise MergeInputError(f"{source}: no merge documents")
    return stages


def _sorted_tokens(doc: dict) -> dict:
    """mergekit-multi rewrites each stage as YAML with sorted keys before merging it, so its
    `tokenizer.tokens` entries are added to the tokenizer in sorted order (mergekit-yaml adds them in
    the order written): new tokens get their ids in that order."""
    section = doc.get("tokenizer")
    if not isinstance(section, dict) or not isinstance(section.get("tokens"), dict):
        return doc
    tokens = dict(sorted(section["tokens"].items(), key=lambda item: str(item[0])))
    return doc | {"tokenizer": section | {"tokens": tokens}}


def _ordered(stages: list[Stage], source: str) -> list[Stage]:
    """Stages in an order where each comes after the stages it merges; the chain's final stage last."""
    names = {s.name: s for s in stages if s.name is not None}
    uses = {s.name: [m for m in s.config.model_names() if m in names] for s in stages}
    for stage in stages:
        for model in stage.config.model_names():
            adapted, adapter = split_adapter(model)
            if adapter is not None and adapted in names:
                raise MergeInputError(
                    f"{source}: stage {stage.name or '(final)'}: {model} puts a LoRA adapter on stage {adapted}, "
                    "which merge-search keeps in memory; build that stage with `search merge` and name its "
                    "folder, or put the adapter on one of its models")
    order: list[Stage] = []
    state: dict = {}

    def visit(stage: Stage, path: list[str]) -> None:
        if state.get(stage.name) == "done":
            return
        if state.get(stage.name) == "visiting":
            cycle = " -> ".join([*path[path.index(stage.name):], stage.name])
            raise MergeInputError(f"{source}: stages depend on each other in a cycle: {cycle}")
        state[stage.name] = "visiting"
        for dep in uses[stage.name]:
            visit(names[dep], [*path, stage.name])
        state[stage.name] = "done"
        order.append(stage)

    for stage in stages:
        visit(stage, [])
    unnamed = [s for s in stages if s.name is None]
    used = {d for deps in uses.values() for d in deps}
    finals = unnamed or [s for s in stages if s.name not in used]
    if len(finals) > 1:
        raise MergeInputError(f"{source}: stages {', '.join(s.name for s in finals)} are all final (no stage uses "
                              "them); add an unnamed final document, or remove the ones you do not want")
    order.remove(finals[0])
    return [*order, finals[0]]
