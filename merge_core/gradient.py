"""The value of a merge parameter for one tensor: filters, then the gradient rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FilterValue:
    """One `{filter, value}` entry; filter None matches every tensor."""

    value: float | tuple[float, ...]
    filter: str | None = None

    def matches(self, tensor_name: str) -> bool:
        """mergekit's rule: no filter or `*` matches all, else a substring match."""
        return self.filter is None or self.filter == "*" or self.filter in tensor_name


Setting = float | Sequence[float] | Sequence[FilterValue]


def position(index: int, count: int) -> float:
    """Where layer `index` of a slice of `count` layers sits on the gradient (0..1)."""
    return index / (count - 1) if count > 1 else 1.0


def interpolate(anchors: Sequence[float], p: float) -> float:
    """Anchors spread evenly on [0, 1], linearly interpolated at p (as mergekit does it)."""
    scaled = p * (len(anchors) - 1)
    i0 = int(scaled)
    i1 = min(len(anchors) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * anchors[i0] + frac * anchors[i1]


def evaluate(setting: Setting, tensor_name: str, p: float):
    """The parameter value for a tensor at gradient position p; None when no filter matches.

    Numbers interpolate; a list holding booleans or strings picks the entry at int(p * (K - 1)),
    as mergekit does for discrete parameters.
    """
    if isinstance(setting, bool | str):
        return setting
    if isinstance(setting, int | float):
        return float(setting)
    entries = list(setting)
    if not entries:
        return None
    if all(isinstance(e, FilterValue) for e in entries):
        for entry in entries:
            if entry.matches(tensor_name):
                return evaluate(entry.value, tensor_name, p)
        return None
    if any(isinstance(e, bool | str) for e in entries):
        return entries[int(p * (len(entries) - 1))]
    return float(interpolate([float(v) for v in entries], p))
