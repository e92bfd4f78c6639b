"""mergekit's other spellings of a config: the ones mergekit-yaml merges are merged the same (within
1 ulp of mergekit, read back in one form that exports and re-merges the same); the ones merge-search
cannot do exactly are refused with one line that names the field and says what to write instead."""

from __future__ import annotations

import pytest
import torch
import yaml

from merge_core.config import parse_config
from merge_core.errors import MergeInputError
from merge_core.merger import MergePlan, Merger
from tests.conftest import run_cli
from tests.merge_core.test_merge_bad_input import assert_refused
from tests.merge_core.test_methods_oracle import mergekit_merge
from tests.merge_core.test_oracle import load_folder
from tests.search.conftest import write_task


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Float bits as integers whose difference counts ulps (float64 too, which test_oracle's does not take)."""
    bits = x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]).long()
    magnitude = bits & ((1 << (8 * x.element_size() - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def assert_within_one_ulp(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        got = ours[name]
        assert (got.shape, got.dtype) == (expected.shape, expected.dtype), name
        ulps = (ordered_bits(got.contiguous()) - ordered_bits(expected.contiguous())).abs()
        assert int(ulps.max()) <= 1, f"{name}: {int((ulps > 1).sum())} elements more than 1 ulp from mergekit"


def two(f, weights=("0.5", "0.5")) -> str:
    return (f"models:\n  - model: {f['child_1']}\n    parameters: {{weight: {weights[0]}}}\n"
            f"  - model: {f['child_2']}\n    parameters: {{weight: {weights[1]}}}\n")


# YAML text, not dicts: quoting is the point of some cases.
ACCEPTED = {
    "dtype_torch_prefix": lambda f: "merge_method: linear\ndtype: torch.bfloat16\n" + two(f, (0.5, 0.5)),
    "out_dtype_torch_prefix": lambda f: "merge_method: linear\nout_dtype: torch.float16\n" + two(f, (0.5, 0.5)),
    "dtype_empty_is_none": lambda f: "merge_method: linear\ndtype: ''\n" + two(f, (0.5, 0.5)),
    "dtype_float64_linear": lambda f: "merge_method: linear\ndtype: float64\n" + two(f, (0.5, 0.3)),
    "dtype_float64_slerp": lambda f: (
        f"merge_method: slerp\nbase_model: {f['child_1']}\ndtype: float64\nparameters: {{t: [0, 0.3, 1]}}\n"
        f"models:\n  - model: {f['child_1']}\n  - model: {f['child_2']}\n"),
    "dtype_float64_ties": lambda f: (
        f"merge_method: ties\nbase_model: {f['base']}\ndtype: torch.float64\nparameters: {{density: 0.5}}\n"
        + two(f, (0.5, 0.3))),
    "quoted_numbers": lambda f: (
        f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {f['child_1']}\n    parameters: {{weight: '0.3'}}\n"
        f"  - model: {f['child_2']}\n    parameters:\n      weight: [{{filter: mlp, value: ['0.2', 0.8]}}, "
        "{value: ' 1e-1 '}]\n"),
    "quoted_switch_and_bool_weight": lambda f: (
        "merge_method: linear\nparameters: {normalize: 'no'}\n" + two(f, ("true", "'0.25'"))),
    "quoted_t": lambda f: (
        f"merge_method: slerp\nbase_model: {f['child_1']}\nparameters: {{t: ['0', '0.5', 1]}}\n"
        f"models:\n  - model: {f['child_1']}\n  - model: {f['child_2']}\n"),
    "model_dict_forms": lambda f: (
        f"merge_method: task_arithmetic\nbase_model: {{model: {{path: {f['base']}}}}}\nmodels:\n"
        f"  - model: {{model: {{path: {f['child_1']}, revision: null}}}}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {{model: {f['child_2']}}}\n    parameters: {{weight: 0.3}}\n"),
    "slice_residual_weight": lambda f: (
        "merge_method: linear\nslices:\n  - sources:\n"
        f"      - {{model: {{model: {{path: {f['child_1']}}}}}, layer_range: [0, 4], parameters: {{weight: 1}}}}\n"
        f"      - {{model: {f['child_2']}, layer_range: [0, 4], parameters: {{weight: '1'}}}}\n"
        "    residual_weight: 0.5\n"),
    # mergekit pairs the tensors after the layers with the first slice's source count: child_3 takes
    # no part in the final norm and lm_head (search merge warns)
    "last_slice_with_more_sources": lambda f: (
        "merge_method: linear\ndtype: float32\nslices:\n  - sources:\n"
        f"      - {{model: {f['child_1']}, layer_range: [0, 2], parameters: {{weight: 0.5}}}}\n"
        f"      - {{model: {f['child_2']}, layer_range: [0, 2], parameters: {{weight: 0.5}}}}\n"
        "  - sources:\n"
        f"      - {{model: {f['child_1']}, layer_range: [2, 4], parameters: {{weight: 0.2}}}}\n"
        f"      - {{model: {f['child_2']}, layer_range: [2, 4], parameters: {{weight: 0.3}}}}\n"
        f"      - {{model: {f['child_3']}, layer_range: [2, 4], parameters: {{weight: 0.5}}}}\n"),
    "tokenizer_section_source_only": lambda f: (
        f"merge_method: linear\nbase_model: {f['child_1']}\ntokenizer: {{source: base}}\n" + two(f)),
    "tokenizer_source_union": lambda f: (
        f"merge_method: linear\nbase_model: {f['child_1']}\ntokenizer_source: union\n" + two(f)),
    "tokenizer_default_union": lambda f: (
        f"merge_method: linear\nbase_model: {f['child_1']}\ntokenizer: {{}}\n" + two(f)),
    "tokenizer_tokens_and_padding": lambda f: (
        f"merge_method: linear\nbase_model: {f['child_1']}\n" + two(f) + "tokenizer:\n  pad_to_multiple_of: 8\n"
        "  tokens:\n    <x>: {source: {kind: zero}}\n    cat:\n      force: true\n"
        f"      source: {{kind: model_token, model: {f['child_2']}, token: dog}}\n"
        f"    dog: {{source: {f['child_1']}}}\n"),
}


@pytest.mark.parametrize("form", list(ACCEPTED))
def test_accepted_form_matches_mergekit(families, tmp_path, form):
    text = ACCEPTED[form](families["llama"])
    path = tmp_path / "config.yml"
    path.write_text(text)
    expected = load_folder(mergekit_merge(yaml.safe_load(text), tmp_path / "mergekit", seed=None))

    result = run_cli("merge", str(path), str(tmp_path / "ours"))
    assert result.returncode == 0, result.stderr
    written = load_folder(tmp_path / "ours")
    assert_within_one_ulp(written, expected)

    # The in-memory candidate (what a study scores) is the same model.
    config = parse_config(yaml.safe_load(text))
    merger = Merger(MergePlan(config))
    model = merger.new_model()
    merger.build_into(model)
    for name, tensor in model.state_dict().items():
        if name in written:
            assert torch.equal(tensor.detach(), written[name]), name

    # Read back in one form: the written YAML re-parses to the same config and mergekit merges it the same.
    exported = (tmp_path / "ours" / "mergekit_config.yml").read_text()
    assert parse_config(yaml.safe_load(exported)) == config
    again = load_folder(mergekit_merge(yaml.safe_load(exported), tmp_path / "mergekit_again", seed=None))
    for name, tensor in expected.items():
        assert torch.equal(again[name], tensor), name


def test_parsed_forms(families):
    """What each spelling becomes: the one form the rest of the code and the exports see."""
    f = families["llama"]
    config = parse_config(yaml.safe_load(ACCEPTED["quoted_numbers"](f)))
    assert config.models[0].parameters["weight"] == 0.3
    assert config.models[1].parameters["weight"][0].value == [0.2, 0.8]
    assert config.models[1].parameters["weight"][1].value == 0.1
    config = parse_config(yaml.safe_load(ACCEPTED["quoted_switch_and_bool_weight"](f)))
    assert config.parameters["normalize"] is False and config.models[0].parameters["weight"] == 1.0
    config = parse_config({"merge_method": "linear", "dtype": "torch.float64", "out_dtype": "torch.bfloat16",
                           "models": [{"model": {"model": {"path": "org/name", "revision": "v2"}}}]})
    assert (config.dtype, config.out_dtype, config.models[0].model) == ("float64", "bfloat16", "org/name@v2")
    config = parse_config({"merge_method": "karcher", "parameters": {"max_iter": "12", "tol": "1e-6"},
                           "models": [{"model": "a"}, {"model": "b"}], "tokenizer": {"source": "b"}})
    assert config.parameters == {"max_iter": 12, "tol": 1e-6} and config.tokenizer_source == "b"
    # A parameter the method does not take, or an unknown method, is left for the plan to report.
    assert parse_config({"merge_method": "linear", "models": [{"model": "a", "parameters": {"wieght": "x"}}]}
                        ).models[0].parameters["wieght"] == "x"


REFUSED = {
    # form -> (config change, words the one line must hold: the field, then what to write instead)
    "chat_template_mergekit_only": ({"chat_template": "alpaca"}, ["chat_template:", "Jinja text", "chatml"]),
    "chat_template_not_a_template": ({"chat_template": "chat-ml"}, ["chat_template:", "neither a template name"]),
    "tokenizer_model_token_twice": ({"tokenizer": {"tokens": {"<x>": {"source": {
        "kind": "model_token", "model": "CHILD", "token": "cat", "token_id": 3}}}}},
        ["tokenizer.tokens.<x>.source", "one of token or token_id"]),
    "tokenizer_padding_zero": ({"tokenizer": {"pad_to_multiple_of": 0}},
                               ["tokenizer.pad_to_multiple_of:", "greater than or equal to 1"]),
    "tokenizer_twice": ({"tokenizer_source": "base", "tokenizer": {"source": "base"}}, ["tokenizer:", "not both"]),
    "modules": ({"modules": {"text": {"models": []}}}, ["modules:", "top-level `models:` or `slices:`"]),
    "lora_path_typo": ({"models": [{"model": {"model": "CHILD", "lora": {"pth": "org/adapter"}},
                                    "parameters": {"weight": 1}}]}, ["models.0.model:", "'pth'", "lora path"]),
    "lora_plus_twice": ({"models": [{"model": "CHILD+org/a+org/b", "parameters": {"weight": 1}}]},
                        ["models.0.model:", "model+adapter", "one `+`"]),
    "override_architecture": ({"base_model": {"model": "CHILD", "override_architecture": "LlamaForCausalLM"}},
                              ["base_model:", "override_architecture", "remove it"]),
    "model_path_typo": ({"models": [{"model": {"model": {"pth": "CHILD"}}, "parameters": {"weight": 1}}]},
                        ["models.0.model:", "'pth'", "path and revision"]),
    "weight_not_a_number": ({"models": [{"model": "CHILD", "parameters": {"weight": "abc"}}]},
                            ["models.0.parameters.weight:", "a number (like 0.5)", "'abc'"]),
    "switch_not_a_bool": ({"parameters": {"normalize": "maybe"}}, ["parameters.normalize:", "true or false"]),
    # mergekit takes int64 and rounds every weight to an integer (two models: fails on a norm's buffer)
    "dtype_int64": ({"dtype": "torch.int64"}, ["dtype:", "not a float type", "float16, bfloat16, float32, float64"]),
    "dtype_unknown": ({"dtype": "fp16"}, ["dtype:", "float16, bfloat16, float32, float64", "'fp16'"]),
}


def refused_config(f, form: str) -> str:
    """The YAML text of a one-model linear merge with the form's change (CHILD: the child's folder)."""
    child = str(f["child_1"])
    config = {"merge_method": "linear", "base_model": "CHILD",
              "models": [{"model": "CHILD", "parameters": {"weight": 0.5}}]} | REFUSED[form][0]
    return yaml.safe_dump(config).replace("CHILD", child)


@pytest.mark.parametrize("form", list(REFUSED))
def test_refused_form(families, tmp_path, form):
    needles = REFUSED[form][1]
    path = tmp_path / "config.yml"
    path.write_text(refused_config(families["llama"], form))
    out = tmp_path / "out"
    result = run_cli("merge", str(path), str(out))
    assert_refused(result, str(path), *needles, out=out)


PLAN_REFUSED = {
    # refused when the config meets its models (no file path in the line)
    "tokenizer_token_of_another_model": ({"tokenizer": {"tokens": {"<x>": {"source": "org/other"}}}},
                                         ["tokenizer.tokens.<x>:", "org/other", "not one of the merge's models"]),
    "tokenizer_token_without_source": ({"tokenizer": {"tokens": {"<x>": {"force": True}}}},
                                       ["tokenizer.tokens.<x>:", "no source", "kind: zero"]),
    "tokenizer_token_from_a_model_without_it": ({"tokenizer": {"tokens": {"<x>": {"source": "CHILD"}}}},
                                                ["tokenizer.tokens.<x>:", "lacks the token"]),
    "tokenizer_model_token_unknown": ({"tokenizer": {"tokens": {"<x>": {"source": {
        "kind": "model_token", "model": "CHILD", "token": "zebra"}}}}}, ["tokenizer.tokens.<x>:", "'zebra'"]),
    "lora_adapter_not_downloaded": ({"models": [{"model": {"model": "CHILD", "lora": "org/adapter"},
                                                 "parameters": {"weight": 1}}]},
                                    ["LoRA adapter org/adapter:", "not in the local Hugging Face cache"]),
}


@pytest.mark.parametrize("form", list(PLAN_REFUSED))
def test_refused_when_planned(families, tmp_path, form):
    child = str(families["llama"]["child_1"])
    config = {"merge_method": "linear", "base_model": "CHILD",
              "models": [{"model": "CHILD", "parameters": {"weight": 0.5}}]} | PLAN_REFUSED[form][0]
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config).replace("CHILD", child))
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(path), str(out)), *PLAN_REFUSED[form][1], out=out)


@pytest.mark.parametrize("form,mergekit_says", [("weight_not_a_number", "valid number"),
                                                 ("dtype_unknown", "Unimplemented dtype"),
                                                 ("tokenizer_twice", "both tokenizer_source and tokenizer"),
                                                 ("lora_plus_twice", "Can't parse")])
def test_mergekit_refuses_these_too(families, tmp_path, form, mergekit_says):
    """Where mergekit-yaml fails as well, the refusal is not a gap."""
    config = yaml.safe_load(refused_config(families["llama"], form))
    with pytest.raises(Exception, match=mergekit_says):
        mergekit_merge(config, tmp_path / "mk", seed=None)
    with pytest.raises(MergeInputError):
        parse_config(config)


def test_forms_in_a_study_init_start_export(families, tmp_path):
    """`search init` over a config in mergekit's other spellings: the quoted weight is searched as a number,
    trial 0 is the config, and `search export` writes YAML in one form that mergekit merges the same."""
    f = families["llama"]
    text = (f"merge_method: linear\ndtype: torch.float32\nbase_model: {{model: {{path: {f['child_1']}}}}}\n"
            "tokenizer: {source: base}\nslices:\n  - sources:\n"
            f"      - {{model: {{model: {{path: {f['child_1']}}}}}, layer_range: [0, 4],\n"
            "         parameters: {weight: '0.3'}}\n"
            f"      - {{model: {f['child_2']}, layer_range: [0, 4], parameters: {{weight: ['0.5', 0.9]}}}}\n"
            "    residual_weight: 0.5\n")
    config_path = tmp_path / "forms.yml"
    config_path.write_text(text)
    made = run_cli("init", str(config_path), "--tasks", "toy_a", "--n-trials", "2")
    assert made.returncode == 0, made.stderr
    study_path = tmp_path / "forms.study.yaml"
    study = yaml.safe_load(study_path.read_text())
    assert [(i["parameter"], i.get("anchors")) for i in study["search_space"]] == [("weight", 1), ("weight", 2)]

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, "toy_a", 1)
    study["study"] |= {"storage": f"sqlite:///{tmp_path / 'forms.db'}", "sampler": "random"}
    study["objectives"] = {"include_path": [str(tasks)], "batch_size": 8, "tasks": [
        {"name": "toy_a", "metric": "acc", "search_items": 10, "holdout_items": 10}]}
    study["pruner"] = {"type": "none"}
    study["export"] = {"top_k": 2, "dir": str(tmp_path / "export")}
    study_path.write_text(yaml.safe_dump(study, sort_keys=False))
    done = run_cli("start", str(study_path))
    assert done.returncode == 0, done.stderr[-3000:]
    exported = run_cli("export", str(study_path))
    assert exported.returncode == 0, exported.stderr

    original = parse_config(yaml.safe_load(text))
    expected = load_folder(mergekit_merge(yaml.safe_load(text), tmp_path / "mk_input", seed=None))
    files = sorted((tmp_path / "export").glob("*.yml"))
    assert len(files) == 2  # both trials: trial 0 (the config as written) and one sampled
    baseline_seen = False
    for i, file in enumerate(files):
        data = yaml.safe_load(file.read_text())
        assert data["dtype"] == "float32" and data["tokenizer_source"] == "base"
        assert data["base_model"] == str(f["child_1"]) and data["slices"][0]["residual_weight"] == 0.5
        theirs = load_folder(mergekit_merge(data, tmp_path / f"mk_{i}", seed=None))
        if parse_config(data) == original:
            baseline_seen = True
            assert all(torch.equal(theirs[n], t) for n, t in expected.items())
        ours = run_cli("merge", str(file), str(tmp_path / f"ours_{i}"))
        assert ours.returncode == 0, ours.stderr
        assert_within_one_ulp(load_folder(tmp_path / f"ours_{i}"), theirs)
    assert baseline_seen
