"""Parent fingerprints: what tells a model folder (or Hub revision) from a rewritten one, cheaply.

A Hub snapshot is named by its commit, so its fingerprint is the resolved revision. A local folder
is fingerprinted by its file names and sizes, the full header of each safetensors file (names,
dtypes, shapes, offsets), config.json, and a content sample: a few 64 KiB windows of each weight
file's data. Reading a few hundred KiB per file keeps it instant even for many GB of weights; a
rewrite that keeps every size and header and changes none of the sampled bytes goes unnoticed.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from merge_core.errors import MergeInputError

WINDOW = 64 * 1024
WINDOWS = 4  # sampled windows of data per weight file, spread evenly over it
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def fingerprint(folder: Path) -> dict[str, str]:
    """{file name: short digest} of a model folder; a Hub snapshot gives {"revision": commit}."""
    folder = Path(folder)
    revision = _hub_revision(folder)
    if revision is not None:
        return {"revision": revision}
    if not folder.is_dir():
        raise MergeInputError(f"model folder {folder}: no such folder")
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        name = path.relative_to(folder).as_posix()
        try:
            out[name] = _file_digest(path)
        except OSError as exc:
            raise MergeInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return out


def changed_files(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Names whose digest differs, or that appear in only one of the two fingerprints."""
    return sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))


def _hub_revision(folder: Path) -> str | None:
    # huggingface_hub caches a repo as .../models--org--name/snapshots/<commit>/
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-1]
    return None


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}".encode())
    with open(path, "rb") as handle:
        start = 0
        if path.suffix == ".safetensors" and size >= 8:
            (length,) = struct.unpack("<Q", handle.read(8))
            if 8 + length <= size:
                digest.update(handle.read(length))  # every tensor's name, dtype, shape and offsets
                start = 8 + length
        if path.suffix not in WEIGHT_SUFFIXES and size <= 1 << 20:
            handle.seek(0)
            digest.update(handle.read())  # configs and tokenizer files: all of it
        else:
            span = max(size - start - WINDOW, 0)
            for i in range(WINDOWS):
                handle.seek(start + span * i // max(WINDOWS - 1, 1))
                digest.update(handle.read(WINDOW))
    return digest.hexdigest()[:16]
