"""The in-memory merger: inputs and per-study state prepared once, candidates built in place.

`Merger` keeps every input tensor (mapped views when the dtype already matches) and what each
method prepares (SLERP's theta...), then writes each candidate straight into a live model's
tensors. `stream_tensors` is the one-shot path of `search merge`: one output at a time, nothing
kept. Both call the same per-tensor code in the same order, so they agree bit for bit,
randomised methods included (one generator seeded per candidate, drawn in mergekit's order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from merge_core.errors import MergeInputError
from merge_core.methods.base import Inputs, Values
from merge_core.plan import DTYPES, MergePlan, OutputTensor
from merge_core.vocabulary import remote_code_trusted

__all__ = ["DTYPES", "MergePlan", "Merger", "merge_output", "release_free_heap", "stream_tensors"]

Progress = Callable[[int, int], None]


def _generator(plan: MergePlan, device: torch.device, seed: int | None) -> torch.Generator | None:
    if not plan.method.randomised:
        return None
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS, where glibc allows it (`malloc_trim`).

    glibc keeps freed blocks below its (self-raising) mmap threshold in the heap: the full-size
    temporaries of `prepare` (task vectors, float32 copies) would otherwise stay in the process's
    RSS for the whole study, on top of every candidate's peak. Elsewhere this does nothing.
    """
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return
    trim(0)


def new_output(plan: MergePlan, out: OutputTensor, device: torch.device) -> torch.Tensor:
    """An empty tensor of an output's merged shape and dtype."""
    return torch.empty(plan.shape(out), dtype=plan.output_dtype(out), device=device)


def _merge_one(plan: MergePlan, out: OutputTensor, inputs: Inputs, state, values: Values,
               rng: torch.Generator | None, target: torch.Tensor) -> None:
    first = inputs.tensors[0]
    if not first.is_floating_point():  # integer buffers: all inputs must agree; copied as they are
        if any(not torch.equal(t, first) for t in inputs.tensors[1:]):
            raise MergeInputError(f"non-float tensor {out.name} differs between the merged models")
        target.copy_(first)
        return
    if not target.is_floating_point():  # a live model's integer buffer merged as floats (a config dtype)
        merged = new_output(plan, out, target.device)
        plan.method.merge(merged, inputs, state, values, rng)
        target.copy_(merged)
        return
    plan.method.merge(target, inputs, state, values, rng)


def merge_output(plan: MergePlan, out: OutputTensor, values: Values, rng: torch.Generator | None,
                 device: torch.device, target: torch.Tensor | None = None, states: dict | None = None) -> torch.Tensor:
    """One output tensor merged from its inputs, into `target` (a new tensor when None).

    `states` keeps each output's `prepare` result across calls, for inputs that never change (a
    chain stage that reads only models on disk); without it the state is computed and dropped.
    """
    inputs = plan.inputs(out, device)
    if states is not None and out.name in states:
        state = states[out.name]
    else:
        state = plan.method.prepare(inputs) if inputs.tensors[0].is_floating_point() else None
        if states is not None:
            states[out.name] = state
    if target is None:
        target = new_output(plan, out, device)
    _merge_one(plan, out, inputs, state, values, rng, target)
    return target


def stream_tensors(plan: MergePlan, device: str | torch.device = "cpu", seed: int | None = None,
                   config=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor) for every output, loading each output's inputs only while it is merged."""
    device = torch.device(device)
    values = plan.values(plan.candidate(config))
    rng = _generator(plan, device, seed)
    for out, vals in zip(plan.outputs, values, strict=True):
        yield out.name, merge_output(plan, out, vals, rng, device)


class Merger:
    """Holds the inputs on a device with their per-study state; builds candidates in one pass each."""

    def __init__(self, plan: MergePlan, device: str | torch.device = "cpu", progress: Progress | None = None,
                 seed: int | None = 0, skip_unchanged: bool = True):
        self.plan = plan
        self.device = torch.device(device)
        self.seed = seed  # every candidate of a randomised method draws from this one seed
        # build_into leaves a live tensor alone when its parameter values are those it last wrote there
        # (a deterministic method gives the same bits) and nothing has written to it since
        self.skip_unchanged = skip_unchanged and not plan.method.randomised
        self._inputs: list[Inputs] = []
        self._state: list = []
        self._live: tuple[torch.nn.Module, dict[str, torch.Tensor]] | None = None
        self._written: dict[str, tuple] = {}  # output -> (values, the tensor's version and storage after)
        cache: dict = {}
        for i, out in enumerate(plan.outputs):
            inputs = plan.inputs(out, self.device, cache)
            self._inputs.append(inputs)
            self._state.append(plan.method.prepare(inputs) if inputs.tensors[0].is_floating_point() else None)
            if progress:
                progress(i + 1, len(plan.outputs))
        release_free_heap()

    @property
    def _geometry(self) -> dict:
        """SLERP's per-tensor geometry by output name (for tests and diagnostics)."""
        return {o.name: s for o, s in zip(self.plan.outputs, self._state, strict=True)}

    def _passes(self, candidate):
        values = self.plan.values(self.plan.candidate(candidate))
        rng = _generator(self.plan, self.device, self.seed)
        for out, inputs, state, vals in zip(self.plan.outputs, self._inputs, self._state, values, strict=True):
            yield out, inputs, state, vals, rng

    def tensors(self, candidate=None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor) for every output tensor, each freshly allocated."""
        for out, inputs, state, vals, rng in self._passes(candidate):
            target = new_output(self.plan, out, self.device)
            _merge_one(self.plan, out, inputs, state, vals, rng, target)
            yield out.name, target

    @torch.no_grad()
    def build_into(self, model: torch.nn.Module, candidate=None) -> int:
        """Overwrite a live model's weights with a candidate (a MergeConfig, or SLERP's t): no disk.

        With `skip_unchanged` (deterministic methods), an output whose parameter values equal those of
        the last build into this model is not merged again, unless its tensor was changed in place
        since (torch's version counter, or its storage replaced; writes that bypass the counter, e.g.
        into `.data` in place, are not seen).
        Returns how many output tensors were merged."""
        if self._live is None or self._live[0] is not model or self._storage_replaced():
            # name -> parameter map, once per live model (and again when a parameter got new storage)
            watched = live_params(self.plan, model)
            self._live = (model, {out: p.data for out, p in watched.items()}, watched)
            self._written.clear()
        _, targets, watched = self._live
        merged = 0
        for out, inputs, state, vals, rng in self._passes(candidate):
            if out.name not in targets:  # a tensor the live model does not have (see live_params)
                if rng is not None:  # the masks of the tensors after it must be drawn as in `search merge`
                    _merge_one(self.plan, out, inputs, state, vals, rng, new_output(self.plan, out, self.device))
                continue
            # the parameter's own version counter: `targets` are its `.data`, whose writes it does not count
            tensor = watched[out.name]
            if self.skip_unchanged and self._written.get(out.name) == (vals, tensor._version, tensor.data_ptr()):
                continue
            self._written.pop(out.name, None)  # a write that fails half way leaves no record
            _merge_one(self.plan, out, inputs, state, vals, rng, targets[out.name])
            merged += 1
            if self.skip_unchanged:
                self._written[out.name] = (vals, tensor._version, tensor.data_ptr())
        return merged

    def _storage_replaced(self) -> bool:
        """Whether a live parameter's storage was swapped (`p.data = ...`, a dtype or device move)
        since its target was taken."""
        _, targets, watched = self._live
        return any(tensor.data_ptr() != targets[name].data_ptr() for name, tensor in watched.items())

    def targets(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's tensor for each output name; checks that the two sets agree."""
        return live_targets(self.plan, model)

    def new_model(self) -> torch.nn.Module:
        """An empty transformers model of the merged shape, on the device, ready for build_into."""
        return new_live_model(self.plan, self.device)


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter (tied ones under each name) and buffer of a model, by name."""
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    return params


def live_params(plan: MergePlan, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A live model's parameter or buffer for each output of the plan it has; checks that the merge
    writes every tensor of the model's state.

    A checkpoint name that transformers renames on load (gpt-neox's `embed_out` is the model's
    `lm_head`) maps to its new name; a tensor the model does not have (a checkpoint's stale buffers,
    such as old gpt-neox `attention.bias` masks) is left out, as transformers leaves it out when it
    loads the merged folder."""
    from merge_core.layout import model_names

    params = _model_tensors(model)
    renamed = model_names(model, [o.name for o in plan.outputs if o.name not in params])
    found = {}
    for out in plan.outputs:
        name = renamed.get(out.name, out.name)
        if name in params:
            found[out.name] = params[name]
    written = {p.data_ptr() for p in found.values()}
    state = model.state_dict()
    unset = sorted(n for n, p in params.items() if n in state and p.data_ptr() not in written)
    if unset:
        raise MergeInputError(f"the merge does not write {unset[0]} of the {type(model).__name__}")
    return found


def live_targets(plan: MergePlan, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`live_params`' tensors to write into (their `.data`: no autograd bookkeeping)."""
    return {out: p.data for out, p in live_params(plan, model).items()}


def model_from_config(config, dtype: torch.dtype) -> torch.nn.Module:
    """AutoModelForCausalLM where it maps the config; else the class config.json names (a vision-language
    model such as Qwen2.5-VL or Mistral3, whose text-only forward gives the logits the tasks score), or
    the repository's own class that `auto_map` names (remote code, with --trust-remote-code)."""
    import transformers

    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}) and remote_code_trusted():
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=True)
    named = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
    if type(config) not in transformers.AutoModelForCausalLM._model_mapping and named is not None:
        return named._from_config(config, dtype=dtype)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def _merged_config_object(plan: MergePlan):
    """The merged config.json as its transformers config class: the repository's own (auto_map) for a
    model type transformers does not know, with --trust-remote-code; one that needs it fails in one line."""
    import transformers

    values = plan.merged_config()
    reference = (values.get("auto_map") or {}).get("AutoConfig")
    if values.get("model_type") in transformers.CONFIG_MAPPING or not isinstance(reference, str):
        return transformers.AutoConfig.for_model(**values)
    folder = getattr(plan.reference, "folder", None)
    if not remote_code_trusted() or folder is None:
        raise MergeInputError(f"{plan.models[0]}: model type {values.get('model_type')!r} is defined by its "
                              "repository's code: allow that with merge: {trust_remote_code: true}")
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = get_class_from_dynamic_module(reference, str(folder)).from_dict(values)
    config._name_or_path = str(folder)  # where AutoModelForCausalLM finds the model's code
    return config


def new_live_model(plan: MergePlan, device: torch.device) -> torch.nn.Module:
    """An empty transformers model of the plan's merged shape on `device`."""
    from transformers.initialization import no_init_weights

    config = _merged_config_object(plan)
    with no_init_weights(), device:
        model = model_from_config(config, plan.model_dtype())
    model.tie_weights()  # tied lm_head: one tensor, written through the embeddings
    return model.eval()
