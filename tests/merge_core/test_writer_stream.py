"""The shard writer: every tensor written as it comes, earlier ones not held, nothing left on failure."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from safetensors.torch import load_file

from merge_core.writer import write_model

CONFIG = {"model_type": "phi", "vocab_size": 17, "hidden_size": 32, "num_hidden_layers": 1}


def _layout(count: int, dtype=torch.float16):
    return [(f"t{i}", (64, 33 + i), dtype) for i in range(count)]


def _tensors(layout, seen: list, fail_at: int | None = None):
    """Yield fresh tensors, recording a weak reference to each; optionally fail like a merge would."""
    for i, (name, shape, dtype) in enumerate(layout):
        if i == fail_at:
            raise RuntimeError(f"merge failed at {name}")
        gc.collect()
        alive = [j for j, ref in enumerate(seen) if ref() is not None]
        assert alive == [j for j in range(len(seen)) if j >= i - 1], f"held while merging t{i}: {alive}"
        tensor = torch.full(shape, float(i), dtype=dtype)
        seen.append(weakref.ref(tensor))
        yield name, tensor


@pytest.mark.parametrize("max_shard_bytes", [10**9, 20_000])
def test_every_tensor_is_written_and_earlier_ones_are_not_held(tmp_path, max_shard_bytes):
    layout = _layout(6)
    seen: list = []
    done = []
    out = write_model(tmp_path / "out", _tensors(layout, seen), layout, CONFIG, tmp_path, "merge_method: linear\n",
                      max_shard_bytes=max_shard_bytes, progress=lambda: done.append(1))
    assert len(done) == len(layout)
    shards = sorted(out.glob("*.safetensors"))
    assert (len(shards) > 1) == (max_shard_bytes < 10**9)
    loaded = {}
    for shard in shards:
        loaded |= load_file(shard)
    assert sorted(loaded) == sorted(name for name, _, _ in layout)
    for i, (name, shape, dtype) in enumerate(layout):
        assert loaded[name].dtype == dtype and tuple(loaded[name].shape) == shape
        assert torch.equal(loaded[name], torch.full(shape, float(i), dtype=dtype))
    assert (out / "config.json").is_file() and (out / "mergekit_config.yml").read_text() == "merge_method: linear\n"


def test_a_merge_that_fails_mid_stream_leaves_nothing(tmp_path):
    layout = _layout(5)
    with pytest.raises(RuntimeError, match="merge failed at t3"):
        write_model(tmp_path / "out", _tensors(layout, [], fail_at=3), layout, CONFIG, tmp_path, "x: 1\n")
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging folder
