"""LoRA adapters on a parent (`model+adapter`, `{model: ..., lora: ...}`): merged once into a cached folder.

mergekit applies an adapter by loading the model with transformers (in `--lora-merge-dtype`, else the
checkpoint's own dtype), wrapping it in peft's `PeftModel`, calling `merge_and_unload()` and saving
the result; the merge then reads that folder like any other model. We make the same calls, so the
merged weights are the very tensors mergekit-yaml merges, for every adapter kind peft can merge
(LoRA with rsLoRA, DoRA, rank and alpha patterns, embedding and conv layers, `modules_to_save`...).

The folder is the model's own (config.json, tokenizer, generation config copied from it) with the
weights replaced: mergekit reads config and tokenizer from the model too. It is written once per
(model, adapter, dtype) under the LoRA cache, built aside and renamed into place, so an interrupted
build never leaves a folder that looks complete; a lock keeps two workers from building it twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from merge_core.errors import MergeInputError
from merge_core.fingerprint import fingerprint
from merge_core.locks import exclusive_lock
from merge_core.weights import _weight_files, read_config

CACHE_ENV = "MERGE_SEARCH_LORA_CACHE"
DTYPE_ENV = "MERGE_SEARCH_LORA_DTYPE"
DTYPES = ("float16", "bfloat16", "float32", "float64")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# What a model folder holds besides weights is copied into the merged folder; weights are not.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def configure(cache: str | None = None, dtype: str | None = None) -> None:
    """Set the LoRA cache folder and merge dtype for this process and the workers it starts."""
    if cache:
        os.environ[CACHE_ENV] = str(Path(cache).expanduser().resolve())
    if dtype:
        os.environ[DTYPE_ENV] = check_dtype(dtype)


def check_dtype(name: str) -> str:
    """mergekit's `--lora-merge-dtype` names (an optional `torch.` prefix)."""
    bare = str(name).removeprefix("torch.")
    if bare not in DTYPES:
        raise MergeInputError(f"--lora-merge-dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return bare


def cache_folder() -> Path:
    """Where merged adapters are kept: $MERGE_SEARCH_LORA_CACHE, else ~/.cache/merge-search/lora."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "merge-search" / "lora"


def merged_folder(model: Path, adapter: Path, label: str, allow_pickle: bool = False) -> Path:
    """The folder of `model` with `adapter` merged into its weights, built on first use."""
    weights = check_adapter(adapter, label, allow_pickle)
    _weight_files(model, allow_pickle)  # a pickled model needs --allow-pickle here too (transformers would load it)
    dtype = os.environ.get(DTYPE_ENV) or None
    if dtype:
        dtype = check_dtype(dtype)
    key = _cache_key(model, adapter, dtype)
    cache = cache_folder()
    final = cache / f"{_safe(model.name)}+{_safe(adapter.name)}-{key}"
    if (final / "config.json").is_file():
        return final
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(cache / f".{final.name}.lock"):
            if not (final / "config.json").is_file():  # else another worker built it while we waited
                _build(final, model, adapter, weights, dtype, label)
    except OSError as exc:  # the lock, the folder built aside, its rename: all writes into the cache
        raise MergeInputError(f"LoRA cache {cache}: cannot write there ({exc.strerror or exc}); "
                              f"set --lora-merge-cache or ${CACHE_ENV} to a writable folder") from None
    return final


def _build(final: Path, model: Path, adapter: Path, weights: Path, dtype: str | None, label: str) -> None:
    """Build the merged folder next to `final` and rename it into place when complete; a killed
    build's leftover (a model's size) goes first: we hold the lock, so no one else is building it."""
    for leftover in final.parent.glob(f".{final.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _merge_into(building, model, adapter, weights, dtype, label)
        _copy_model_files(model, building)
        _readable(building)
        os.replace(building, final)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def check_adapter(adapter: Path, label: str, allow_pickle: bool) -> Path:
    """The adapter's weight file; a folder that is not a peft adapter is refused in one line."""
    if not (adapter / "adapter_config.json").is_file():
        raise MergeInputError(f"{label}: {adapter} is not a peft adapter folder (no adapter_config.json)")
    for name in ADAPTER_WEIGHTS:
        if (adapter / name).is_file():
            if name.endswith(".bin") and not allow_pickle:
                raise MergeInputError(f"{label}: the adapter's weights are pickled ({adapter / name}); "
                                      "pass --allow-pickle to load them")
            return adapter / name
    raise MergeInputError(f"{label}: {adapter} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")


def _cache_key(model: Path, adapter: Path, dtype: str | None) -> str:
    from importlib.metadata import version  # not the modules: importing peft takes seconds

    parts = {"model": [str(model), fingerprint(model)], "adapter": [str(adapter), fingerprint(adapter)],
             "dtype": dtype, "peft": version("peft"), "transformers": version("transformers")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _merge_into(out: Path, model: Path, adapter: Path, weights: Path, dtype: str | None, label: str) -> None:
    """mergekit's ModelReference.merged: load, wrap in PeftModel, merge_and_unload, save."""
    import peft
    import torch

    config = read_config(model)
    architectures = config.get("architectures") or ["ForCausalLM"]
    try:
        with _quiet_transformers():
            auto_cls = _auto_class(architectures[0])
            loaded = auto_cls.from_pretrained(str(model), dtype=getattr(torch, dtype) if dtype else "auto",
                                              low_cpu_mem_usage=True)
            wrapped = peft.PeftModel.from_pretrained(loaded, str(adapter), is_trainable=False)
            merged = wrapped.merge_and_unload()
            merged.save_pretrained(str(out), safe_serialization=True)
    except (ValueError, KeyError, RuntimeError, OSError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MergeInputError(f"{label}: cannot apply the adapter {weights.parent} to {model} ({first})") from None


@contextmanager
def _quiet_transformers():
    """No per-file progress bars or deprecation notices from transformers while the adapter is merged."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # peft's calls trip transformers' deprecation notices
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _auto_class(architecture: str):
    """The class config.json names (what mergekit's auto class resolves to), else AutoModelForCausalLM."""
    import transformers

    return getattr(transformers, architecture, None) or transformers.AutoModelForCausalLM


def _copy_model_files(model: Path, out: Path) -> None:
    """config.json, tokenizer and the rest from the model itself, over what save_pretrained wrote."""
    for path in model.iterdir():
        if not path.is_file() or path.name.startswith(".") or path.suffix in WEIGHT_SUFFIXES:
            continue
        if path.name.endswith(".index.json"):  # the shard index belongs to the weights
            continue
        shutil.copyfile(path, out / path.name)


def _readable(folder: Path) -> None:
    """The permissions a plain mkdir and write would give (mkdtemp's folder is private to its owner)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
