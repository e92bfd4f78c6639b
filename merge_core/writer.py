"""Write a merged model folder: sharded safetensors, config.json, tokenizer, the mergekit YAML.

What goes next to the tensors is what mergekit-yaml writes: config.json saved by transformers (so
`dtype` and transformers' own version, as `PretrainedConfig.save_pretrained` writes them), the
tokenizer files copied from the donor model, or saved by transformers when `tokenizer_source` is set,
and the config file's own text. Where mergekit writes a config.json transformers cannot load (a
layer count that no longer matches `layer_types`), we write per-layer lists that follow the layers.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from merge_core.errors import MergeInputError
from merge_core.weights import config_dtype

# mergekit's `_copy_tokenizer` list, copied when the donor has tokenizer_config.json and tokenizer.json or .model.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "chat_template.jinja", "generation_config.json",
                   "chat_template.json", "video_preprocessor_config.json")
MAX_SHARD_BYTES = 5 * 1000**3


def prepare_output(out_dir: str | Path, overwrite: bool = False, keep: Iterable[Path] = ()) -> Path:
    """Check that OUT_DIR can be written, before any expensive work; return its absolute path.

    Nothing is created yet. A symbolic link is followed (the model goes where it points). OUT_DIR may
    not be the current folder or hold it, nor hold any of `keep` (the config, the models merged):
    the folder is replaced as a whole, so they would go with it.
    """
    if not str(out_dir).strip():
        raise MergeInputError("output folder: the name is empty; give the folder to write the model to")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise MergeInputError(f"output {out} exists and is not a folder")
    for path in (Path.cwd(), *keep):
        path = Path(path).expanduser().resolve()
        if path == out or out in path.parents:
            what = "the current folder" if path == Path.cwd().resolve() else path
            raise MergeInputError(f"output folder {out} is or holds {what}, which writing the model there would "
                                  "replace; choose a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeInputError(f"output folder {out} is not empty; choose a new folder or pass --overwrite")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise MergeInputError(f"output folder {out} cannot be written ({existing} is not a writable folder)")
    return out


def _staging_folder(out: Path) -> tuple[Path, list[Path]]:
    """A new folder next to OUT_DIR to build the model in, and the parent folders made for it.

    Its name carries this process's id: staging folders that a killed run left (SIGKILL, a crash)
    are removed here once their process is gone.
    """
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.partial-*"):
            pid = stale.name.removeprefix(f".{out.name}.partial-").split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        _remove_empty(made)
        raise MergeInputError(f"output folder {out} cannot be written ({exc.strerror or exc})") from None
    return staging, made


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _remove_empty(folders: list[Path]) -> None:
    """Remove the parent folders a failed write made (innermost first), where still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def write_model(
    out_dir: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    layout: list[tuple[str, tuple[int, ...], torch.dtype]],
    config: dict,
    tokenizer_folder: Path,
    merge_yaml: str | None,
    card: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Callable[[], None] | None = None,
    overwrite: bool = False,
    tokenizer=None,
    code_folders: tuple = (),
    before_replace: Callable[[], None] | None = None,
) -> Path:
    """Write the folder atomically: built next to OUT_DIR, moved into place only when complete.

    `layout` lists every tensor's name, shape and dtype in the order `tensors` yields them, so the
    shard headers are written first and each tensor goes to disk as soon as it is merged: no
    merged tensor is kept in memory after it is written. `tokenizer` (a loaded transformers
    tokenizer, see `load_tokenizer`) is saved instead of copying the files of `tokenizer_folder`.
    The repository code files that the written config.json and tokenizer_config.json name in their
    `auto_map` are copied from the first of `code_folders` that has them (see `_copy_code_files`).
    `before_replace` runs when every file is in the staging folder, before it takes OUT_DIR's place
    (an exception there leaves OUT_DIR as it was).
    """
    out = prepare_output(out_dir, overwrite)
    staging, made = _staging_folder(out)
    try:
        _stream_shards(staging, tensors, layout, max_shard_bytes, progress)
        (staging / "config.json").write_text(config_json(config, next(iter(code_folders), None)), encoding="utf-8")
        if card is not None:
            (staging / "README.md").write_text(card, encoding="utf-8")
        if merge_yaml is not None:
            (staging / "mergekit_config.yml").write_text(merge_yaml, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging, safe_serialization=True)
        elif tokenizer_folder is not None and copies_tokenizer(tokenizer_folder):
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_folder) / name).is_file():
                    shutil.copy2(Path(tokenizer_folder) / name, staging / name)
        _copy_code_files(staging, [*code_folders, tokenizer_folder])
        if before_replace is not None:
            before_replace()
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except OSError as exc:  # disk full, file too large, permissions: the user's to fix, nothing left behind
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(made)
        raise MergeInputError(f"output {out}: writing failed ({exc.strerror or exc}); nothing was written") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(made)
        raise
    return out


def _remote_config_class(config: dict, folder: Path | None):
    """The config class a remote-code model's `auto_map` names, loaded from `folder` only with --trust-remote-code."""
    from merge_core.vocabulary import remote_code_trusted

    reference = (config.get("auto_map") or {}).get("AutoConfig")
    if folder is None or not isinstance(reference, str) or not remote_code_trusted():
        return None
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        return get_class_from_dynamic_module(reference, str(folder))
    except Exception:  # noqa: BLE001 - code that does not load: the config is written as the dict it is
        return None


def _copy_code_files(staging: Path, folders: list) -> None:
    """Copy the repository code (`configuration_x.py`, `modeling_x.py`, `tokenization_x.py` and the
    files they import relatively) that `auto_map` in the written config.json and tokenizer_config.json
    names, so that a remote-code model's output loads with trust_remote_code as its parents do.

    Nothing is run: the files are found by name in `folders` (the reference model's folder first).
    mergekit-yaml --trust-remote-code gets the configuration file this way too (transformers copies
    it when it saves the config); the modeling and tokenizer files it leaves behind. `auto_map` entries
    that name another repository (`org/repo--module.Class`) load from there and are left as they are,
    as is a module none of `folders` holds (the parent would not load without it either).
    """
    from transformers.dynamic_module_utils import get_relative_import_files

    modules: dict[str, None] = {}
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((staging / name).read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for value in auto_map.values() if isinstance(auto_map, dict) else ():
            for reference in value if isinstance(value, list) else [value]:
                if isinstance(reference, str) and "--" not in reference and "." in reference:
                    modules.setdefault(reference.rsplit(".", 1)[0].replace(".", "/") + ".py")
    for module in modules:
        folder = next((Path(f) for f in folders if f is not None and (Path(f) / module).is_file()), None)
        if folder is None:
            continue
        for path in [folder / module, *map(Path, get_relative_import_files(folder / module))]:
            target = staging / path.relative_to(folder)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


def copies_tokenizer(folder: Path) -> bool:
    """Whether mergekit copies the donor's tokenizer files (else it loads the tokenizer and saves it)."""
    folder = Path(folder)
    return (folder / "tokenizer_config.json").is_file() and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file())


def output_config(plan) -> dict:
    """config.json of a plan's merged model as mergekit writes it (per-layer lists that follow the
    layers come from `plan.merged_config`): mergekit sets `dtype` only when the merge config names
    one (out_dtype first)."""
    config = plan.merged_config()
    original = plan.reference.config
    config.pop("torch_dtype", None)
    chosen = plan.config.out_dtype or plan.config.dtype
    if chosen:
        config["dtype"] = chosen
    elif config_dtype(original) is not None:
        config["dtype"] = config_dtype(original)
    else:
        config.pop("dtype", None)
    return config


def config_json(config: dict, folder: Path | None = None) -> str:
    """config.json text as transformers' save_pretrained writes it (what mergekit writes), when it knows the model.

    Saving through transformers writes `dtype` for a parent's `torch_dtype`, its own
    transformers_version, and leaves out values equal to the class defaults. A model type
    transformers does not know (remote code) is saved through the class its `auto_map` names in
    `folder` with --trust-remote-code, as mergekit-yaml saves it; without, as the dict it is.
    """
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    config_class = CONFIG_MAPPING[model_type] if known else _remote_config_class(config, folder)
    if config_class is not None:
        with tempfile.TemporaryDirectory() as saved:
            try:
                config_class.from_dict(dict(config)).save_pretrained(saved)
            except Exception:  # noqa: BLE001 - a config its class rejects (as the parents'): keep their form
                pass
            else:
                return (Path(saved) / "config.json").read_text(encoding="utf-8")
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                     torch.bool: "BOOL"}


def tensor_bytes(shape, dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * dtype.itemsize


def _stream_shards(folder: Path, tensors: Iterable, layout: list, max_bytes: int, progress) -> None:
    shards: list[list] = [[]]
    size = 0
    for entry in layout:
        nbytes = tensor_bytes(entry[1], entry[2])
        if shards[-1] and max_bytes > 0 and size + nbytes > max_bytes:  # mergekit: 0 means one shard
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    total = len(shards)
    names = ["model.safetensors"] if total == 1 else [
        f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    stream = iter(tensors)
    weight_map = {}
    for shard, file_name in zip(shards, names, strict=True):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in shard:
            end = offset + tensor_bytes(shape, dtype)
            header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
            weight_map[name] = file_name
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(folder / file_name, "wb") as handle:
            handle.write(struct.pack("<Q", len(text)))
            handle.write(text)
            for name, shape, dtype in shard:
                got_name, tensor = next(stream)
                if got_name != name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise RuntimeError(f"writer expected {name} {list(shape)} {dtype}, got {got_name} "
                                       f"{list(tensor.shape)} {tensor.dtype}")
                data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
                handle.write(memoryview(data.numpy()))
                if progress:
                    progress()
    if total > 1:
        total_size = sum(tensor_bytes(s, d) for _, s, d in layout)
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
