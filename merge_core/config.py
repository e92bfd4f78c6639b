"""mergekit SLERP configs: read, validate with errors that name the field, write back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merge_core.errors import MergeInputError
from merge_core.gradient import FilterValue

Scalar = float
ParameterValue = Scalar | list[Scalar]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionalValue(_Strict):
    """`{filter: self_attn, value: [0, 0.5, 1]}`; no filter matches every tensor."""

    value: ParameterValue
    filter: str | None = None

    @field_validator("value")
    @classmethod
    def _anchors_not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("a gradient needs at least one anchor")
        return value


TSetting = Scalar | list[Scalar] | list[ConditionalValue]


class Parameters(_Strict):
    """Merge parameters; SLERP has one, the interpolation factor t."""

    t: TSetting

    @field_validator("t", mode="before")
    @classmethod
    def _single_entry(cls, value):
        return [value] if isinstance(value, dict) else value


class SliceSource(_Strict):
    """One model's contiguous run of layers inside a slice."""

    model: str
    layer_range: tuple[int, int]

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value):
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"must be [start, end) with 0 <= start < end, got {list(value)}")
        return value


class Slice(_Strict):
    """Output layers made from the same number of layers of each source model."""

    sources: list[SliceSource] = Field(min_length=2, max_length=2)
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _same_length(self):
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError("every source of a slice must span the same number of layers")
        return self


class ModelEntry(_Strict):
    """A whole model in the `models:` form."""

    model: str


class SlerpConfig(_Strict):
    """A mergekit `merge_method: slerp` config, the subset merge-search builds and searches."""

    merge_method: str
    base_model: str
    slices: list[Slice] | None = None
    models: list[ModelEntry] | None = None
    parameters: Parameters | None = None
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    tokenizer_source: str | None = None

    @field_validator("merge_method")
    @classmethod
    def _slerp_only(cls, value):
        if value != "slerp":
            raise ValueError(f"merge-search builds slerp merges only, got {value!r}")
        return value

    @model_validator(mode="after")
    def _shape(self):
        if (self.slices is None) == (self.models is None):
            raise ValueError("give either `slices` or `models`, not both or neither")
        if self.models is not None and len(self.models) != 2:
            raise ValueError("models: slerp merges exactly two models")
        if self.slices is not None and not self.slices:
            raise ValueError("slices: needs at least one slice")
        for model_pair in self.model_pairs():
            if self.base_model not in model_pair:
                raise ValueError(f"base_model {self.base_model!r} must be one of the merged models {model_pair}")
            if model_pair[0] == model_pair[1]:
                raise ValueError("slerp needs two different models")
        if self.parameters is None and (self.models is not None or any(s.parameters is None for s in self.slices)):
            raise ValueError("parameters.t is required")
        return self

    def model_pairs(self) -> list[list[str]]:
        """The two model names of each slice (or of the whole merge)."""
        if self.models is not None:
            return [[m.model for m in self.models]]
        return [[s.model for s in sl.sources] for sl in self.slices or []]

    def other_model(self) -> str:
        """The model that is not the base (v1 in SLERP)."""
        return next(m for m in self.model_pairs()[0] if m != self.base_model)

    def with_t(self, t: TSetting) -> SlerpConfig:
        """The same merge with another global t and no per-slice t."""
        slices = [s.model_copy(update={"parameters": None}) for s in self.slices] if self.slices else None
        return self.model_copy(update={"parameters": Parameters(t=t), "slices": slices})

    def to_yaml(self) -> str:
        """mergekit YAML text for this config."""
        return yaml.safe_dump(self.model_dump(exclude_none=True, mode="json"), sort_keys=False)


def t_setting(value) -> float | list[float] | list[FilterValue]:
    """Any accepted form of t (number, anchors, `{filter, value}` dicts or models) in gradient's form."""
    if isinstance(value, dict | ConditionalValue | FilterValue):
        value = [value]
    if isinstance(value, list) and value and not isinstance(value[0], int | float):
        entries = []
        for entry in value:
            if isinstance(entry, dict):
                entry = ConditionalValue.model_validate(entry)
            if isinstance(entry, ConditionalValue):
                entry = FilterValue(tuple(entry.value) if isinstance(entry.value, list) else entry.value, entry.filter)
            entries.append(entry)
        return entries
    return value


def parse_config(data: Any, source: str = "config") -> SlerpConfig:
    """Validate a parsed YAML mapping; errors name the file and the field."""
    if not isinstance(data, dict):
        raise MergeInputError(f"{source}: expected a mapping of mergekit keys, got {type(data).__name__}")
    try:
        return SlerpConfig.model_validate(data)
    except ValidationError as exc:
        raise MergeInputError(f"{source}: {describe_validation_error(exc)}") from None


def load_config(path: str | Path) -> SlerpConfig:
    """Read and validate a mergekit YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MergeInputError(f"{path}: no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise MergeInputError(f"{path}: cannot read ({type(exc).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise MergeInputError(f"{path}: malformed YAML{where}: {problem}") from None
    return parse_config(data, str(path))


def describe_validation_error(exc: ValidationError) -> str:
    """The first pydantic error as `field.path: message`, the way a user reads it."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    if err["type"] == "literal_error" and "expected" in err.get("ctx", {}):
        message = f"must be one of {err['ctx']['expected']}"
    return f"{loc}: {message}" if loc else message


def _is_union_tag(part: Any) -> bool:
    # pydantic puts union member names (`list[float]`, `function-after[...]`) into locations.
    return isinstance(part, str) and ("[" in part or part in {"float", "int", "str"})
