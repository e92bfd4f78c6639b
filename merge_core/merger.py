"""The in-memory SLERP merger: plan the output tensors once, then build candidates in place."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from merge_core import gradient
from merge_core.config import SlerpConfig, TSetting, t_setting
from merge_core.errors import MergeInputError
from merge_core.layers import layer_count, layer_index, with_layer
from merge_core.refs import resolve
from merge_core.slerp import Geometry, coefficients, geometry, slerp_into
from merge_core.weights import ModelWeights

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# config.json fields two parents must agree on before their tensors can be paired.
SHAPE_FIELDS = ("model_type", "hidden_size", "n_embd", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the merged model and the parent tensors it is made from."""

    name: str
    v0: str  # name in the base model
    v1: str  # name in the other model
    p: float  # position on the gradient (0 outside the layers)
    slice_index: int | None  # None outside the layers


class MergePlan:
    """What a SLERP config produces: output tensor names, their sources and gradient positions."""

    def __init__(self, config: SlerpConfig, allow_pickle: bool = False):
        self.config = config
        self.dtype = DTYPES[config.dtype]
        pairs = config.model_pairs()
        if any(sorted(p) != sorted(pairs[0]) for p in pairs):
            raise MergeInputError("slices: every slice must merge the same two models")
        self.base = ModelWeights(resolve(config.base_model, allow_pickle), allow_pickle)
        self.other = ModelWeights(resolve(config.other_model(), allow_pickle), allow_pickle)
        _check_compatible(config, self.base, self.other)
        self.outputs, self.num_layers = _plan_outputs(config, self.base, self.other)
        if config.parameters is not None or config.slices:
            self.t_values()  # a filter list that misses a tensor fails now, not mid-merge

    def t_scopes(self, t: TSetting | None) -> list[list]:
        """Per slice, the t settings to try in order: the slice's own, then the global one."""
        global_t = t if t is not None else (self.config.parameters.t if self.config.parameters else None)
        slices = self.config.slices or [None]
        scopes = []
        for sl in slices:
            scope = [s for s in (sl.parameters.t if sl and sl.parameters else None, global_t) if s is not None]
            scopes.append([t_setting(s) for s in scope])
        return scopes

    def t_values(self, t: TSetting | None = None) -> dict[str, float]:
        """The t of every output tensor for this setting (None = the config's own)."""
        scopes = self.t_scopes(t)
        values = {}
        for out in self.outputs:
            scope = scopes[out.slice_index if out.slice_index is not None else 0]
            value = next((v for s in scope if (v := gradient.evaluate(s, out.name, out.p)) is not None), None)
            if value is None:
                raise MergeInputError(f"parameters.t: no filter matches tensor {out.name}; add a default entry")
            values[out.name] = value
        return values

    def merged_config(self) -> dict:
        """config.json of the merged model: the base's, with the merged layer count and dtype."""
        cfg = dict(self.base.config)
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if isinstance(cfg.get(key), int):
                cfg[key] = self.num_layers
        cfg["dtype"] = self.config.dtype
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = self.config.dtype
        return cfg


class Merger:
    """Holds both parents on a device with their SLERP geometry; builds candidates in one pass each."""

    def __init__(self, plan: MergePlan, device: str | torch.device = "cpu", progress: Progress | None = None):
        self.plan = plan
        self.device = torch.device(device)
        self._v0: dict[str, torch.Tensor] = {}
        self._v1: dict[str, torch.Tensor] = {}
        self._geometry: dict[str, Geometry] = {}
        self._live: tuple[torch.nn.Module, dict[str, torch.Tensor]] | None = None
        by_sources: dict[tuple[str, str], Geometry] = {}
        for i, out in enumerate(plan.outputs):
            v0 = self._load(plan.base, out.v0, self._v0)
            v1 = self._load(plan.other, out.v1, self._v1)
            key = (out.v0, out.v1)
            if key not in by_sources:
                by_sources[key] = geometry(v0, v1)
            self._geometry[out.name] = by_sources[key]
            if progress:
                progress(i + 1, len(plan.outputs))

    def _load(self, weights: ModelWeights, name: str, cache: dict[str, torch.Tensor]) -> torch.Tensor:
        if name not in cache:
            # A view of the mapped file when dtype and device already match; else one copy.
            cache[name] = weights.get(name).to(device=self.device, dtype=self.plan.dtype)
        return cache[name]

    def tensors(self, t: TSetting | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor) for every output tensor, each freshly allocated."""
        for out, s0, s1 in self._coefficients(t):
            v0 = self._v0[out.v0]
            yield out.name, slerp_into(torch.empty_like(v0), v0, self._v1[out.v1], s0, s1)

    @torch.no_grad()
    def build_into(self, model: torch.nn.Module, t: TSetting | None = None) -> None:
        """Overwrite a live model's weights with the merge for this t: no allocation, no disk."""
        if self._live is None or self._live[0] is not model:  # name -> parameter map, once per live model
            self._live = (model, self.targets(model))
        targets = self._live[1]
        for out, s0, s1 in self._coefficients(t):
            slerp_into(targets[out.name], self._v0[out.v0], self._v1[out.v1], s0, s1)

    def _coefficients(self, t: TSetting | None) -> Iterator[tuple[OutputTensor, float, float]]:
        values = self.plan.t_values(t)
        working = torch.float64 if self.plan.dtype == torch.float64 else torch.float32
        for out in self.plan.outputs:
            yield (out, *coefficients(self._geometry[out.name], values[out.name], working))

    def targets(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's tensor for each output name; checks that the two sets agree."""
        params = dict(model.named_parameters(remove_duplicate=False))
        params.update(dict(model.named_buffers()))
        wanted = {o.name for o in self.plan.outputs}
        missing = sorted(wanted - params.keys())
        if missing:
            raise MergeInputError(f"the {type(model).__name__} has no tensor {missing[0]} that the merge writes")
        written = {params[n].data_ptr() for n in wanted}
        state = model.state_dict()
        unset = sorted(n for n, p in params.items() if n in state and p.data_ptr() not in written)
        if unset:
            raise MergeInputError(f"the merge does not write {unset[0]} of the {type(model).__name__}")
        return {n: params[n].data for n in wanted}

    def new_model(self) -> torch.nn.Module:
        """An empty transformers model of the merged shape, on the device, ready for build_into."""
        import transformers
        from transformers.initialization import no_init_weights

        config = transformers.AutoConfig.for_model(**self.plan.merged_config())
        with no_init_weights(), self.device:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=self.plan.dtype)
        model.tie_weights()  # tied lm_head: one tensor, written through the embeddings
        return model.eval()


def _check_compatible(config: SlerpConfig, base: ModelWeights, other: ModelWeights) -> None:
    for key in SHAPE_FIELDS:
        a, b = base.config.get(key), other.config.get(key)
        if a != b:
            raise MergeInputError(
                f"{key} differs: {a} in {config.base_model} but {b} in {config.other_model()}; "
                "SLERP needs parents of one architecture"
            )
    counts = {config.base_model: layer_count(base.config), config.other_model(): layer_count(other.config)}
    if config.models is not None and len(set(counts.values())) > 1:
        raise MergeInputError(f"layer counts differ: {counts}; merge matching layers with `slices`")
    for i, sl in enumerate(config.slices or []):
        for j, source in enumerate(sl.sources):
            n = counts[source.model]
            if n is not None and source.layer_range[1] > n:
                raise MergeInputError(
                    f"slices.{i}.sources.{j}.layer_range {list(source.layer_range)} is outside "
                    f"{source.model}, which has {n} layers"
                )


def _plan_outputs(config: SlerpConfig, base: ModelWeights, other: ModelWeights) -> tuple[list, int]:
    names = base.names()
    by_layer: dict[int, list[str]] = {}
    pre, post = [], []
    for name in names:
        index = layer_index(name)
        if index is None:
            (post if by_layer else pre).append(name)
        else:
            by_layer.setdefault(index, []).append(name)
    if not by_layer:
        raise MergeInputError(f"{config.base_model}: no layer tensors found (names like model.layers.N.)")
    n_layers = layer_count(base.config) or max(by_layer) + 1
    if config.slices is None:
        ranges = [((0, n_layers), (0, n_layers))]
    else:
        ranges = [_ranges_of(config, sl) for sl in config.slices]

    outputs = [OutputTensor(n, n, n, 0.0, None) for n in pre]
    out_layer = 0
    for slice_index, ((b0, b1), (o0, _)) in enumerate(ranges):
        count = b1 - b0
        for i in range(count):
            p = gradient.position(i, count)
            for name in by_layer.get(b0 + i, []):
                source_other = with_layer(name, o0 + i)
                outputs.append(OutputTensor(with_layer(name, out_layer), name, source_other, p, slice_index))
            out_layer += 1
    outputs += [OutputTensor(n, n, n, 0.0, None) for n in post]

    for out in outputs:
        if out.v1 not in other.index:
            raise MergeInputError(f"{config.other_model()} has no tensor {out.v1} (the base has {out.v0})")
        shape0, shape1 = base.index[out.v0].shape, other.index[out.v1].shape
        if shape0 != shape1:
            raise MergeInputError(
                f"tensor {out.v0} has shape {list(shape0)} in {config.base_model} but {list(shape1)} in "
                f"{config.other_model()}; SLERP needs parents of one architecture"
            )
    return outputs, out_layer


def _ranges_of(config: SlerpConfig, sl) -> tuple[tuple[int, int], tuple[int, int]]:
    by_model = {s.model: s.layer_range for s in sl.sources}
    return by_model[config.base_model], by_model[config.other_model()]

