"""Lazy, memory-mapped access to a model folder's weights (safetensors; pickle on opt-in)."""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_core.errors import MergeInputError
from merge_core.layout import model_layout

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives on disk and what it is."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset of the data in the file
    end: int


class ModelWeights:
    """Tensors of one model folder, memory-mapped on first use and never copied.

    `get(name)` returns a tensor that views the file's pages: several reads share them,
    so two parents and a live model cost three models of RAM, not more. Names are transformers'
    model layout (`merge_core.layout`): a tensor the model keeps stacked (MoE experts) is built
    from the checkpoint's tensors on each read, a copy.
    """

    def __init__(self, folder: Path, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.config = read_config(self.folder)
        self._maps: dict[Path, mmap.mmap] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        files = _weight_files(self.folder, allow_pickle)
        if files[0].suffix == ".safetensors":
            self.index = {name: info for f in files for name, info in _read_header(f).items()}
        else:
            self.index = {}
            for f in files:
                for name, tensor in _load_pickled(f).items():
                    self._pickled[name] = tensor
                    self.index[name] = TensorInfo(f, tensor.dtype, tuple(tensor.shape), 0, 0)
        self._checkpoint = self.index
        self._renamed, self._converted = model_layout(self.config.get("model_type"), list(self.index))
        if self._renamed or self._converted:
            self.index = self._model_layout_index()

    def _model_layout_index(self) -> dict[str, TensorInfo]:
        """Model-layout names in checkpoint order (a stacked tensor where its first part was)."""
        new_name = {old: new for new, old in self._renamed.items()}
        for target, recipe in self._converted.items():
            for group in recipe.groups:
                new_name.update({part: target for part in group})
        index: dict[str, TensorInfo] = {}
        for old, info in self._checkpoint.items():
            name = new_name.get(old, old)
            if name in index:
                continue
            recipe = self._converted.get(name)
            if recipe is not None:
                parts = [self._checkpoint[n] for group in recipe.groups for n in group]
                if len({p.dtype for p in parts}) != 1:
                    raise MergeInputError(f"model folder {self.folder}: the parts of {name} have different dtypes")
                shape = recipe.shape(lambda n: self._checkpoint[n].shape)
                info = TensorInfo(info.file, info.dtype, shape, 0, 0)
            index[name] = info
        return index

    @property
    def stacks_experts(self) -> bool:
        """Whether some tensors are built from the checkpoint's per-expert ones (transformers' model layout)."""
        return bool(self._converted)

    def names(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self.index)

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`: a read-only view of the mapped file (a new tensor for a stacked one)."""
        recipe = self._converted.get(name)
        if recipe is not None:
            return recipe.build(self._checkpoint_tensor)
        return self._checkpoint_tensor(self._renamed.get(name, name))

    def _checkpoint_tensor(self, name: str) -> torch.Tensor:
        if name in self._pickled:
            return self._pickled[name]
        info = self._checkpoint[name]
        if info.end == info.start:
            return torch.empty(info.shape, dtype=info.dtype)
        buffer = self._maps.get(info.file)
        if buffer is None:
            with open(info.file, "rb") as handle:
                # ACCESS_COPY: a writable (copy-on-write) map, which torch.frombuffer needs;
                # pages stay shared with the page cache as long as nobody writes.
                buffer = self._maps[info.file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=info.end - info.start, offset=info.start)
        return raw.view(info.dtype).reshape(info.shape)


def read_config(folder: Path) -> dict:
    """The model's config.json as a dict, with a clear error when missing or broken."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MergeInputError(f"model folder {folder}: no config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0]
        raise MergeInputError(f"{path}: not valid JSON ({first}); fix or download it again") from None


def config_dtype(config: dict):
    """The dtype a config.json names (`dtype`, or transformers 4's `torch_dtype`), as written; None if none."""
    return config.get("dtype", config.get("torch_dtype"))


def _weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MergeInputError(f"{index}: not a safetensors index ({exc})") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MergeInputError(f"{index}: lists missing shard {missing[0]}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin"))
    if pickled and not allow_pickle:
        raise MergeInputError(
            f"model folder {folder}: only pickled .bin weights, which can run code when loaded; "
            "convert to safetensors or pass --allow-pickle if you trust the source"
        )
    if pickled:
        return pickled
    raise MergeInputError(f"model folder {folder}: no .safetensors weights")


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds; a truncated or corrupt file is one clear error."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise MergeInputError(f"{path}: not a safetensors file (too short); download or copy it again")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise MergeInputError(f"{path}: truncated or not a safetensors file (header runs past the end); "
                                  "download or copy it again")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError):
            raise MergeInputError(f"{path}: not a safetensors file (bad header); download or copy it again") from None
    base = 8 + length
    if not isinstance(header, dict):
        raise MergeInputError(f"{path}: not a safetensors file (bad header); download or copy it again")
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise MergeInputError(f"{path}: tensor {name} has a malformed header entry; download or copy it again"
                                  ) from None
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise MergeInputError(f"{path}: tensor {name} has unsupported dtype {dtype_name}")
        count = 1
        for dim in shape:
            count *= dim
        if not 0 <= start <= end or end - start != count * dtype.itemsize:
            raise MergeInputError(f"{path}: tensor {name} has inconsistent offsets; download or copy it again")
        if base + end > size:
            raise MergeInputError(f"{path}: truncated ({size} bytes, tensor {name} ends at byte {base + end}); "
                                  "download or copy it again")
        tensors[name] = TensorInfo(path, dtype, shape, base + start, base + end)
    return tensors


def _load_pickled(path: Path) -> dict[str, torch.Tensor]:
    # weights_only refuses arbitrary objects; mmap keeps the tensors on disk until used.
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise MergeInputError(f"{path}: cannot load pickled weights ({type(exc).__name__})") from None
