"""`search merge` on bad input: exit 2, one line naming the problem, no OUT_DIR left behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import build_tiny_model, run_cli
from tests.merge_core.test_oracle import PHIGMENT_T, config_for, load_folder


def write_config(tmp_path: Path, config: dict | str) -> Path:
    """Write a config (a dict, or raw text) to tmp_path/config.yml."""
    path = tmp_path / "config.yml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def assert_refused(result, *needles: str, out: Path | None = None) -> None:
    """Exit code 2, exactly one line on stderr mentioning every needle, and no OUT_DIR."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def pair(tiny_models):
    return tiny_models["phi_a"], tiny_models["phi_b"]


def test_missing_model(tmp_path, pair):
    config = config_for(pair[0], tmp_path / "nowhere", "one_slice", 0.5, "float16")
    out = tmp_path / "out"
    result = run_cli("merge", str(write_config(tmp_path, config)), str(out))
    assert_refused(result, "nowhere", "no such folder", out=out)


def test_missing_config_json(tmp_path, pair):
    broken = tmp_path / "no_config"
    shutil.copytree(pair[1], broken)
    (broken / "config.json").unlink()
    out = tmp_path / "out"
    config = config_for(pair[0], broken, "one_slice", 0.5, "float16")
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out)), "no config.json", out=out)


def test_different_hidden_sizes(tmp_path, pair):
    wide = build_tiny_model(tmp_path / "wide", "phi", seed=3, hidden=64)
    out = tmp_path / "out"
    config = config_for(pair[0], wide, "one_slice", 0.5, "float16")
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out)), "hidden_size differs", out=out)


def test_different_layer_counts(tmp_path, pair):
    deep = build_tiny_model(tmp_path / "deep", "phi", seed=3, layers=6)
    out = tmp_path / "out"
    config = config_for(pair[0], deep, "models", 0.5, "float16")
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out)), "layer counts differ", out=out)


def test_layer_range_outside_model(tmp_path, pair):
    config = config_for(pair[0], pair[1], "one_slice", 0.5, "float16")
    config["slices"][0]["sources"][0]["layer_range"] = [0, 8]
    config["slices"][0]["sources"][1]["layer_range"] = [0, 8]
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out)),
                   "slices.0.sources.0.layer_range", "4 layers", out=out)


def test_unknown_merge_method(tmp_path, pair):
    # ties is a method now (this test used it as the unknown one); a typo gets a did-you-mean.
    config = config_for(pair[0], pair[1], "one_slice", 0.5, "float16") | {"merge_method": "tiess"}
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out)), "merge_method", "'tiess'",
                   "did you mean 'ties'", out=out)


def test_malformed_yaml(tmp_path):
    out = tmp_path / "out"
    path = write_config(tmp_path, "slices:\n  - sources: [\nmerge_method: slerp\n")
    assert_refused(run_cli("merge", str(path), str(out)), "malformed YAML", "line", out=out)


def test_unknown_key_and_wrong_type(tmp_path, pair):
    config = config_for(pair[0], pair[1], "one_slice", 0.5, "float16") | {"dtpye": "float16"}
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out)), "dtpye", "unknown key",
                   "did you mean dtype?", out=out)
    # a key with no near known one (a YAML anchor holder, mergekit ignores it): remove it
    config = config_for(pair[0], pair[1], "one_slice", 0.5, "float16") | {"x-common": {"t": 0.5}}
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out)), "x-common", "unknown key",
                   "remove it", out=out)
    # a merge parameter at a model's level instead of under its `parameters:`
    misplaced = config_for(pair[0], pair[1], "one_slice", 0.5, "float16")
    misplaced["slices"][0]["sources"][1]["t"] = 0.3
    assert_refused(run_cli("merge", str(write_config(tmp_path, misplaced)), str(out)), "t: unknown key here",
                   "under `parameters:`", out=out)
    source = config_for(pair[0], pair[1], "one_slice", 0.5, "float16")
    source["slices"][0]["sources"][0]["layer_rnage"] = source["slices"][0]["sources"][0].pop("layer_range")
    assert_refused(run_cli("merge", str(write_config(tmp_path, source)), str(out)), "layer_rnage",
                   "did you mean layer_range?", out=out)
    config = config_for(pair[0], pair[1], "one_slice", 0.5, "float8")
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out)), "dtype", out=out)


def test_no_filter_matches(tmp_path, pair):
    config = config_for(pair[0], pair[1], "one_slice", [{"filter": "mlp", "value": 0.5}], "float16")
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out)), "no filter matches", out=out)


def test_pickle_needs_opt_in(tmp_path, pair):
    pickled = build_tiny_model(tmp_path / "pickled", "phi", seed=2, safe=False)
    assert not list(pickled.glob("*.safetensors"))
    config = config_for(pair[0], pickled, "one_slice", PHIGMENT_T, "float16")
    path = write_config(tmp_path, config)
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(path), str(out)), "--allow-pickle", out=out)
    result = run_cli("merge", str(path), str(out), "--allow-pickle")
    assert result.returncode == 0, result.stderr
    safe = run_cli("merge", str(write_config(tmp_path, config_for(pair[0], pair[1], "one_slice", PHIGMENT_T,
                                                                       "float16"))), str(tmp_path / "safe"))
    assert safe.returncode == 0
    merged, reference = load_folder(out), load_folder(tmp_path / "safe")
    assert all((merged[n] == reference[n]).all() for n in reference)


def test_unwritable_out_dir(tmp_path, pair):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    path = write_config(tmp_path, config_for(pair[0], pair[1], "one_slice", 0.5, "float16"))
    assert_refused(run_cli("merge", str(path), str(blocker / "out")), "cannot be written")
    assert_refused(run_cli("merge", str(path), str(blocker)), "not a folder")
    assert blocker.read_text() == "not a folder"


def test_non_empty_out_dir_kept(tmp_path, pair):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    path = write_config(tmp_path, config_for(pair[0], pair[1], "one_slice", 0.5, "float16"))
    result = run_cli("merge", str(path), str(out))
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_config_file(tmp_path):
    assert_refused(run_cli("merge", str(tmp_path / "nope.yml"), str(tmp_path / "out")), "no such file")


def test_plan_errors_name_the_config_file(tmp_path, pair):
    """Errors found while planning (here: shapes) start with the config's path, as parse errors do."""
    wide = build_tiny_model(tmp_path / "wide", "phi", seed=3, hidden=64)
    path = write_config(tmp_path, config_for(pair[0], wide, "one_slice", 0.5, "float16"))
    result = run_cli("merge", str(path), str(tmp_path / "out"))
    assert_refused(result, "hidden_size differs", out=tmp_path / "out")
    assert result.stderr.startswith(f"search merge: error: {path}: "), result.stderr


def test_a_model_listed_twice_names_models(tmp_path, pair):
    config = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}}
                                                   for m in (pair[0], pair[1], pair[0])]}
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out)),
                   f"models: {pair[0]} appears twice", out=out)


@pytest.mark.parametrize("weight,words", [
    (None, ["models.0.parameters.weight", "got null"]),
    ({"filter": "self_attn"}, ["needs `value:`"]),
    ([[0.1, 0.2]], ["a list inside a list"]),
    ([{"filter": "mlp", "value": [[0.1], 0.2]}, {"value": 0.5}], ["flat list"]),
    (float("nan"), ["finite number", "nan"]),
    (float("inf"), ["finite number", "inf"]),
    ([0.2, float("nan")], ["finite number"]),
    ("half", ["must be a number", "'half'"]),
])
def test_a_parameter_of_no_accepted_form_says_which_forms_are(tmp_path, pair, weight, words):
    """What a weight may be, in one line; NaN and infinity are refused (they make every tensor non-finite,
    or fail inside the merge: mergekit-yaml gives a traceback for a NaN density)."""
    config = {"merge_method": "linear", "models": [{"model": str(pair[0]), "parameters": {"weight": weight}},
                                                   {"model": str(pair[1]), "parameters": {"weight": 0.5}}]}
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out)), *words, out=out)


def test_a_nan_density_is_refused_before_the_merge(tmp_path, pair):
    config = {"merge_method": "ties", "base_model": str(pair[0]), "models": [
        {"model": str(pair[1]), "parameters": {"weight": 1.0, "density": [0.2, float("nan")]}}]}
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out), "--random-seed", "0"),
                   "density", "finite number", out=out)


@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**64)])
def test_a_random_seed_outside_mergekits_range_is_refused(tmp_path, pair, seed):
    config = config_for(pair[0], pair[1], "one_slice", 0.5, "float16")
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out), "--random-seed", seed),
                   "--random-seed", "4294967295", out=out)


def test_a_slice_without_sources_says_where_layer_range_goes(tmp_path, pair):
    config = {"merge_method": "passthrough", "slices": [{"layer_range": [0, 2], "model": str(pair[0])}]}
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(write_config(tmp_path, config)), str(out)), "slices.0",
                   "`sources:`", out=out)
