"""Checkpoint layout to transformers' model layout: the tensor names a merge reads and writes.

transformers 5 keeps some models in another layout than their checkpoints: a Mixtral or Qwen-MoE
checkpoint stores one tensor per expert (`block_sparse_moe.experts.3.w1.weight`), the model one
stacked tensor per layer (`mlp.experts.gate_up_proj`, the experts' w1 and w3 stacked, then
concatenated). mergekit merges the model layout: it builds each such tensor from the checkpoint
with transformers' own conversion table, so a method that reduces over a whole tensor (TIES'
magnitude threshold, SLERP's angle, model_stock's cosines) sees all experts at once, and writes it
under the model-layout name. We read transformers' table the same way (renamings, stacking
experts along a new first dim, concatenating along a dim) and refuse, in one line, a conversion
that needs another operation.

Only checkpoints with per-expert tensors (`.experts.N.`) are converted: other models keep their
checkpoint names (the table's renamings of legacy names change no value), and reading transformers'
table imports modules (torch.distributed among them) that a dense model does not need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from merge_core.errors import MergeInputError

PER_EXPERT = re.compile(r"\.experts\.\d+\.")


@dataclass(frozen=True)
class Converted:
    """A model-layout tensor made from checkpoint tensors: per source pattern, its tensors (in expert
    order) stacked along `stack_dim` (None: one tensor, as it is), then the parts concatenated along
    `concat_dim` (None: one part)."""

    groups: tuple[tuple[str, ...], ...]  # checkpoint tensor names, per source pattern
    stack_dim: int | None
    concat_dim: int | None

    def shape(self, shape_of) -> tuple[int, ...]:
        stacked = [_stacked_shape([tuple(shape_of(n)) for n in group], self.stack_dim) for group in self.groups]
        if self.concat_dim is None:
            return stacked[0]
        out = list(stacked[0])
        out[self.concat_dim] = sum(s[self.concat_dim] for s in stacked)
        return tuple(out)

    def build(self, get) -> torch.Tensor:
        stacks = [get(group[0]) if self.stack_dim is None else torch.stack([get(n) for n in group], dim=self.stack_dim)
                  for group in self.groups]
        return stacks[0] if self.concat_dim is None else torch.cat(stacks, dim=self.concat_dim)


def model_layout(model_type: str | None, names: list[str]) -> tuple[dict[str, str], dict[str, Converted]]:
    """(model-layout name -> checkpoint name for renamed tensors, model-layout name -> how to build it)
    for a checkpoint of `model_type` holding `names`; both empty when the layouts agree."""
    if not any(PER_EXPERT.search(n) for n in names):
        return {}, {}
    transforms = _conversion_table(model_type)
    if not transforms:
        return {}, {}
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    current: dict[str, str | Converted] = {n: n for n in names}
    for transform in transforms:
        if not isinstance(transform, WeightRenaming | WeightConverter):
            _refuse_if_it_applies(transform, current)
            continue
        renamed: dict[str, str | Converted] = {}
        matched: dict[str, dict[str, list[tuple[str, str | Converted]]]] = {}
        for key in sorted(current, key=_natural):
            new_key, pattern = transform.rename_source_key(key)
            if pattern is None:
                renamed[key] = current[key]
            elif isinstance(transform, WeightRenaming):
                renamed[new_key] = current[key]
            else:
                matched.setdefault(new_key, {}).setdefault(pattern, []).append((key, current[key]))
        for target, by_pattern in matched.items():
            renamed[target] = _converted(transform, target, by_pattern)
        current = renamed
    renames = {k: v for k, v in current.items() if isinstance(v, str) and k != v}
    converted = {k: v for k, v in current.items() if isinstance(v, Converted)}
    return renames, converted


def model_names(model, names: list[str]) -> dict[str, str]:
    """The name a live transformers `model` gives each checkpoint tensor name it loads under another:
    the plain renamings transformers collects for the model and its sub-models (Mistral3's
    `language_model.model.*` is `model.language_model.*`), applied as its loader applies them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    if not names:
        return {}
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    own = model.state_dict()
    renamed = {}
    for name in names:
        target, _ = rename_source_key(name, renamings, [], model.base_model_prefix, own)
        if target != name:
            renamed[name] = target
    return renamed


def _refuse_if_it_applies(transform, current: dict) -> None:
    """A kind of conversion merge-search does not reproduce: refused when it matches a tensor."""
    for pattern in getattr(transform, "source_patterns", []):
        hit = next((k for k in current if re.search(pattern, k)), None)
        if hit is not None:
            raise MergeInputError(f"{hit}: transformers converts it with {type(transform).__name__}, which "
                                  "merge-search does not reproduce; merge a checkpoint saved in model layout")


def _conversion_table(model_type: str | None) -> list:
    if not model_type:
        return []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # a transformers without conversion tables keeps checkpoint names
        return []
    return list(get_checkpoint_conversion_mapping(model_type) or [])


def _converted(transform, target: str, by_pattern: dict[str, list[tuple[str, str | Converted]]]) -> Converted:
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in transform.operations]
    kinds = [k for k, _ in ops]
    patterns = list(transform.source_patterns)
    if kinds not in (["MergeModulelist"], ["MergeModulelist", "Concatenate"], ["Concatenate"]) \
            or len(transform.target_patterns) != 1:
        raise MergeInputError(f"{target}: transformers builds it from the checkpoint with {' + '.join(kinds)}, "
                              "which merge-search does not reproduce; merge a checkpoint saved in model layout")
    groups = []
    for pattern in patterns:
        entries = by_pattern.get(pattern, [])
        if not entries or any(not isinstance(source, str) for _, source in entries):
            raise MergeInputError(f"{target}: the checkpoint lacks the tensors {pattern!r} it is built from")
        groups.append(tuple(source for _, source in entries))
    if len({len(g) for g in groups}) != 1:
        raise MergeInputError(f"{target}: the checkpoint has a different number of tensors per part "
                              f"({', '.join(str(len(g)) for g in groups)})")
    stack = ops[0][1] if kinds[0] == "MergeModulelist" else None
    concat = ops[-1][1] if kinds[-1] == "Concatenate" else None
    if stack is None and any(len(g) != 1 for g in groups):
        raise MergeInputError(f"{target}: several checkpoint tensors per part but nothing stacks them")
    if concat is None and len(groups) != 1:
        raise MergeInputError(f"{target}: {len(groups)} parts but no concatenation in transformers' table")
    return Converted(tuple(groups), stack, concat)


def _stacked_shape(shapes: list[tuple[int, ...]], dim: int | None) -> tuple[int, ...]:
    if dim is None:
        return shapes[0]
    if len(set(shapes)) != 1:
        raise MergeInputError(f"tensors stacked into one model-layout tensor differ in shape: {sorted(set(shapes))}")
    out = list(shapes[0])
    out.insert(dim, len(shapes))
    return tuple(out)


def _natural(name: str):
    """Sort key with numbers compared as numbers (expert 10 after expert 9), as transformers orders experts."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"([0-9]+)", name))
