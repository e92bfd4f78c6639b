"""Multi-stage configs (mergekit-multi's format): `search merge` against `mergekit-multi`, the
in-memory chain against `search merge`, and the chain errors a user can make."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merge_core.chain import ChainPlan, parse_chain
from merge_core.merger import stream_tensors
from tests.conftest import run_cli
from tests.merge_core.test_merge_bad_input import assert_refused
from tests.merge_core.test_methods_oracle import ulp_report
from tests.merge_core.test_oracle import load_folder

SEED = 11


def three_stages(f) -> list[dict]:
    """SLERP, then TIES over that stage and two children, then SLERP again with a child used twice."""
    base, c1, c2, c3 = (str(f[n]) for n in ("base", "child_1", "child_2", "child_3"))
    return [
        {"name": "first", "merge_method": "slerp", "base_model": c1, "dtype": "float16",
         "models": [{"model": c1}, {"model": c2}],
         "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.4}]}},
        {"name": "second", "merge_method": "dare_ties", "base_model": base, "dtype": "float16",
         "models": [{"model": "first", "parameters": {"weight": 0.6, "density": 0.7}},
                    {"model": c2, "parameters": {"weight": 0.3, "density": [0.4, 0.9]}},
                    {"model": c3, "parameters": {"weight": 0.4, "density": 0.5}}]},
        {"merge_method": "slerp", "base_model": "second", "dtype": "float16",
         "slices": [{"sources": [{"model": "second", "layer_range": [0, 4]}, {"model": c2, "layer_range": [0, 4]}]}],
         "parameters": {"t": [0.2, 0.7]}},
    ]


def write_docs(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def mergekit_multi(config: Path, out: Path, work: Path) -> Path:
    done = subprocess.run([str(Path(sys.executable).parent / "mergekit-multi"), str(config), "--out-path", str(out),
                           "-I", str(work), "--random-seed", str(SEED)], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("arch", ["phi", "llama"])
def test_chain_matches_mergekit_multi(families, tmp_path, arch):
    path = write_docs(tmp_path / "chain.yml", three_stages(families[arch]))
    expected = load_folder(mergekit_multi(path, tmp_path / "mk", tmp_path / "inter"))
    ours = run_cli("merge", str(path), str(tmp_path / "ours"), "--random-seed", str(SEED))
    assert ours.returncode == 0, ours.stderr
    written = load_folder(tmp_path / "ours")
    off = {n: r for n, r in ulp_report(written, expected).items() if r[0]}
    assert not off, off
    # The chain run again in memory (what a study's candidate does) equals the written folder bit for bit.
    chain = ChainPlan(parse_chain(three_stages(families[arch])), seed=SEED)
    for name, tensor in stream_tensors(chain.final, seed=SEED):
        assert torch.equal(tensor, written[name]), name
    assert "name: first" in (tmp_path / "ours" / "mergekit_config.yml").read_text()


def test_stage_order_does_not_matter(families, tmp_path):
    docs = three_stages(families["phi"])
    a = write_docs(tmp_path / "a.yml", docs)
    b = write_docs(tmp_path / "b.yml", [docs[1], docs[0], docs[2]])  # a stage may come before the one it uses
    for path, out in ((a, "out_a"), (b, "out_b")):
        assert run_cli("merge", str(path), str(tmp_path / out), "--random-seed", str(SEED)).returncode == 0
    one, two = load_folder(tmp_path / "out_a"), load_folder(tmp_path / "out_b")
    assert all(torch.equal(one[n], two[n]) for n in one)


@pytest.mark.parametrize("case", ["cycle", "unknown_stage", "two_unnamed", "duplicate", "two_finals",
                                  "adapter_on_stage"])
def test_chain_errors(families, tmp_path, case):
    docs = three_stages(families["phi"])
    needles = {
        "cycle": ("cycle", "first -> second -> first"),
        "unknown_stage": ("stage (final)", "secnd", "no such folder", "did you mean stage 'second'"),
        "two_unnamed": ("document 2", "only the final document may be unnamed"),
        "duplicate": ("document 2", "'first' is used twice"),
        "two_finals": ("stages", "are all final"),
        "adapter_on_stage": ("stage (final)", "second+", "LoRA adapter on stage second", "search merge"),
    }[case]
    if case == "cycle":
        docs[0]["models"][1] = {"model": "second"}
    elif case == "unknown_stage":
        docs[2]["slices"][0]["sources"][0]["model"] = "secnd"
        docs[2]["base_model"] = "secnd"
    elif case == "two_unnamed":
        docs[1].pop("name")
    elif case == "duplicate":
        docs[1]["name"] = "first"
    elif case == "adapter_on_stage":  # mergekit-multi applies it to the stage's folder; ours is in memory
        docs[2]["slices"][0]["sources"][0]["model"] = f"second+{tmp_path / 'adapter'}"
    else:
        docs[2]["name"] = "third"
        docs.append(dict(docs[2], name="fourth"))
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(write_docs(tmp_path / "chain.yml", docs)), str(out)), *needles, out=out)


def test_chain_candidate_in_memory_equals_search_merge(families, tmp_path):
    """A chain candidate with other numbers, built into a live model, equals `search merge` of its YAML."""
    docs = three_stages(families["llama"])
    chain = ChainPlan(parse_chain(docs), seed=SEED)
    from merge_core.chain import ChainMerger

    merger = ChainMerger(chain)
    model = merger.new_model()
    other = [dict(d) for d in docs]
    other[0]["parameters"] = {"t": [{"filter": "mlp", "value": [0.9, 0.1]}, {"value": 0.6}]}
    other[1]["models"][0]["parameters"] = {"weight": 0.2, "density": 0.5}
    other[2]["parameters"] = {"t": 0.8}
    merger.build_into(model)  # the plan's own chain first: nothing of it may leak into the next
    merger.build_into(model, parse_chain(other))
    path = write_docs(tmp_path / "other.yml", other)
    assert run_cli("merge", str(path), str(tmp_path / "ours"), "--random-seed", str(SEED)).returncode == 0
    written = load_folder(tmp_path / "ours")
    live = {n: p.detach() for n, p in model.state_dict().items() if n in written}
    assert sorted(live) == sorted(written)
    assert all(torch.equal(live[n], written[n]) for n in written)


def test_a_stage_whose_pairing_drops_sources_is_named_in_the_warning(families, tmp_path):
    """mergekit merges the tensors after the layers with one input per source of the first slice;
    in a chain the warning says which stage leaves models out."""
    f = families["llama"]
    c1, c2, c3 = (str(f[n]) for n in ("child_1", "child_2", "child_3"))
    uneven = {"name": "uneven", "merge_method": "linear", "dtype": "float32", "slices": [
        {"sources": [{"model": c1, "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                     {"model": c2, "layer_range": [0, 2], "parameters": {"weight": 0.5}}]},
        {"sources": [{"model": m, "layer_range": [2, 4], "parameters": {"weight": w}}
                     for m, w in ((c1, 0.2), (c2, 0.3), (c3, 0.5))]}]}
    final = {"merge_method": "linear", "dtype": "float32",
             "models": [{"model": "uneven", "parameters": {"weight": 0.5}},
                        {"model": c3, "parameters": {"weight": 0.5}}]}
    path = write_docs(tmp_path / "chain.yml", [uneven, final])
    result = run_cli("merge", str(path), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    said = [" ".join(line.split()) for line in (result.stdout + result.stderr).splitlines() if "more sources" in line]
    assert len(said) == 1 and said[0].startswith("stage uneven: the last slice has more sources"), said
    assert c3 in said[0]
