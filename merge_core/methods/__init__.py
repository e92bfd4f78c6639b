"""Merge methods by mergekit's `merge_method` name."""

from __future__ import annotations

import difflib

from merge_core.errors import MergeInputError
from merge_core.methods.arcee_fusion import ArceeFusion
from merge_core.methods.base import MergeMethod
from merge_core.methods.karcher import Karcher
from merge_core.methods.linear import Linear
from merge_core.methods.model_stock import ModelStock
from merge_core.methods.multislerp import MultiSlerp
from merge_core.methods.nearswap import NearSwap
from merge_core.methods.nuslerp import NuSlerp
from merge_core.methods.passthrough import Passthrough
from merge_core.methods.ram import Ram, RamPlusTl
from merge_core.methods.sce import Sce
from merge_core.methods.slerp import Slerp
from merge_core.methods.task_arithmetic import (
    Breadcrumbs,
    BreadcrumbsTies,
    DareLinear,
    DareTies,
    Della,
    DellaLinear,
    TaskArithmetic,
    Ties,
)

REGISTRY: dict[str, MergeMethod] = {
    m.name: m for m in (
        Linear(), Slerp(), TaskArithmetic(), Ties(), DareTies(), DareLinear(), Breadcrumbs(), BreadcrumbsTies(),
        Della(), DellaLinear(), ModelStock(), Passthrough(),
        NuSlerp(), MultiSlerp(), Sce(), Karcher(), NearSwap(), ArceeFusion(), Ram(), RamPlusTl(),
    )
}

# every parameter some method takes: a config may carry one its method ignores, as mergekit's do
PARAMETER_NAMES = frozenset(p.name for m in REGISTRY.values() for p in m.params)


def get(name: str) -> MergeMethod:
    """The method mergekit calls `name`; a one-line error with the closest name otherwise."""
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, REGISTRY, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(REGISTRY))}"
    raise MergeInputError(f"merge_method: unknown method {name!r}{hint}")


def names() -> list[str]:
    """Every supported method name."""
    return sorted(REGISTRY)
