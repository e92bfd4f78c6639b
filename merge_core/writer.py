"""Write a merged model folder: sharded safetensors, config.json, tokenizer, the mergekit YAML."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from merge_core.errors import MergeInputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
MAX_SHARD_BYTES = 5 * 1000**3


def prepare_output(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Check that OUT_DIR can be written, before any expensive work; return its path."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise MergeInputError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeInputError(f"output folder {out} is not empty; choose a new folder or pass --overwrite")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise MergeInputError(f"output folder {out} cannot be written ({exc.strerror or exc})") from None
    return out


def write_model(
    out_dir: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict,
    tokenizer_folder: Path,
    merge_yaml: str,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Callable[[], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the folder atomically: built next to OUT_DIR, moved into place only when complete."""
    out = prepare_output(out_dir, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write_shards(staging, tensors, max_shard_bytes, progress)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_folder) / name).is_file():
                shutil.copy2(Path(tokenizer_folder) / name, staging / name)
        (staging / "mergekit_config.yml").write_text(merge_yaml)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write_shards(folder: Path, tensors: Iterable, max_bytes: int, progress) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    paths = []

    def flush():
        paths.append(folder / f".shard-{len(paths)}.safetensors")
        save_file(shards[-1], paths[-1], metadata={"format": "pt"})
        shards[-1] = {}

    weight_map = {}
    total_bytes = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            flush()
            size = 0
        shards[-1][name] = tensor.detach().to("cpu").contiguous()
        weight_map[name] = len(paths)
        size += nbytes
        total_bytes += nbytes
        if progress:
            progress()
    flush()
    total = len(paths)
    if total == 1:
        os.replace(paths[0], folder / "model.safetensors")
        return
    names = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    for path, name in zip(paths, names, strict=True):
        os.replace(path, folder / name)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
