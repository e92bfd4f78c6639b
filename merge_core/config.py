"""mergekit configs (every merge method): read, validate with errors that name the field, write back.

The schema is mergekit 0.1.x's `MergeConfiguration` for the `models:` and `slices:` forms. Which
parameters a method takes, and which inputs it needs, is checked against the method registry when
the config is planned (`merge_core.plan`), where the tensors are known.

mergekit's other spellings are read into one form, so the rest of the code and `to_yaml` see only
that one: a model given as `{model: {path: p, revision: r}}` becomes `p@r`; `dtype: torch.float16`
becomes `float16`; a quoted number (`weight: '0.5'`) becomes the number, converted as mergekit's
pydantic parameter types convert it; `tokenizer: {source: s}` with no tokens and no padding becomes
`tokenizer_source: s`; `{model: m, lora: a}` becomes `m+a`. What merge-search cannot do exactly (`modules`, ...) is
refused with one line that says what to write instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from merge_core import methods
from merge_core.chat_templates import check_chat_template
from merge_core.errors import MergeInputError
from merge_core.gradient import FilterValue

Scalar = bool | int | float | str
ScalarOrGradient = Scalar | list[Scalar]
DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def _dtype_name(value):
    # mergekit's dtype_from_name: an optional `torch.` prefix; an empty string means no dtype.
    if value is None or value == "":
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name in DTYPE_NAMES:
        return name
    if name == "int64":
        # mergekit takes it, and rounds every weight to an integer (or fails on a norm's buffer).
        raise ValueError(f"{value} is not a float type: every weight would be rounded to an integer; "
                         f"use one of {', '.join(DTYPE_NAMES)}")
    raise ValueError(f"must be one of {', '.join(DTYPE_NAMES)} (or torch.float16 and so on), got {value!r}")


DType = Annotated[Literal["float16", "bfloat16", "float32", "float64"] | None, BeforeValidator(_dtype_name)]


def _model_reference(value):
    """mergekit's ModelReference forms as one string: `path`, `path@revision`, `model+adapter`."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"model", "lora", "override_architecture"}, key=str)
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} in a model reference; write `model: org/name` "
                             "or `model: {model: {path: org/name, revision: main}, lora: org/adapter}`")
        if value.get("override_architecture") is not None:
            raise ValueError("override_architecture is not supported by merge-search; remove it (the "
                             "architecture is read from the model's config.json)")
        if "model" not in value:
            raise ValueError("a model reference needs `model:`; write `model: org/name` "
                             "or `model: {model: {path: org/name, revision: main}}`")
        model = _model_path(value["model"], "model")
        lora = value.get("lora")
        value = f"{model}+{_model_path(lora, 'lora')}" if lora is not None else model
    if isinstance(value, str) and "+" in value:
        parts = value.split("+")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ValueError(f"{value!r}: write a model with a LoRA adapter as model+adapter, with one `+`")
    return value


def _model_path(value, key: str) -> str:
    """mergekit's ModelPath: `org/name`, `org/name@rev` or `{path: org/name, revision: rev}`."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"path", "revision"}, key=str)
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} in a {key} path; it takes path and revision")
        path, revision = value.get("path"), value.get("revision")
        if not isinstance(path, str) or not path:
            raise ValueError(f"a {key} path needs `path:` with the folder or Hub id, e.g. {{path: org/name}}")
        if revision is not None and not isinstance(revision, str):
            raise ValueError(f"revision must be a string (quote it), got {revision!r}")
        value = f"{path}@{revision}" if revision else path
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"`{key}:` must be a folder or Hub id, got {value!r}")
    if "+" in value:
        raise ValueError(f"{value!r}: `{key}:` names one folder or Hub id, without `+`")
    return value


ModelName = Annotated[str, BeforeValidator(_model_reference)]


def reference_text(value) -> str:
    """A model reference in any of mergekit's forms as the one string the rest of the code reads."""
    try:
        return _model_reference(value)
    except ValueError as exc:
        raise MergeInputError(f"model {value!r}: {exc}") from None


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
        for name, setting in value.items():
            if isinstance(setting, list) and not setting:
                raise ValueError(f"{name} is an empty list; give a number, a gradient like [0.2, 0.8], "
                                 "or a list of {filter, value} entries")
        return {k: [v] if isinstance(v, dict) else v for k, v in value.items()}
    return value


ParameterSetting = ScalarOrGradient | ConditionalValue | list[ConditionalValue]
Parameters = Annotated[dict[str, ParameterSetting], BeforeValidator(_conditional_lists)]
TSetting = ParameterSetting  # the value of SLERP's t, kept for the study code


class SliceSource(_Strict):
    """One model's contiguous run of layers inside a slice, with its own parameters."""

    model: ModelName
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
    base_model: ModelName | None = None
    # mergekit 0.1.5 reads this field and never uses it (no merge changes); kept so exports keep it.
    residual_weight: float | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _same_length(self):
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError("every source of a slice must span the same number of layers")
        return self


class ModelEntry(_Strict):
    """A whole model in the `models:` form, with its own parameters."""

    model: ModelName
    parameters: Parameters | None = None


class ZeroEmbedding(_Strict):
    """`{kind: zero}`: a token's default row is zeros."""

    kind: Literal["zero"]


class ModelTokenEmbedding(_Strict):
    """`{kind: model_token, model: M, token: T}` (or `token_id: N`): M's row of another token."""

    kind: Literal["model_token"]
    model: ModelName
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self):
        if (self.token_id is None) == (self.token is None):
            raise ValueError("model_token takes one of token or token_id")
        return self


class TokenEmbedding(_Strict):
    """One `tokenizer.tokens` entry: where the token's row comes from where a model lacks it (or always,
    with `force`)."""

    source: Annotated[ZeroEmbedding | ModelTokenEmbedding, Field(discriminator="kind")] | ModelName | None = None
    force: bool = False


class TokenizerSection(_Strict):
    """mergekit's `tokenizer:` section (kept only when it has tokens or padding)."""

    source: ModelName = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class MergeConfig(_Strict):
    """A mergekit config: one merge method over `models:` or `slices:`."""

    merge_method: str
    base_model: ModelName | None = None
    slices: list[Slice] | None = None
    models: list[ModelEntry] | None = None
    parameters: Parameters | None = None
    dtype: DType = None
    out_dtype: DType = None
    tokenizer_source: ModelName | None = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value):
        return None if value is None else check_chat_template(value)

    @model_validator(mode="before")
    @classmethod
    def _mergekit_forms(cls, data):
        if not isinstance(data, dict):
            return data
        for key, hint in UNSUPPORTED.items():
            if key in data:
                raise ValueError(f"{key}: not supported by merge-search; {hint}")
        return _typed_parameters(_tokenizer_section(dict(data)))

    @model_validator(mode="after")
    def _shape(self):
        if (self.slices is None) == (self.models is None):
            raise ValueError("give either `slices` or `models`, not both or neither")
        if self.models is not None and not self.models:
            raise ValueError("models: needs at least one model")
        if self.slices is not None and not self.slices:
            raise ValueError("slices: needs at least one slice")
        return self

    def tokenizer_settings(self) -> tuple[str | None, dict, int | None]:
        """(tokenizer source or None, `tokens` entries, pad_to_multiple_of) from either spelling."""
        if self.tokenizer is not None:
            return self.tokenizer.source, dict(self.tokenizer.tokens or {}), self.tokenizer.pad_to_multiple_of
        return self.tokenizer_source, {}, None

    def model_names(self) -> list[str]:
        """Every model the config reads, in first-mention order (base first when given)."""
        names = [self.base_model] if self.base_model else []
        for entry in self.models or []:
            names.append(entry.model)
        for sl in self.slices or []:
            names += [s.model for s in sl.sources] + ([sl.base_model] if sl.base_model else [])
        return list(dict.fromkeys(names))

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

UNSUPPORTED = {
    "modules": "write the merge with top-level `models:` or `slices:`",
}


def _tokenizer_section(data: dict) -> dict:
    # mergekit plans `tokenizer: {source: s}` with no tokens and no padding as `tokenizer_source: s`.
    if "tokenizer" not in data:
        return data
    section = data.pop("tokenizer")
    if section is None:
        return data
    if data.get("tokenizer_source") is not None:
        raise ValueError("tokenizer: give tokenizer_source or tokenizer, not both (mergekit refuses both too)")
    if not isinstance(section, dict):
        raise ValueError(f"tokenizer: expected a mapping like {{source: base}}, got {section!r}; "
                         "or write `tokenizer_source: base`")
    for key in section:
        if key not in ("source", "tokens", "pad_to_multiple_of"):
            raise ValueError(f"tokenizer.{key}: unknown key; the tokenizer section takes source, tokens, "
                             "pad_to_multiple_of")
    if section.get("tokens") in (None, {}) and section.get("pad_to_multiple_of") is None:
        data["tokenizer_source"] = section.get("source", "union")  # mergekit's default source
    else:
        data["tokenizer"] = section
    return data


_KIND_WORDS = {float: "a number (like 0.5)", int: "a whole number (like 10)", bool: "true or false"}


def _typed_parameters(data: dict) -> dict:
    # mergekit validates each parameter value with pydantic's lax mode for its type when it merges,
    # so `weight: '0.5'` is 0.5 and `normalize: 'yes'` is true; convert the same values here, once.
    method = methods.REGISTRY.get(data.get("merge_method")) if isinstance(data.get("merge_method"), str) else None
    if method is None:
        return data

    def fix(params, where):
        if not isinstance(params, dict):
            return params
        out = {}
        for name, setting in params.items():
            param = method.param(name) if isinstance(name, str) else None
            out[name] = setting if param is None else _typed_setting(setting, param.kind, f"{where}.{name}")
        return out

    def fix_entries(entries, where, inner=None):
        if not isinstance(entries, list):
            return entries
        fixed = []
        for i, entry in enumerate(entries):
            if isinstance(entry, dict):
                entry = dict(entry)
                if "parameters" in entry:
                    entry["parameters"] = fix(entry["parameters"], f"{where}.{i}.parameters")
                if inner and inner in entry:
                    entry[inner] = fix_entries(entry[inner], f"{where}.{i}.{inner}")
            fixed.append(entry)
        return fixed

    data = dict(data)
    if "parameters" in data:
        data["parameters"] = fix(data["parameters"], "parameters")
    if "models" in data:
        data["models"] = fix_entries(data["models"], "models")
    if "slices" in data:
        data["slices"] = fix_entries(data["slices"], "slices", inner="sources")
    return data


def _typed_setting(setting, kind: type, where: str, inside: str | None = None):
    """One parameter's setting with its values converted to `kind`; a setting of no accepted form fails
    here with what is accepted (pydantic would report the last member of the union it tried)."""
    words = _KIND_WORDS.get(kind, kind.__name__)
    forms = f"{words}, a list of them (a gradient) or a list of {{filter: ..., value: ...}} entries"
    if isinstance(setting, dict):
        if "value" not in setting:
            raise ValueError(f"{where}: a filter entry needs `value:` (like {{filter: self_attn, value: 0.5}}), "
                             f"got {setting!r}")
        return {**setting, "value": _typed_setting(setting["value"], kind, where, inside="entry")}
    if isinstance(setting, list):
        if inside is not None and any(isinstance(v, list | dict) for v in setting):
            raise ValueError(f"{where}: a gradient is a flat list of values; got {setting!r}")
        if inside is None and any(isinstance(v, list) for v in setting):
            raise ValueError(f"{where}: must be {forms}; got a list inside a list")
        return [_typed_setting(v, kind, where, inside="list") for v in setting]
    if setting is None:
        raise ValueError(f"{where}: must be {forms}, got null")
    if isinstance(setting, str) or (isinstance(setting, bool) and kind is not bool):
        try:
            setting = TypeAdapter(kind).validate_python(setting)
        except ValidationError:
            raise ValueError(f"{where}: must be {words}, got {setting!r}") from None
    if isinstance(setting, float) and not math.isfinite(setting):
        raise ValueError(f"{where}: must be a finite number, got {setting}")
    return setting


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
    """The first pydantic error as `field.path: message`, the way a user reads it; an unknown key
    first, since it is often a misspelt required one that pydantic also reports as missing."""
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = _unknown_key(str(err["loc"][-1]), [p for p in err["loc"] if not _is_union_tag(p)])
    if err["type"] == "literal_error" and "expected" in err.get("ctx", {}):
        message = f"must be one of {err['ctx']['expected']}"
    return f"{loc}: {message}" if loc else message


def _unknown_key(key: str, loc: list) -> str:
    """An unknown key, with the known key it is closest to (mergekit's models ignore unknown keys, so
    a misspelt one would silently change the merge there)."""
    import difflib

    known: set[str] = set()
    models = [_Strict]
    while models:
        model = models.pop()
        known.update(model.model_fields)
        models.extend(model.__subclasses__())
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    if close and close[0] == key:
        in_slice = len(loc) == 3 and loc[0] == "slices" and key in ("model", "layer_range")
        where = " (a slice lists its models under `sources:`, each with `model:` and `layer_range:`)" if in_slice \
            else ""
        return f"`{key}` does not belong here{where}"
    if close:
        return f"unknown key; did you mean {close[0]}?"
    if any(key == p.name for method in methods.REGISTRY.values() for p in method.params):
        return f"unknown key here; a merge parameter goes under `parameters:` (parameters: {{{key}: ...}})"
    return "unknown key; remove it (mergekit would ignore it, merge-search refuses it in case it is a typo)"


def _is_union_tag(part: Any) -> bool:
    # pydantic puts union member names (`list[float]`, `function-after[...]`) into locations.
    return isinstance(part, str) and ("[" in part or part in {"float", "int", "str", "bool"})
