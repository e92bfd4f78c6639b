"""Broken parent files: one line naming the file, exit 2, and no study storage created."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import build_tiny_model, run_cli
from tests.search.conftest import study_dict, write_study


def truncate(folder):
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard


def bad_header(folder):
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\x00garbage"
    shard.write_bytes(bytes(data))
    return shard


def huge_header(folder):
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    return shard


def missing_shard(folder):
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    return folder / "model.safetensors.index.json"


def broken_config(folder):
    config = folder / "config.json"
    config.write_text(config.read_text()[:-20])
    return config


@pytest.mark.parametrize("damage", [truncate, bad_header, huge_header, missing_shard, broken_config])
def test_broken_parent_is_one_line_naming_the_file(study_parts, tmp_path, damage):
    parent = build_tiny_model(tmp_path / "parent_b", "phi", seed=12, max_shard_size="20KB")
    named = damage(parent)
    study = study_dict(study_parts, tmp_path)
    study["merge"]["models"] = [str(study_parts["a"]), str(parent)]
    path = write_study(tmp_path / "study.yaml", study)
    result = run_cli("start", str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(named) in lines[0], lines
    assert not (tmp_path / "toy.db").exists()
    shutil.rmtree(parent)
