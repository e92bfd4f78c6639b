"""Load a model and tokenizer to score: a local folder or a Hub id from the offline cache.

Safetensors only unless pickled weights are allowed explicitly; no remote code unless trusted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from objectives.errors import TaskInputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length
DEFAULT_MAX_LENGTH = 2048


def resolve_model_dir(model: str) -> Path:
    """The folder holding `model`: itself when it is a folder, else its snapshot in the local Hub cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise TaskInputError(f"model {model} is a file; pass the model's folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not a repo id, or not cached: the same fix either way
        raise TaskInputError(
            f"model '{model}' is neither a folder nor a Hub model in the local cache; "
            "pass a model folder, or download the model once with network access"
        ) from None


def check_model_dir(folder: Path, allow_pickle: bool = False) -> None:
    """A model folder needs config.json, a tokenizer, and safetensors weights (or allowed pickles)."""
    if not (folder / "config.json").is_file():
        raise TaskInputError(f"model folder {folder} has no config.json; pass a transformers model folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise TaskInputError(
            f"model folder {folder} has no tokenizer (tokenizer.json or tokenizer_config.json); "
            "copy the base model's tokenizer files into it"
        )
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return
    if any(name.endswith(PICKLE_SUFFIXES) for name in files):
        if allow_pickle:
            return
        raise TaskInputError(
            f"model folder {folder} holds only pickled weights (*.bin); pass --allow-pickle to load them"
        )
    raise TaskInputError(f"model folder {folder} has no weights (*.safetensors)")


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The folder's tokenizer and config, as lm-eval's HF backend loads them."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, use_fast=True)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for unusable folders
        raise TaskInputError(_load_message(folder, "tokenizer/config", exc)) from None
    return tokenizer, config


def load_model(
    folder: Path,
    device: str = "cpu",
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Any:
    """AutoModelForCausalLM from the folder, in eval mode on `device`; a model it does not map (a
    vision-language model: Qwen2.5-VL, Mistral3) loads as the class its config.json names, whose
    text-only forward gives the logits the tasks score."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    try:
        target = torch.device(device)
    except RuntimeError:
        raise TaskInputError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise TaskInputError(f"device '{device}' asked for but CUDA is not available; use --device cpu")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    options = dict(dtype=torch_dtype, use_safetensors=None if allow_pickle else True,
                   trust_remote_code=trust_remote_code)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **options)
        except ValueError as exc:
            named = _named_class(folder, transformers)
            if "Unrecognized configuration class" not in str(exc) or named is None:
                raise
            model = named.from_pretrained(folder, **options)
    except Exception as exc:
        raise TaskInputError(_load_message(folder, "model", exc)) from None
    return model.to(target).eval()


def _named_class(folder: Path, transformers) -> Any:
    """The transformers class config.json's `architectures` names, if transformers has it."""
    import json

    try:
        names = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None


def max_length_of(config: Any, tokenizer: Any) -> int:
    """The context length lm-eval's HF backend uses by default for this model."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != _TOKENIZER_INFINITY:
        return int(limit)
    return DEFAULT_MAX_LENGTH


def _load_message(folder: Path, what: str, exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in text:
        return f"model folder {folder} needs its own code to load its {what}; pass --trust-remote-code"
    return f"model folder {folder}: could not load its {what}: {text}"
