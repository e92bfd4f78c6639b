"""Fine-tune-like families: one tiny base and three children that each moved a little from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import build_tiny_model


def build_family(root: Path, arch: str, seed: int, children: int = 3) -> dict[str, Path]:
    """`base` and `child_1..n`: children are the base plus small deltas, some shared, some opposed.

    Shared and opposed directions make TIES sign election matter; varied magnitudes make
    magnitude pruning matter.
    """
    import torch
    from safetensors.torch import load_file, save_file

    base = build_tiny_model(root / "base", arch, seed=seed)
    tensors = {}
    for f in sorted(base.glob("*.safetensors")):
        tensors.update(load_file(f))
    generator = torch.Generator().manual_seed(seed + 100)
    shared = {n: torch.randn(t.shape, generator=generator) * 0.02 for n, t in tensors.items()}
    out = {"base": base}
    for i in range(1, children + 1):
        folder = root / f"child_{i}"
        build_tiny_model(folder, arch, seed=seed)  # config and tokenizer; weights replaced below
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
        child = {}
        for name, t in tensors.items():
            own = torch.randn(t.shape, generator=generator) * 0.02 * i
            sign = -1.0 if i == 2 else 1.0
            child[name] = (t + sign * shared[name] + own).contiguous()
        save_file(child, folder / "model.safetensors", metadata={"format": "pt"})
        out[f"child_{i}"] = folder
    return out


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """A phi and a llama family, each a base and three children."""
    root = tmp_path_factory.mktemp("families")
    return {"phi": build_family(root / "phi", "phi", 5), "llama": build_family(root / "llama", "llama", 6)}
