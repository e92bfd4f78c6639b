"""Every merge method against mergekit on fine-tune-like families: `search merge` and the
in-memory candidate within 1 ulp of `mergekit-yaml` (same --random-seed), and bit-identical to
each other."""

from __future__ import annotations

import pytest
import torch
import yaml

from merge_core.config import parse_config
from merge_core.merger import MergePlan, Merger
from merge_core.methods import sparsify
from tests.conftest import run_cli
from tests.merge_core.test_oracle import load_folder, ordered_bits

SEED = 7
PER_FILTER_DENSITY = [{"filter": "mlp", "value": [0.3, 0.7]}, {"filter": "self_attn", "value": 0.5}, {"value": 0.6}]


def models_form(f, weights=None, with_base=True, **per_model):
    """`models:` over the children (and the base), each with its weight and extra parameters."""
    models = [{"model": str(f["base"])}] if with_base else []
    for i, name in enumerate(("child_1", "child_2", "child_3")):
        params = {} if weights == () else {"weight": (weights or [0.5, 0.3, 0.4])[i]}
        params |= {k: v[i] for k, v in per_model.items()}
        models.append({"model": str(f[name])} | ({"parameters": params} if params else {}))
    return {"models": models}


def source(f, name, start, stop) -> dict:
    return {"model": str(f[name]), "layer_range": [start, stop]}


def case(method, arch, dtype, body, parameters=None, base=True):
    return (method, arch, dtype, body, parameters or {}, base)


CASES = [
    case("linear", "phi", "float16", lambda f: models_form(f, [[0.2, 0.8], 0.3, [{"filter": "mlp", "value": 0.9},
                                                                              {"value": 0.1}]], with_base=False),
         base=False),
    case("linear", "llama", "bfloat16", lambda f: models_form(f, with_base=False), {"normalize": False}, base=False),
    case("task_arithmetic", "phi", "float16", lambda f: models_form(f), {"lambda": 0.8}),
    case("task_arithmetic", "llama", "float32", lambda f: models_form(f, [1.0, -0.5, 0.7])),
    case("ties", "phi", "float16", lambda f: models_form(f, density=[PER_FILTER_DENSITY, 0.5, [0.2, 0.9]])),
    case("ties", "llama", "float32", lambda f: models_form(f, density=[0.4, 0.5, 0.6]),
         {"normalize": False, "int8_mask": True}),
    case("ties", "phi", "bfloat16", lambda f: models_form(f, with_base=False, density=[0.4, 0.5, 0.6])),
    case("dare_ties", "phi", "float16", lambda f: models_form(f, density=[0.5, [0.3, 0.8], 0.7])),
    case("dare_ties", "llama", "bfloat16", lambda f: models_form(f, density=[0.5, 0.6, 0.7]), {"rescale": False}),
    case("dare_linear", "llama", "float32", lambda f: models_form(f, density=[0.4, 1.0, 0.8])),
    case("breadcrumbs", "phi", "float16", lambda f: models_form(f, density=[0.8, 0.7, 0.9], gamma=[0.05, 0.1, 0.02])),
    case("breadcrumbs_ties", "llama", "float32", lambda f: models_form(f, density=[0.8, 0.7, 0.9])),
    case("della", "phi", "float16", lambda f: models_form(f, density=[0.5, 0.6, 0.4], epsilon=[0.1, 0.2, 0.1])),
    case("della_linear", "llama", "float32", lambda f: models_form(f, density=[0.5, 0.6, 0.7]), {"lambda": 1.1}),
    case("della", "llama", "bfloat16", lambda f: models_form(f, density=[0.5, 0.6, 0.4])),
    case("model_stock", "phi", "float16", lambda f: models_form(f, ())),
    case("model_stock", "llama", "float32", lambda f: models_form(f, ()), {"filter_wise": True}),
    case("passthrough", "llama", "float16", lambda f: {"slices": [
        {"sources": [{"model": str(f["child_1"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(f["child_2"]), "layer_range": [1, 4], "parameters": {"scale": [
            {"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.25}, {"value": 1.0}]}}]},
    ]}, base=False),
    case("slerp", "phi", "float16", lambda f: {"slices": [
        {"sources": [source(f, "base", 0, 2), source(f, "child_1", 0, 2)]},
        {"sources": [source(f, "child_2", 2, 4), source(f, "child_3", 2, 4)],
         "base_model": str(f["child_3"]), "parameters": {"t": [0.2, 0.9]}},
    ]}, {"t": [{"filter": "mlp", "value": [0, 1]}, {"value": 0.3}]}),
]
IDS = [f"{c[0]}-{c[1]}-{c[2]}" for c in CASES]
# Magnitude methods on half-precision deltas can tie at the pruning threshold; see sparsify.py.
MAGNITUDE = {"ties", "breadcrumbs", "breadcrumbs_ties"}


def full_config(families, method, arch, dtype, body, parameters, base) -> dict:
    f = families[arch]
    config = {"merge_method": method, "dtype": dtype, **body(f)}
    if base:
        config["base_model"] = str(f["base"])
    if parameters:
        config["parameters"] = parameters
    return config


def mergekit_merge(config: dict, out, seed: int | None = SEED):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(quiet=True, write_model_card=False, random_seed=seed))
    return out


def ulp_report(ours: dict, theirs: dict) -> dict[str, tuple[int, int]]:
    """Per tensor: (elements more than 1 ulp apart, element count); names/shapes/dtypes must agree."""
    assert sorted(ours) == sorted(theirs)
    report = {}
    for name, expected in theirs.items():
        got = ours[name]
        assert (got.shape, got.dtype) == (expected.shape, expected.dtype), name
        if not got.is_floating_point():
            assert torch.equal(got, expected), name
            continue
        ulps = (ordered_bits(got.contiguous()) - ordered_bits(expected.contiguous())).abs()
        report[name] = (int((ulps > 1).sum()), got.numel())
    return report


@pytest.mark.parametrize("method,arch,dtype,body,parameters,base", CASES, ids=IDS)
def test_method_matches_mergekit(families, tmp_path, method, arch, dtype, body, parameters, base):
    config = full_config(families, method, arch, dtype, body, parameters, base)
    expected = load_folder(mergekit_merge(config, tmp_path / "mergekit"))

    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    result = run_cli("merge", str(tmp_path / "config.yml"), str(tmp_path / "ours"), "--random-seed", str(SEED))
    assert result.returncode == 0, result.stderr
    written = load_folder(tmp_path / "ours")
    report = ulp_report(written, expected)
    off = {n: r for n, r in report.items() if r[0]}
    if method in MAGNITUDE and dtype != "float32":
        # Only elements tied at the threshold may differ: a handful per tensor, never more than 2%.
        assert all(bad <= max(4, 0.02 * n) for bad, n in off.values()), off
    else:
        assert not off, off

    merger = Merger(MergePlan(parse_config(config)), seed=SEED)
    model = merger.new_model()
    merger.build_into(model)
    live = {n: p.detach() for n, p in model.state_dict().items() if n in written}
    assert sorted(live) == sorted(written)
    for name, tensor in written.items():
        assert torch.equal(live[name], tensor), f"{name}: in-memory candidate differs from search merge"
    # A second candidate with the same parameters draws the same masks: one seed per candidate.
    merger.build_into(model)
    assert all(torch.equal(p.detach(), written[n]) for n, p in model.state_dict().items() if n in written)


def test_ties_at_the_threshold():
    """torch's CPU argsort is not stable, so mergekit's choice among equal magnitudes is arbitrary;
    we keep the lowest indices among them, and the same number of them."""
    from mergekit.sparsify import magnitude as mergekit_magnitude

    delta = torch.tensor([0.5, -0.25, 0.25, 0.25, -0.25, 1.0, 0.25, 0.125] * 64, dtype=torch.float16)
    ours = sparsify.magnitude(delta, 0.3, rescale=False)
    theirs = mergekit_magnitude(delta, 0.3)
    k = int(0.3 * delta.numel())
    assert int((ours != 0).sum()) == int((theirs != 0).sum()) == k
    # Same magnitudes kept: everything above the tied magnitude, and equally many of the tied ones.
    assert torch.equal(ours.abs().sort().values, theirs.abs().sort().values)
    tied = (delta.abs() == 0.25).nonzero().flatten()
    kept_tied = tied[(ours[tied] != 0)]
    assert torch.equal(kept_tied, tied[: len(kept_tied)]), "lowest indices first among equal magnitudes"
    w = delta.abs().float()
    assert not torch.equal(torch.argsort(w, descending=True), torch.sort(w, descending=True, stable=True).indices)


def _crossed(f, method: str) -> dict:
    """Two slices whose sources take crossed layer ranges: output layers 0 and 2 share their largest
    source tensor name (and 1 and 3)."""
    def sources(first: list[int], second: list[int]) -> list[dict]:
        return [{"model": str(f["base"]), "layer_range": first}, {"model": str(f["child_1"]), "layer_range": second},
                {"model": str(f["child_2"]), "layer_range": first}]

    return {"merge_method": method, "base_model": str(f["base"]), "dtype": "float32",
            "parameters": {"weight": 0.5, "density": 0.6},
            "slices": [{"sources": sources([0, 2], [2, 4])}, {"sources": sources([2, 4], [0, 2])}]}


def test_outputs_merged_in_mergekit_internal_order_are_named(families, tmp_path):
    # crossed ranges: mergekit runs the tied outputs in its task graph's own order, so a seeded DARE
    # merge says which masks may differ from mergekit-yaml's; a merge without ties, or without a seed,
    # or of a deterministic method, says nothing
    f = families["llama"]
    crossed = _crossed(f, "dare_ties")
    plan = MergePlan(parse_config(crossed))
    tied = plan.order_ties()
    assert tied and all(".layers." in name for name in tied)
    plain = {"merge_method": "dare_ties", "base_model": str(f["base"]), "dtype": "float32",
             "parameters": {"density": 0.6}, **models_form(f)}
    assert not MergePlan(parse_config(plain)).order_ties()
    (tmp_path / "crossed.yml").write_text(yaml.safe_dump(crossed))
    (tmp_path / "ties.yml").write_text(yaml.safe_dump(_crossed(f, "ties")))
    result = run_cli("merge", str(tmp_path / "crossed.yml"), str(tmp_path / "a"), "--random-seed", "7")
    assert result.returncode == 0, result.stderr
    said = " ".join((result.stdout + result.stderr).split())
    assert f"{len(tied)} tensors" in said and "may differ" in said
    for args in (["crossed.yml", "b"], ["ties.yml", "c", "--random-seed", "7"]):
        result = run_cli("merge", str(tmp_path / args[0]), str(tmp_path / args[1]), *args[2:])
        assert result.returncode == 0, result.stderr
        assert "may differ" not in result.stdout + result.stderr
