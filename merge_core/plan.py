"""What a mergekit config produces: output tensors, their source tensors, parameters per tensor.

The plan follows mergekit's planner: `models:` becomes one slice over every layer (the base added
last when not listed); tensors before the layers take the first slice's models, tensors after
take the last slice's; a layer at index i of a slice of N layers sits at p = i / (N - 1) on the
gradients; parameters resolve from the source's own, then the slice's, then the config's.
Outputs are merged in mergekit's execution order (by the largest source tensor name), which is
the order in which randomised methods draw from the RNG.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass

import torch

from merge_core import gradient, methods
from merge_core.chat_templates import chat_template_text
from merge_core.config import MergeConfig, Slice, SliceSource, TSetting, setting_of
from merge_core.errors import DegeneratePoint, MergeInputError
from merge_core.layers import layer_count, layer_index, layer_stack, with_layer
from merge_core.methods.base import DegenerateValues, Inputs, Values
from merge_core.refs import config_folder, resolve
from merge_core.vocabulary import (
    OutputVocabulary,
    TruncatedVocabulary,
    load_tokenizer,
    model_tokenizer,
    set_vocab_rows,
    vocab_rows,
)
from merge_core.weights import ModelWeights, config_dtype, read_config

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
# config.json fields parents must agree on before their tensors can be paired.
SHAPE_FIELDS = ("model_type", "hidden_size", "n_embd", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size")
# What to do when parents disagree on one of those fields (others: they must share one architecture).
INCOMPATIBLE_FIXES = {
    "vocab_size": "add `tokenizer_source: union` (or base, or a model) to line their vocabularies up",
    "model_type": "merged models must share one architecture (search merge --allow-crimes merges different model "
                  "types whose tensors line up, as mergekit-yaml's does; a study does not)",
}
# Tensors mergekit's architectures list before the layers; every other non-layer tensor comes after.
# input-side tensors, taken from the first slice (gpt-neox's output head `embed_out` is not one)
EMBEDDING_PATTERN = re.compile(r"(embed(?!_out)|(^|\.)wte\.|(^|\.)wpe\.)")
# The output heads, each with the input embeddings a model with tied embeddings keeps in its place
# (mergekit's `tied_names`); vision-language models keep their text model under a prefix.
TIED_HEADS = {
    "lm_head.weight": ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                       "transformer.wte.weight", "wte.weight", "transformer.word_embeddings.weight",
                       "model.decoder.embed_tokens.weight", "gpt_neox.embed_in.weight"),
    "language_model.lm_head.weight": ("language_model.model.embed_tokens.weight",),
}
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# mergekit's architecture files for Qwen2-VL and Qwen2.5-VL list the vision-to-text projector's MLP as
# the layer template of a module of two layers: mergekit merges each of its tensors at the gradients'
# start, then again at their end (t = 1), and writes the second.
_PROJECTOR_MLP = re.compile(r"(^|\.)visual\.merger\.mlp\.")
MERGED_TWICE_BY_MERGEKIT = {"Qwen2VLForConditionalGeneration": _PROJECTOR_MLP,
                            "Qwen2_5_VLForConditionalGeneration": _PROJECTOR_MLP}
# Per-layer lists of config.json that transformers checks against num_hidden_layers.
PER_LAYER_SUFFIX = "layer_types"


@dataclass(frozen=True)
class Source:
    """One input tensor: which model (index into MergePlan.models) and the tensor's name there."""

    model: int
    tensor: str


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the merged model and the input tensors it is made from."""

    name: str
    sources: tuple[Source, ...]  # in mergekit's model order for this slice
    base: int | None  # position of the base input in `sources`
    p: float  # position on the gradients (0 outside the layers)
    slice_index: int  # the slice whose parameters apply
    rows: int | None = None  # inputs cut to their first `rows` rows (the tokenizer_source vocabulary)
    aligned: bool = False  # inputs rebuilt with one row per token of the output tokenizer (`vocabulary.align`)


class MergePlan:
    """A validated config bound to its models: outputs, shapes, dtypes and parameter scopes."""

    def __init__(self, config: MergeConfig, allow_pickle: bool = False, sources: dict | None = None,
                 truncate_vocabulary: bool = False, allow_crimes: bool = False):
        """`sources` maps model names to tensor sources held in memory (earlier stages of a chain);
        `truncate_vocabulary`: mergekit-yaml --unsafe-truncate-embeddings (see `TruncatedVocabulary`);
        `allow_crimes`: mergekit-yaml --allow-crimes, models of different model types merge where their
        tensors line up (the reference model's names; each tensor's shapes still have to agree)."""
        self.config = config
        self.allow_crimes = allow_crimes
        self.method = methods.get(config.merge_method)
        self._sources = dict(sources or {})
        self.slices = _normalised_slices(config, allow_pickle, in_memory=self._sources)
        self.models = list(dict.fromkeys(
            [s.model for sl in self.slices for s in sl.sources] + ([config.base_model] if config.base_model else [])))
        self.weights = [self._sources.get(m) or ModelWeights(resolve(m, allow_pickle), allow_pickle)
                        for m in self.models]
        self._index = {m: i for i, m in enumerate(self.models)}
        self.reference = self.weights[self._index[config.base_model or self.slices[0].sources[0].model]]
        self.base = self.reference  # the study code reads plan.base.folder for the tokenizer
        self._check_contract()
        source, tokens, pad_to_multiple_of = config.tokenizer_settings()
        self.vocabulary = (OutputVocabulary(source, self.models, self.weights, self.reference, allow_pickle,
                                            tokens, pad_to_multiple_of, named=self._sources.get(source))
                           if source else None)
        rows = {vocab_rows(w.config) for w in self.weights} - {None}
        if not source and truncate_vocabulary and len(rows) > 1:
            self.vocabulary = TruncatedVocabulary(min(rows))
        self._check_compatible()
        self.outputs, self.num_layers = self._plan_outputs()
        self.dtype = DTYPES[config.dtype] if config.dtype else None
        self.out_dtype = DTYPES[config.out_dtype] if config.out_dtype else None
        self.ignored_parameters = self._check_parameter_names(config)
        self.values(config)  # a missing parameter or a filter list that misses a tensor fails now

    # --- inputs -------------------------------------------------------------------------------
    def inputs(self, out: OutputTensor, device: torch.device | str = "cpu", cache: dict | None = None) -> Inputs:
        """The source tensors of one output, cast to the working dtype on `device`."""
        dtype = self.working_dtype(out)
        tensors = []
        for s in out.sources:
            key = (s.model, s.tensor)
            if cache is not None and key in cache:
                tensors.append(cache[key])
                continue
            tensor = self.weights[s.model].get(s.tensor)
            if out.rows is not None:
                tensor = tensor.narrow(0, 0, out.rows)
            if tensor.is_floating_point() or self.dtype is not None:
                # A view of the mapped file when dtype and device already match; else one copy. With a
                # config dtype, mergekit casts integer and bool tensors (old checkpoints' attention
                # masks) to it too, and merges them like the others.
                tensor = tensor.to(device=device, dtype=dtype)
            else:
                tensor = tensor.to(device=device)
            if cache is not None:
                cache[key] = tensor
            tensors.append(tensor)
        if out.aligned:
            base = self.slices[out.slice_index].base_model or self.config.base_model
            tensors = self.vocabulary.align(tensors, [s.model for s in out.sources],
                                            self._index[base] if base else None)
        return Inputs(tuple(tensors), out.base, out.name)

    @property
    def tokenizer(self):
        """The tokenizer `tokenizer_source` names, loaded and checked (None without one)."""
        return self.vocabulary.tokenizer if self.vocabulary else None

    def output_tokenizer(self) -> tuple:
        """(folder to copy tokenizer files from, or a loaded tokenizer to save), the way mergekit-yaml chooses.

        With `tokenizer_source` mergekit saves that tokenizer (loaded and checked by the plan, which
        set vocab_size to its length); without, it copies the donor's files, or loads and saves the
        donor's tokenizer when there are no files to copy or a `chat_template` is to be set. (None, None):
        the donor has no tokenizer that loads (mergekit logs it and writes the model).
        """
        from merge_core.writer import copies_tokenizer

        tokenizer = self.tokenizer or getattr(self.reference, "tokenizer", None)  # or an earlier chain stage's
        folder = self.reference.folder
        if tokenizer is None and copies_tokenizer(folder) and not self.config.chat_template:
            return folder, None
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(folder)
            except MergeInputError:
                return None, None
        template = self.chat_template()
        if template is not None:
            tokenizer.chat_template = template
        return None, tokenizer

    def chat_template(self) -> str | None:
        """The chat template `chat_template:` sets (None: none set, or `auto` found none among the models)."""
        if not self.config.chat_template:
            return None
        tokenizers = []
        if self.config.chat_template == "auto":
            tokenizers = [model_tokenizer(w) for w in self.weights]
        return chat_template_text(self.config.chat_template, tokenizers)

    def working_dtype(self, out: OutputTensor) -> torch.dtype:
        """The config dtype, or the promoted dtype of the stored inputs when it has none."""
        if self.dtype is not None:
            return self.dtype
        dtype = None
        for s in out.sources:
            stored = self.weights[s.model].index[s.tensor].dtype
            dtype = stored if dtype is None else torch.promote_types(dtype, stored)
        return dtype

    def output_dtype(self, out: OutputTensor) -> torch.dtype:
        """The dtype the merged tensor is stored in."""
        stored = self.weights[out.sources[0].model].index[out.sources[0].tensor].dtype
        if not stored.is_floating_point and self.dtype is None:
            return stored
        return self.out_dtype or self.method.result_dtype(self.working_dtype(out))

    def shape(self, out: OutputTensor) -> tuple[int, ...]:
        """The merged tensor's shape."""
        shape = tuple(self.weights[out.sources[0].model].index[out.sources[0].tensor].shape)
        if out.aligned:
            return (self.vocabulary.padded, *shape[1:])
        return shape if out.rows is None else (out.rows, *shape[1:])

    def model_dtype(self) -> torch.dtype:
        """The dtype of a live model of the merge: its outputs'. Where they differ (parents of several
        dtypes merged without `dtype`: each tensor keeps its own, as mergekit writes it), the one the
        written config.json names (the reference model's), in which transformers loads the output."""
        floats = [self.output_dtype(o) for o in self.outputs]
        floats = [d for d in floats if d.is_floating_point]
        if len(set(floats)) > 1:
            named = str(config_dtype(self.reference.config)).removeprefix("torch.")
            if named in DTYPES:
                return DTYPES[named]
        return max(set(floats), key=floats.count) if floats else torch.float32

    # --- parameters ---------------------------------------------------------------------------
    def values(self, config: MergeConfig | None = None) -> list[Values]:
        """Per output tensor (in `outputs` order), the method's parameter values for this config."""
        config = config or self.config
        if config is not self.config:
            self._check_same_structure(config)
            self._check_parameter_names(config)
        slices = _normalised_slices(config, None, self.slices)
        params = self.method.params
        shared_params = [p for p in params if p.scope == "global"]
        input_params = [p for p in params if p.scope != "global"]
        result = []
        degenerate = None
        for out in self.outputs:
            sl = slices[out.slice_index]
            shared_scopes = [_settings(sl.parameters), _settings(config.parameters)]
            shared = {p.name: self._resolve(p, shared_scopes, out.name, out.p, out.name) for p in shared_params}
            per_input = []
            for position, src in enumerate(out.sources):
                model = self.models[src.model]
                own = [_settings(s.parameters) for s in sl.sources if s.model == model]
                scopes = own + shared_scopes
                per_input.append({
                    p.name: self._resolve(p, scopes, input_name(out, src), out.p, f"{model}: {src.tensor}")
                    for p in input_params if p.scope == "per_model" or position != out.base
                })
            values = Values(shared, tuple(per_input))
            try:
                self.method.check(values, out.name, self.working_dtype(out))
            except DegenerateValues as exc:  # reported after the other tensors' checks (which say more)
                degenerate = degenerate or DegeneratePoint(f"parameters ({out.name}): {exc}")
            except ValueError as exc:
                position = getattr(exc, "position", None)
                source = out.sources[position] if position is not None else None
                where = f"{self.models[source.model]}: {source.tensor}" if source else out.name
                raise MergeInputError(f"parameters ({where}): {exc}") from None
            result.append(values)
        if degenerate is not None:
            raise degenerate
        return result

    def _resolve(self, param, scopes, tensor_name: str, p: float, where: str):
        missed = False
        for scope in scopes:
            if scope is None or param.name not in scope:
                continue
            value = gradient.evaluate(scope[param.name], tensor_name, p)
            missed = missed or value is None
            if value is not None:
                try:
                    return param.coerce(value)
                except ValueError as exc:
                    raise MergeInputError(f"parameters.{param.name} ({where}): {exc}") from None
        if param.required and missed:
            raise MergeInputError(f"parameters.{param.name}: no filter matches tensor {where}; "
                                  "add an entry without filter")
        if param.required:
            raise MergeInputError(
                f"parameters.{param.name}: required by {self.method.name} but not set for {where}; "
                f"give it per model or under parameters (a filter list needs an entry without filter)")
        return param.default

    def t_values(self, t: TSetting | None = None) -> dict[str, float]:
        """SLERP's t of every output tensor for this global t (None = the config's own)."""
        config = self.config if t is None else self.config.with_t(t)
        return {o.name: v.shared["t"] for o, v in zip(self.outputs, self.values(config), strict=True)}

    def candidate(self, candidate) -> MergeConfig:
        """A candidate as a config: a MergeConfig as is, anything else as SLERP's global t."""
        if candidate is None:
            return self.config
        if isinstance(candidate, MergeConfig):
            return candidate
        return self.config.with_t(candidate)

    def _check_parameter_names(self, config: MergeConfig) -> list[str]:
        """A name no method takes is refused (with did-you-mean); one another mergekit method takes (a
        `weight` kept when a config moves from ties to sce) is ignored, as mergekit ignores it, and
        returned."""
        known = [p.name for p in self.method.params]
        ignored = []
        for where, parameters in _all_parameters(config):
            for name in parameters or {}:
                if name not in known and name in methods.PARAMETER_NAMES:
                    ignored.append(f"{where}.{name}")
                elif name not in known:
                    close = difflib.get_close_matches(name, known, n=1)
                    takes = ", ".join(known) or "no parameters"
                    hint = f"did you mean {close[0]!r}?" if close else f"{self.method.name} takes {takes}"
                    raise MergeInputError(f"{where}.{name}: unknown parameter for {self.method.name}; {hint}")
        return ignored

    def _check_same_structure(self, config: MergeConfig) -> None:
        ours, theirs = self.config.model_dump(exclude={"parameters"}), config.model_dump(exclude={"parameters"})
        for d in (ours, theirs):
            for sl in d.get("slices") or []:
                sl.pop("parameters", None)
                for s in sl["sources"]:
                    s.pop("parameters", None)
            for m in d.get("models") or []:
                m.pop("parameters", None)
        if ours != theirs:
            raise ValueError("a candidate config must differ from the plan's only in its parameters")

    # --- structure ----------------------------------------------------------------------------
    def _check_contract(self) -> None:
        for i, sl in enumerate(self.slices):
            models = [s.model for s in sl.sources]
            if len(set(models)) != len(models):
                twice = next(m for m in models if models.count(m) > 1)
                where = f"slices.{i}" if self.config.slices else "models"
                raise MergeInputError(f"{where}: {twice} appears twice; list each model once")
            base = sl.base_model or self.config.base_model
            problem = self.method.contract.check(models, base)
            if problem:
                raise MergeInputError(f"merge_method {self.method.name}: {problem}")

    def _check_compatible(self) -> None:
        first = self.weights[0]
        for model, weights in zip(self.models[1:], self.weights[1:], strict=True):
            for key in SHAPE_FIELDS:
                a, b = first.config.get(key), weights.config.get(key)
                # a tokenizer source lines each model's rows up with the output tokenizer; --allow-crimes
                # lets model types differ (each tensor's shapes are still checked)
                lined_up = (key == "vocab_size" and self.vocabulary is not None) or (
                    key == "model_type" and self.allow_crimes)
                if a != b and not lined_up:
                    fix = INCOMPATIBLE_FIXES.get(key, "merged models must share one architecture")
                    raise MergeInputError(f"{key} differs: {a} in {self.models[0]} but {b} in {model}; {fix}")

    def _plan_outputs(self) -> tuple[list[OutputTensor], int]:
        pre, post, stacks = _split_names(self.reference.names())
        head = self._head_only_others_store()
        if head is not None:
            post.append(head)  # mergekit: a model's own head where it has one, its embeddings elsewhere
        if not stacks:
            raise MergeInputError(f"{self.models[0]}: no layer tensors found (names like model.layers.N.)")
        reference = next(m for m, w in zip(self.models, self.weights, strict=True) if w is self.reference)
        if len(stacks) > 1 and self.config.slices is not None:
            described = ", ".join(f"{name} ({max(layers) + 1})" for name, layers in stacks.items())
            raise MergeInputError(
                f"{reference} has several layer stacks (layers: {described}); a slice's layer_range cannot say which "
                "stack it means (mergekit asks for `modules:` here, which merge-search does not read yet): list the "
                "models under `models:` (in a study, without `blocks:`, which cuts the layers into slices)")
        layers = _LayerStructures(reference, stacks, self.weights, self._index)
        outputs: list[OutputTensor] = []
        first, last = self.slices[0], self.slices[-1]
        twice = set(self._merged_twice_by_mergekit(pre + post))  # outside the stacks: p = 0, or mergekit's second
        outputs += [self._output(n, [(s.model, n) for s in first.sources], first, float(n in twice), 0) for n in pre]
        # Several stacks (`models:` only): each over its own depth, as mergekit's modules, config.json's counts
        # kept (a Hub whisper's num_hidden_layers counts its encoder layers, not its decoder's).
        multi = sorted(stacks) if len(stacks) > 1 else []
        for stack in multi:
            count = layers.stack_count(stack, first)
            for i in range(count):
                p = gradient.position(i, count)
                for name in layers.stack_layer(stack, i, first):
                    inputs = [(s.model, with_layer(name, i)) for s in first.sources]
                    outputs.append(self._output(name, inputs, first, p, 0))
        out_layer = 0
        for slice_index, sl in enumerate([] if multi else self.slices):
            count = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
            for i in range(count):
                p = gradient.position(i, count)
                for name in layers.names(out_layer, sl, i):
                    inputs = [(s.model, with_layer(name, s.layer_range[0] + i)) for s in sl.sources]
                    outputs.append(self._output(with_layer(name, out_layer), inputs, sl, p, slice_index))
                out_layer += 1
        # mergekit merges the tensors after the layers with the last slice's settings but pairs its sources
        # with one input per source of the *first* slice (a zip): the last slice's sources past that count
        # take no part in them (see `post_sources_dropped`).
        after = last.sources[: len(first.sources)]
        problem = self.method.contract.check([s.model for s in after], last.base_model or self.config.base_model)
        if post and problem:
            raise MergeInputError(
                f"slices: the tensors after the layers ({post[0]}...) are merged, as mergekit merges them, from the "
                f"last slice's first {len(after)} sources (one per source of the first slice), and there {problem}; "
                f"reorder the last slice's sources")
        outputs += [self._output(n, [(s.model, n) for s in after], last, float(n in twice), len(self.slices) - 1)
                    for n in post]
        # mergekit runs each tensor's merge in the order of its largest source name.
        outputs.sort(key=_order_key)
        return outputs, self.slice_lengths()[0] if multi else out_layer  # `models:`: config.json's count

    @property
    def post_sources_dropped(self) -> list[str]:
        """Models of the last slice that mergekit leaves out of the tensors after the layers (the final
        norm, lm_head): those past the first slice's source count."""
        first, last = self.slices[0].sources, self.slices[-1].sources
        return [s.model for s in last[len(first):]]

    def _merged_twice_by_mergekit(self, names) -> list[str]:
        pattern = MERGED_TWICE_BY_MERGEKIT.get((self.reference.config.get("architectures") or [None])[0])
        return [name for name in names if pattern is not None and pattern.search(name)]

    def merged_twice_by_mergekit(self) -> list[str]:
        """Outputs mergekit merges twice, writing the second (MERGED_TWICE_BY_MERGEKIT): a randomised
        method's draws for the first shift every later mask of mergekit's."""
        return self._merged_twice_by_mergekit([o.name for o in self.outputs])

    def _head_only_others_store(self) -> str | None:
        """The output head, where the reference model ties it to its embeddings and another model
        stores its own."""
        return next((head for head in TIED_HEADS if head not in self.reference.index
                     and _tied_source(head, self.reference) is not None
                     and any(head in w.index for w in self.weights)), None)

    @property
    def head_untied(self) -> bool:
        """A head merged although the reference model ties it to its embeddings (others have their own)."""
        return any(o.name in TIED_HEADS and o.name not in self.reference.index for o in self.outputs)

    def order_ties(self) -> list[str]:
        """Outputs that share their largest source tensor name with another output (slices that
        repeat a layer range, sources whose layer ranges cross): mergekit runs those in its task
        graph's internal order, which randomised methods' draws do not follow."""
        keys = [_order_key(o) for o in self.outputs]
        counts = Counter(keys)
        return [o.name for o, k in zip(self.outputs, keys, strict=True) if counts[k] > 1]

    def _output(self, name: str, inputs: list[tuple[str, str]], sl: Slice, p: float, slice_index: int) -> OutputTensor:
        base_model = sl.base_model or self.config.base_model
        if self.method.contract.base == "ignored":
            base_model = None
        sources = []
        shapes = set()
        rows, aligned = None, False
        for model, tensor in inputs:
            weights = self.weights[self._index[model]]
            if tensor not in weights.index:
                tied = _tied_source(tensor, weights)
                if tied is None:
                    raise MergeInputError(f"{model} has no tensor {tensor}, which {name} of the merge needs")
                tensor = tied
            shape = tuple(weights.index[tensor].shape)
            if self.vocabulary and self.vocabulary.indexes(tensor, shape, vocab_rows(weights.config)):
                if self.vocabulary.rows is not None:
                    rows = self.vocabulary.rows
                    shape = (rows, *shape[1:])
                elif self.vocabulary.aligned:
                    aligned = True
                    shape = (self.vocabulary.padded, *shape[1:])
            shapes.add(shape)
            sources.append(Source(self._index[model], tensor))
        if len(shapes) > 1:
            found = ", ".join(f"{m} {list(self.weights[self._index[m]].index[t].shape)}" for m, t in inputs)
            raise MergeInputError(f"tensor {name} has different shapes: {found}; merged models must share one "
                                  "architecture")
        if aligned:
            self.vocabulary.check_rows(name, [(s.model, self.weights[s.model].index[s.tensor].shape[0])
                                              for s in sources])
        base = next((i for i, (m, _) in enumerate(inputs) if m == base_model), None)
        return OutputTensor(name, tuple(sources), base, p, slice_index, rows, aligned)

    def slice_lengths(self) -> list[int]:
        """Output layers per slice, in order (each slice restarts the gradients)."""
        return [sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in self.slices]

    def merged_config(self) -> dict:
        """config.json of the merged model: the reference model's, with the merged layer count and dtype."""
        cfg = dict(self.reference.config)
        for key in LAYER_KEYS:
            if isinstance(cfg.get(key), int):
                cfg[key] = self.num_layers
        dtype = str(self.model_dtype()).removeprefix("torch.")
        cfg["dtype"] = dtype
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = dtype
        cfg.update(self.per_layer_lists())
        if self.vocabulary is not None:  # mergekit sets it to the output tokenizer's length
            set_vocab_rows(cfg, self.vocabulary.padded)
        if self.head_untied:  # a tied reference (the key may be left out: True by default) merged with models
            cfg["tie_word_embeddings"] = False  # that have their own head: the merged head is used
        return cfg

    def per_layer_lists(self) -> dict[str, list]:
        """Each per-layer list of the reference config.json (`layer_types`...), one entry per output
        layer: the entry of the source layer it was built from (the reference model's source in
        slices that merge several). A list that does not follow its model's layers is left out."""
        reference = self.config.base_model or self.slices[0].sources[0].model
        lists = {}
        for key, value in self.reference.config.items():
            if not key.endswith(PER_LAYER_SUFFIX) or not isinstance(value, list):
                continue
            entries = []
            for sl in self.slices:
                source = next((s for s in sl.sources if s.model == reference), sl.sources[0])
                values = _per_layer_list(self.weights[self._index[source.model]].config, key)
                start, end = source.layer_range
                entries += values[start:end] if values is not None and end <= len(values) else [None] * (end - start)
            if None not in entries:
                lists[key] = entries
        return lists


def _per_layer_list(config: dict, key: str) -> list | None:
    """config[key] when it is a list with one entry per layer of that model (an earlier chain stage's
    merged config included), else None."""
    value = config.get(key)
    count = next((config[k] for k in LAYER_KEYS if isinstance(config.get(k), int)), None)
    return value if isinstance(value, list) and len(value) == count else None


def _settings(parameters) -> dict | None:
    if parameters is None:
        return None
    return {k: setting_of(v) for k, v in parameters.items()}


def _all_parameters(config: MergeConfig):
    yield "parameters", config.parameters
    for i, m in enumerate(config.models or []):
        yield f"models.{i}.parameters", m.parameters
    for i, sl in enumerate(config.slices or []):
        yield f"slices.{i}.parameters", sl.parameters
        for j, s in enumerate(sl.sources):
            yield f"slices.{i}.sources.{j}.parameters", s.parameters


def _normalised_slices(config: MergeConfig, allow_pickle: bool | None, known: list[Slice] | None = None,
                       in_memory: dict | None = None) -> list[Slice]:
    """`models:` as one slice over every layer (base appended when absent), as mergekit plans it."""
    if config.slices is not None:
        slices = list(config.slices)
    else:
        sources = [SliceSource(model=m.model, layer_range=(0, 1), parameters=m.parameters) for m in config.models]
        if config.base_model and config.base_model not in [m.model for m in config.models]:
            sources.append(SliceSource(model=config.base_model, layer_range=(0, 1)))
        if known is not None:  # same structure as the plan: reuse its layer ranges
            sources = [s.model_copy(update={"layer_range": k.layer_range})
                       for s, k in zip(sources, known[0].sources, strict=True)]
        else:
            counts = {}
            for s in sources:
                counts[s.model] = layer_count(_config_of(s.model, allow_pickle, in_memory))
            if len(set(counts.values())) > 1:
                raise MergeInputError(f"layer counts differ: {counts}; merge matching layers with `slices`")
            n = next(iter(counts.values()))
            if n is None:
                raise MergeInputError(f"{sources[0].model}: config.json does not say how many layers it has")
            sources = [s.model_copy(update={"layer_range": (0, n)}) for s in sources]
        slices = [Slice(sources=sources)]
    if known is None:
        for i, sl in enumerate(slices):
            for j, s in enumerate(sl.sources):
                n = layer_count(_config_of(s.model, allow_pickle, in_memory))
                if n is not None and s.layer_range[1] > n:
                    raise MergeInputError(f"slices.{i}.sources.{j}.layer_range {list(s.layer_range)} is outside "
                                          f"{s.model}, which has {n} layers")
    return slices


def _config_of(model: str, allow_pickle, in_memory: dict | None = None) -> dict:
    if in_memory and model in in_memory:
        return in_memory[model].config
    return read_config(config_folder(model, bool(allow_pickle)))


class _LayerStructures:
    """Which tensors each output layer holds.

    Where every layer of the reference model holds the same tensors (the usual case), every output
    layer holds those of its lowest layer, as mergekit's architecture templates say. Some models'
    layers differ (DeepSeek-V3's first dense layers before its mixture-of-experts ones, Qwen2-MoE's
    `mlp_only_layers`): each output layer then holds the tensors of the layers it is made from, which
    must be those of the reference's layer at the same index, or config.json could not describe it.
    """

    def __init__(self, reference: str, stacks: dict[str, dict[int, list[str]]], weights: list,
                 index: dict[str, int]):
        """`stacks`: the reference model's; `names` serves a model with one (several merge by stack_layer)."""
        self.reference, self.weights, self.index = reference, weights, index
        self.decoder = next(iter(stacks)) if len(stacks) == 1 else None
        self.by_layer = stacks.get(self.decoder, {})
        self.uniform = len({_structure(names) for names in self.by_layer.values()}) == 1
        self._models: dict[str, dict[str, dict[int, list[str]]]] = {}

    def stack_count(self, stack: str, sl) -> int:
        """The layers of a stack (of a model with several: a vision tower, an encoder), which every model
        must share: its highest index plus one, 0 where a model lacks it."""
        counts = {s.model: max(self._stacks_of(s.model).get(stack, {}), default=-1) + 1 for s in sl.sources}
        if len(set(counts.values())) > 1:
            raise MergeInputError(f"layer counts of {stack} differ: {counts}; merged models must share one "
                                  "architecture")
        return counts[sl.sources[0].model]

    def stack_layer(self, stack: str, i: int, sl) -> list[str]:
        """The tensor names of layer i of a stack, in the first model of the slice."""
        model = sl.sources[0].model
        names = self._stacks_of(model)[stack].get(i)
        if not names:
            raise MergeInputError(f"{model} has no layer {i} in {stack} although it has later ones; its checkpoint "
                                  "is incomplete")
        return names

    def names(self, out_layer: int, sl, i: int) -> list[str]:
        """The tensor names (at the first source's layer) of output layer `out_layer`, the slice's i-th."""
        if self.uniform:
            return self.by_layer[min(self.by_layer)]
        read = [(s.model, s.layer_range[0] + i) for s in sl.sources]
        structures = {}
        for model, layer in read:
            layer_names = self._layers_of(model).get(layer)
            if not layer_names:
                raise MergeInputError(f"{model} has no layer {layer}, which layer {out_layer} of the merge reads")
            structures[(model, layer)] = layer_names
        (model, layer), names = read[0], structures[read[0]]
        for (other, other_layer), other_names in structures.items():
            if _structure(other_names) != _structure(names):
                raise MergeInputError(
                    f"layer {layer} of {model} and layer {other_layer} of {other} hold different tensors (the "
                    "models' layers differ, e.g. dense and mixture-of-experts ones); merge layers of one kind")
        own = self.by_layer.get(out_layer)
        if own is None or _structure(own) != _structure(names):
            raise MergeInputError(
                f"layer {out_layer} of the merge would hold the tensors of layer {layer} of {model}, but the layers "
                f"of {self.reference} differ in kind (e.g. dense and mixture-of-experts ones) and its "
                "config.json says which index holds which: keep each layer at its own index")
        return names

    def _layers_of(self, model: str) -> dict[int, list[str]]:
        return self._stacks_of(model).get(self.decoder, {})

    def _stacks_of(self, model: str) -> dict[str, dict[int, list[str]]]:
        if model not in self._models:
            self._models[model] = _split_names(self.weights[self.index[model]].names())[2]
        return self._models[model]


def _structure(names: list[str]) -> frozenset[str]:
    """A layer's tensor names, without its index."""
    return frozenset(with_layer(name, 0) for name in names)


def _split_names(names: list[str]) -> tuple[list[str], list[str], dict[str, dict[int, list[str]]]]:
    """Tensors before the layers (embeddings), after them (final norm, lm_head), and per layer of each
    layer stack (one in a language model; a vision tower or an encoder adds its own)."""
    stacks: dict[str, dict[int, list[str]]] = {}
    pre, post = [], []
    for name in names:
        stack = layer_stack(name)
        if stack is not None:
            stacks.setdefault(stack, {}).setdefault(layer_index(name), []).append(name)
        elif EMBEDDING_PATTERN.search(name):
            pre.append(name)
        else:
            post.append(name)
    return pre, post, stacks


def _tied_source(tensor: str, weights) -> str | None:
    """The tensor a model with tied embeddings stores for `tensor` (mergekit's `tied_names`): its
    input embeddings for the output head; None for any other tensor, or when it has none."""
    return next((name for name in TIED_HEADS.get(tensor, ()) if name in weights.index), None)


def input_name(output: OutputTensor, source: Source) -> str:
    """The name mergekit's parameter filters match for an input tensor: the tensor's own, except for
    the input embeddings a model with tied embeddings stands in for the output head with, which
    mergekit plans as the head (`tied_names`) and loads under the embeddings' name."""
    if output.name in TIED_HEADS and source.tensor != output.name:
        return output.name
    return source.tensor


def _order_key(output: OutputTensor) -> str:
    return max(s.tensor for s in output.sources)
