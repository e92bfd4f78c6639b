"""mergekit configs (every merge method): read, validate with errors that name the field, write back.

The schema is mergekit 0.1.x's `MergeConfiguration` for the `models:` and `slices:` forms. Which
parameters a method takes, and which inputs it needs, is checked against the method registry when
the config is planned (`merge_core.plan`), where the tensors are known.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from merge_core.errors import MergeInputError
from merge_core.gradient import FilterValue

Scalar = bool | int | float | str
ScalarOrGradient = Scalar | list[Scalar]
DType = Literal["float16", "bfloat16", "float32"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionalValue(_Strict):
    """`{filter: self_attn, value: [0, 0.5, 1]}`; no filter matches every tensor."""

    value: ScalarOrGradient
    filter: str | None = None

    @field_validator("value")
    @classmethod
    def _anchors_not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("a gradient needs at least one anchor")
        return value


def _conditional_lists(value):
    # mergekit accepts a single `{filter, value}` mapping where a list of them is meant.
    if isinstance(value, dict):
        return {k: [v] if isinstance(v, dict) else v for k, v in value.items()}
    return value


ParameterSetting = ScalarOrGradient | ConditionalValue | list[ConditionalValue]
Parameters = Annotated[dict[str, ParameterSetting], BeforeValidator(_conditional_lists)]
TSetting = ParameterSetting  # the value of SLERP's t, kept for the study code


class SliceSource(_Strict):
    """One model's contiguous run of layers inside a slice, with its own parameters."""

    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value):
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"must be [start, end) with 0 <= start < end, got {list(value)}")
        return value


class Slice(_Strict):
    """Output layers made from the same number of layers of each source model."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _same_length(self):
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError("every source of a slice must span the same number of layers")
        return self


class ModelEntry(_Strict):
    """A whole model in the `models:` form, with its own parameters."""

    model: str
    parameters: Parameters | None = None


class MergeConfig(_Strict):
    """A mergekit config: one merge method over `models:` or `slices:`."""

    merge_method: str
    base_model: str | None = None
    slices: list[Slice] | None = None
    models: list[ModelEntry] | None = None
    parameters: Parameters | None = None
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: str | None = None

    @model_validator(mode="after")
    def _shape(self):
        if (self.slices is None) == (self.models is None):
            raise ValueError("give either `slices` or `models`, not both or neither")
        if self.models is not None and not self.models:
            raise ValueError("models: needs at least one model")
        if self.slices is not None and not self.slices:
            raise ValueError("slices: needs at least one slice")
        return self

    def model_names(self) -> list[str]:
        """Every model the config reads, in first-mention order (base first when given)."""
        names = [self.base_model] if self.base_model else []
        for entry in self.models or []:
            names.append(entry.model)
        for sl in self.slices or []:
            names += [s.model for s in sl.sources] + ([sl.base_model] if sl.base_model else [])
        return list(dict.fromkeys(names))

    def model_pairs(self) -> list[list[str]]:
        """The model names of each slice (or of the whole merge)."""
        if self.models is not None:
            return [[m.model for m in self.models]]
        return [[s.model for s in sl.sources] for sl in self.slices or []]

    def other_model(self) -> str:
        """The first model that is not the base (v1 in SLERP)."""
        return next(m for m in self.model_names() if m != self.base_model)

    def with_parameters(self, parameters: dict) -> MergeConfig:
        """The same merge with these global parameters replacing the config's (slice-level ones dropped)."""
        data = self.model_dump(exclude_none=True, mode="json")
        for sl in data.get("slices") or []:
            kept = {k: v for k, v in (sl.get("parameters") or {}).items() if k not in parameters}
            sl.pop("parameters", None)
            if kept:
                sl["parameters"] = kept
        data["parameters"] = dict(data.get("parameters") or {}) | dict(parameters)
        return MergeConfig.model_validate(data)

    def with_t(self, t: TSetting) -> MergeConfig:
        """The same merge with another global t and no per-slice t."""
        return self.with_parameters({"t": _conditional_lists({"t": t})["t"]})

    def to_yaml(self) -> str:
        """mergekit YAML text for this config."""
        return yaml.safe_dump(self.model_dump(exclude_none=True, mode="json"), sort_keys=False)


SlerpConfig = MergeConfig  # the study code's name from when slerp was the only method


def setting_of(value) -> Any:
    """Any accepted form of a parameter (scalar, anchors, `{filter, value}` entries) in gradient's form."""
    if isinstance(value, dict | ConditionalValue | FilterValue):
        value = [value]
    if isinstance(value, list | tuple):
        if not value:
            return ()
        if all(isinstance(v, bool | int | float | str) for v in value):
            return tuple(value)
        entries = []
        for entry in value:
            if isinstance(entry, dict):
                entry = ConditionalValue.model_validate(entry)
            if isinstance(entry, ConditionalValue):
                entry = FilterValue(tuple(entry.value) if isinstance(entry.value, list) else entry.value, entry.filter)
            entries.append(entry)
        return tuple(entries)
    return value


t_setting = setting_of  # kept for callers that speak of t


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    """Validate a parsed YAML mapping; errors name the file and the field."""
    if not isinstance(data, dict):
        raise MergeInputError(f"{source}: expected a mapping of mergekit keys, got {type(data).__name__}")
    unsupported = sorted({"modules", "tokenizer", "chat_template"} & set(data))
    if unsupported:
        raise MergeInputError(f"{source}: {unsupported[0]}: not supported by merge-search yet; "
                              "use `models:`/`slices:` and `tokenizer_source`")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise MergeInputError(f"{source}: {describe_validation_error(exc)}") from None


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file, turning every read or syntax problem into one line naming the file."""
    docs = read_yaml_documents(path)
    return docs[0] if docs else None


def read_yaml_documents(path: str | Path) -> list:
    """Every YAML document of a file (mergekit-multi separates configs with ---), empty ones dropped."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MergeInputError(f"{path}: no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise MergeInputError(f"{path}: cannot read ({type(exc).__name__})") from None
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise MergeInputError(f"{path}: malformed YAML{where}: {problem}") from None


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a mergekit YAML file."""
    return parse_config(read_yaml(path), str(path))


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
    return isinstance(part, str) and ("[" in part or part in {"float", "int", "str", "bool"})
