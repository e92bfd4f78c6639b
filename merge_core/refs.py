"""Model references: a local folder, or a Hub id with an optional `@revision`; `model+adapter` names a
model with a LoRA adapter merged into it (mergekit's form, `merge_core.lora`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from merge_core.errors import MergeInputError

# Only what a merge needs; skips e.g. pickled duplicates and training state in a repo.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
PICKLE_PATTERNS = ["*.bin", "*.pt"]


@dataclass(frozen=True)
class ModelRef:
    """What a config names: `path/to/folder`, `org/name` or `org/name@revision`."""

    name: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Split `org/name@rev` into its parts; a local path keeps any `@` it has."""
        text = str(text).strip()
        if not text:
            raise MergeInputError("empty model reference")
        if Path(text).expanduser().exists() or "@" not in text:
            return cls(text)
        name, _, revision = text.rpartition("@")
        return cls(name, revision or None)

    def __str__(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name


def split_adapter(text: str) -> tuple[str, str | None]:
    """mergekit's `model+adapter` as (model, adapter); (text, None) without an adapter."""
    text = str(text).strip()
    if "+" not in text or Path(text).expanduser().exists():
        return text, None
    parts = [part.strip() for part in text.split("+")]
    if len(parts) != 2 or not all(parts):
        raise MergeInputError(f"model {text}: write a model with a LoRA adapter as model+adapter, with one `+`")
    return parts[0], parts[1]


def mergekit_lora_flags(models, dtype: str | None) -> str:
    """The flags mergekit-yaml needs to apply the adapters among `models` as we applied them, in `dtype`
    when one was set (mergekit refuses adapters without a cache folder), with a leading space; empty
    without adapters."""
    try:
        adapted = any(split_adapter(m)[1] is not None for m in models)
    except MergeInputError:
        adapted = True  # two `+`: mergekit needs the flag before it can say what is wrong
    if not adapted:
        return ""
    return " --lora-merge-cache ./lora-cache" + (f" --lora-merge-dtype {dtype}" if dtype else "")


def resolve(ref: ModelRef | str, allow_pickle: bool = False, what: str = "model") -> Path:
    """A local folder holding the model: the folder itself or its Hub snapshot; for `model+adapter`,
    the model with the adapter merged in (built once, under the LoRA cache)."""
    model, adapter = split_adapter(str(ref))
    if adapter is not None:
        from merge_core.lora import merged_folder

        return merged_folder(resolve(model, allow_pickle), resolve(adapter, allow_pickle, "LoRA adapter"),
                             str(ref).strip(), allow_pickle)
    if isinstance(ref, str):
        ref = ModelRef.parse(ref)
    local = Path(ref.name).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise MergeInputError(f"{what} {ref}: {local} is a file, expected a folder")
    if not is_hub_id(ref.name):
        raise MergeInputError(f"{what} {ref}: no such folder (and not a Hub id of the form org/name)")
    return _hub_snapshot(ref, allow_pickle, what)


def config_folder(ref: ModelRef | str, allow_pickle: bool = False) -> Path:
    """The folder whose config.json describes the model: for `model+adapter`, the model's own (the
    adapter changes weights, not the config), so reading it builds nothing."""
    return resolve(split_adapter(str(ref))[0], allow_pickle)


def is_hub_id(name: str) -> bool:
    """Whether a model name that is not a local folder reads as a Hub id (org/name), not a path."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1


def _hub_snapshot(ref: ModelRef, allow_pickle: bool, what: str = "model") -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = HUB_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    try:
        path = snapshot_download(ref.name, revision=ref.revision, allow_patterns=patterns, local_files_only=offline)
    except LocalEntryNotFoundError:
        hint = "HF_HUB_OFFLINE is set; download it first or unset it" if offline else "check the name and network"
        raise MergeInputError(f"{what} {ref}: not in the local Hugging Face cache ({hint})") from None
    except RepositoryNotFoundError:
        raise MergeInputError(f"{what} {ref}: no such repository on the Hugging Face Hub") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MergeInputError(f"{what} {ref}: cannot fetch from the Hub ({first_line})") from None
    return Path(path)
