"""mergekit's own method test configurations (tests/test_basic_merges.py of arcee-ai/mergekit at
a6e4028) run on our fine-tune-like families instead of its random pico models, through
`mergekit-yaml` and through us: every tensor within 1 ulp, the in-memory candidate bit-identical.

Their models map to ours as model_a -> child_1, model_b -> child_2, model_c -> base. Their helper
gives every model `weight` (0.6, 0.4) and merges in bfloat16 whatever the method; both tools ignore
parameters a method does not take (we say so in one warning line), so such configs are checked to
merge as written exactly as without those parameters, and compared with mergekit without them.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.conftest import run_cli
from tests.merge_core.test_methods_more_oracle import assert_matches
from tests.merge_core.test_oracle import load_folder

MODELS = {"a": "child_1", "b": "child_2", "c": "base"}


def two_models(method, a="a", b="b", base=None, params=None, weights=(0.6, 0.4)):
    """Their `two_model_config`: two weighted models, optional base, bfloat16."""
    return {"method": method, "models": [(a, weights[0]), (b, weights[1])], "base": base, "params": params or {}}


# (test name in test_basic_merges.py, config); nuslerp's loop unrolled.
CONFIGS = [
    ("test_linear_merge", two_models("linear")),
    ("test_slerp_merge", two_models("slerp", base="a", params={"t": 0.35})),
    *[(f"test_nuslerp_merges[base={base},row_wise={row},flatten={flat}]",
       two_models("nuslerp", base=base, params={"nuslerp_row_wise": row, "nuslerp_flatten": flat}))
      for base in (None, "c") for row in (False, True) for flat in (False, True)],
    ("test_nuslerp_merges[weights sum to zero]",
     two_models("nuslerp", base="c", params={"nuslerp_row_wise": False, "nuslerp_flatten": False},
                weights=(-0.5, 0.5))),
    ("test_task_arithmetic_merge", two_models("task_arithmetic", base="c")),
    ("test_breadcrumbs_merge", two_models("breadcrumbs", base="c")),
    ("test_ties_merge", two_models("ties", base="c", params={"density": 0.3})),
    ("test_sce_merge", two_models("sce", base="c", params={"select_topk": 0.5})),
    ("test_ram_merge", two_models("ram", base="c")),
    ("test_ramplus_tl_merge", two_models("ramplus_tl", base="c", params={"r": 0.05, "alpha": 1.0})),
    ("test_multislerp_merge", two_models("multislerp", base="c")),
    ("test_dare_ties_merge", two_models("dare_ties", base="c", params={"density": 0.66})),
    ("test_model_stock_merge", two_models("model_stock", a="b", b="c", base="a")),
    ("test_model_stock_filterwise_merge", two_models("model_stock", a="b", b="c", base="a",
                                                     params={"filter_wise": True})),
    ("test_arcee_fusion_merge", two_models("arcee_fusion", base="a")),
    ("test_nearswap_merge", two_models("nearswap", base="a", params={"t": 0.0001})),
    ("test_della_merge", two_models("della", base="c", params={"density": 0.66, "epsilon": 0.05, "lambda": 0.5})),
    ("test_karcher_merge", two_models("karcher", base="c", params={"max_iter": 5, "tol": 1e-5})),
]
# bfloat16 results mergekit leaves in float32 (see test_methods_more_oracle.py): compared with
# out_dtype bfloat16, which rounds mergekit's result as we do.
FLOAT32_RESULT = {"arcee_fusion", "ramplus_tl"}


def _method_parameters(method: str) -> set[str]:
    from mergekit import merge_methods

    return {p.name for p in merge_methods.get(method).spec.parameters}


def config_for(f, spec, keep_unknown: bool) -> dict:
    """A mergekit config dict of one of their configurations on family `f`."""
    known = _method_parameters(spec["method"])
    models = []
    for key, weight in spec["models"]:
        params = {"weight": weight} if keep_unknown or "weight" in known else {}
        models.append({"model": str(f[MODELS[key]])} | ({"parameters": params} if params else {}))
    config = {"merge_method": spec["method"], "dtype": "bfloat16", "models": models}
    if spec["base"]:
        config["base_model"] = str(f[MODELS[spec["base"]]])
    params = {k: v for k, v in spec["params"].items() if keep_unknown or k in known}
    if params:
        config["parameters"] = params
    if spec["method"] in FLOAT32_RESULT:
        config["out_dtype"] = "bfloat16"
    return config


@pytest.mark.parametrize("arch", ["phi", "llama"])
@pytest.mark.parametrize("name,spec", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_mergekit_configuration(families, tmp_path, arch, name, spec):
    f = families[arch]
    raw = config_for(f, spec, keep_unknown=True)
    config = config_for(f, spec, keep_unknown=False)
    if raw != config:  # `weight` where the method takes none: ignored, as mergekit ignores it, and said so
        for name, doc in (("raw", raw), ("clean", config)):
            (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(doc))
            result = run_cli("merge", str(tmp_path / f"{name}.yml"), str(tmp_path / name))
            assert result.returncode == 0, result.stderr
            assert ("ignored, as mergekit" in " ".join(result.stderr.split())) == (name == "raw"), result.stderr
        ignored, clean = load_folder(tmp_path / "raw"), load_folder(tmp_path / "clean")
        assert sorted(ignored) == sorted(clean) and all(torch.equal(ignored[n], clean[n]) for n in clean)
    body = {k: v for k, v in config.items() if k not in ("merge_method", "dtype", "base_model", "out_dtype")}
    extra = {k: config[k] for k in ("out_dtype",) if k in config}
    assert_matches(families, tmp_path, spec["method"], arch, "bfloat16", lambda _: body, config.get("parameters"),
                   False, extra | ({"base_model": config["base_model"]} if "base_model" in config else {}))


def test_della_invalid_epsilon(families, tmp_path):
    """Their test_della_invalid_epsilon: mergekit raises ValueError; we exit 2 with one line."""
    from tests.merge_core.test_methods_oracle import mergekit_merge

    f = families["llama"]
    config = config_for(f, two_models("della", base="c", params={"density": 0.66, "epsilon": 1.35, "lambda": 0.5}),
                        keep_unknown=True)
    with pytest.raises(ValueError):
        mergekit_merge(config, tmp_path / "mergekit")
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    result = run_cli("merge", str(tmp_path / "config.yml"), str(tmp_path / "ours"))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "epsilon" in result.stderr


def test_passthrough_scale(families, tmp_path):
    """Their test_passthrough_scale: o_proj scaled to 0 (phi has no o_proj: its filter misses)."""
    for arch in ("phi", "llama"):
        f = families[arch]
        (tmp_path / arch).mkdir()
        body = {"models": [{"model": str(f["child_1"]), "parameters": {
            "scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]}
        written, _ = assert_matches(families, tmp_path / arch, "passthrough", arch, None, lambda _, b=body: b, None,
                                    False, {})
        zeroed = [n for n in written if "o_proj" in n]
        assert (arch == "phi") or (zeroed and all(not written[n].any() for n in zeroed))


def test_stack(families, tmp_path):
    """Their test_gpt2_stack: the same layer range twice doubles the layers (bfloat16)."""
    f = families["llama"]
    body = {"slices": [{"sources": [{"model": str(f["child_1"]), "layer_range": [0, 4]}]}] * 2}
    written, _ = assert_matches(families, tmp_path, "passthrough", "llama", "bfloat16", lambda _: body, None, False, {})
    assert any(".layers.7." in n for n in written)
