"""The interface every merge method implements, and the values it is called with.

A method declares its parameters and its input contract, prepares once per study whatever does
not depend on the searched parameters (`prepare`), and writes one output tensor per candidate
(`merge`). Inputs arrive already cast to the merge's working dtype, in mergekit's model order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

REQUIRED = object()  # the default of a parameter the config must give
Scope = Literal["global", "per_model", "per_non_base"]


class DegenerateValues(ValueError):
    """Values that make this one point a NaN merge (see errors.DegeneratePoint)."""


def refuse_zero_sum(weights: list[float], switch: str, dtype: torch.dtype) -> None:
    """Weights that a method divides by their sum must not sum to 0 in the dtype it sums them in:
    mergekit writes NaN or infinite tensors then (0/0, x/0)."""
    if torch.tensor(weights, dtype=dtype).sum().item() == 0:
        listed = ", ".join(f"{w:g}" for w in weights)
        raise DegenerateValues(f"the weights ({listed}) sum to 0 and {switch} is true: dividing by their sum would "
                               f"write NaN or infinite tensors; give weights whose sum is not 0, or set {switch}: "
                               "false")


class InputValueError(ValueError):
    """A value out of range for one input (`position` in the output's sources)."""

    def __init__(self, position: int, message: str):
        super().__init__(message)
        self.position = position


@dataclass(frozen=True)
class Param:
    """One parameter: its name, type, scope (mergekit's SHARED / INPUT / NON_BASE) and default."""

    name: str
    kind: type  # float or bool
    scope: Scope = "global"
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        """True when a config must set it."""
        return self.default is REQUIRED

    def coerce(self, value: Any) -> Any:
        """The value as this parameter's type; raises ValueError with what is wrong."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int | float) and value in (0, 1):
                return bool(value)
            raise ValueError(f"must be true or false, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number, got {value!r}")
        return float(value)


@dataclass(frozen=True)
class Contract:
    """Which inputs a method takes: base required / optional / ignored, and how many inputs."""

    base: Literal["required", "optional", "ignored"] = "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None

    def check(self, models: list[str], base: str | None) -> str | None:
        """What is wrong with these inputs, or None."""
        if self.base == "ignored":
            base = None
        if base is not None and base not in models:
            return f"base_model {base} is not among the merged models {models}"
        if self.base == "required" and base is None:
            return "this method needs a base_model"
        if len(models) < self.min_inputs:
            return f"this method needs at least {self.min_inputs} models, got {len(models)}"
        if self.max_inputs is not None and len(models) > self.max_inputs:
            what = f"exactly {self.min_inputs}" if self.min_inputs == self.max_inputs else f"at most {self.max_inputs}"
            return f"this method takes {what} models, got {len(models)}"
        return None


@dataclass(frozen=True)
class Inputs:
    """The tensors one output is made from, in mergekit's order, and which one is the base."""

    tensors: tuple[torch.Tensor, ...]
    base: int | None = None
    name: str = ""

    @property
    def base_tensor(self) -> torch.Tensor:
        """The base model's tensor."""
        return self.tensors[self.base]

    @property
    def non_base(self) -> tuple[int, ...]:
        """Positions of the inputs that are not the base."""
        return tuple(i for i in range(len(self.tensors)) if i != self.base)


@dataclass(frozen=True)
class Values:
    """Resolved parameter values for one output tensor: global ones and one dict per input."""

    shared: dict[str, Any] = field(default_factory=dict)
    per_input: tuple[dict[str, Any], ...] = ()

    def of(self, name: str, positions) -> list:
        """A per-model parameter for the inputs at these positions."""
        return [self.per_input[i][name] for i in positions]


class MergeMethod:
    """Base class: subclasses set `name`, `params`, `contract` and implement `merge`."""

    name: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    contract: ClassVar[Contract] = Contract()
    randomised: ClassVar[bool] = False  # draws from the RNG: needs a seed to be reproducible
    float32_result: ClassVar[bool] = False  # mergekit returns (and, without out_dtype, writes) float32

    def result_dtype(self, working: torch.dtype) -> torch.dtype:
        """The dtype mergekit's kernel returns for inputs of the working dtype."""
        return torch.promote_types(working, torch.float32) if self.float32_result else working

    def check(self, values: Values, where: str, dtype: torch.dtype) -> None:
        """Raise ValueError when values are out of the method's range (beyond their types); an
        InputValueError where one input's values are, so that the message can name its model;
        DegenerateValues where they make this one point a NaN merge. `dtype`: the working dtype."""

    def prepare(self, inputs: Inputs) -> Any:
        """Work that depends on the inputs only (once per study); the default keeps nothing."""
        return None

    def merge(self, out: torch.Tensor, inputs: Inputs, state: Any, values: Values,
              rng: torch.Generator | None) -> None:
        """Write the merged tensor into `out` (its dtype may differ from the inputs')."""
        raise NotImplementedError

    def param(self, name: str) -> Param | None:
        """The parameter called `name`, if this method has it."""
        return next((p for p in self.params if p.name == name), None)
