"""LoRA adapters on parents (`model+adapter`, `{model: ..., lora: ...}`): `search merge` and the in-memory
candidate give exactly mergekit-yaml's tensors (it merges the adapter with peft the same way), for
plain LoRA, DoRA with rsLoRA and a rank pattern, an embedding adapter, `modules_to_save`, half-precision
models and `--lora-merge-dtype`. The merged model is built once per (model, adapter, dtype) and reused;
bad adapters are refused in one line with nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merge_core.config import parse_config
from merge_core.merger import MergePlan, Merger
from tests.conftest import build_family, build_tiny_model, run_cli
from tests.merge_core.test_oracle import load_folder


def save_adapter(model_folder: Path, out: Path, seed: int, **lora) -> Path:
    """A peft adapter for the model in `model_folder`, with random (not zero) B matrices."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # modules_to_save start as copies of the model's; make them differ
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    llama = build_family(root / "llama", "llama", 11)
    phi16 = build_tiny_model(root / "phi16" / "base", "phi", seed=12, dtype="float16")
    phi16_b = build_tiny_model(root / "phi16" / "other", "phi", seed=13, dtype="float16")
    adapters = {
        "plain": save_adapter(llama["base"], root / "plain", 1, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj", "down_proj"]),
        "dora": save_adapter(llama["base"], root / "dora", 2, r=4, lora_alpha=16, use_dora=True, use_rslora=True,
                             target_modules=["k_proj", "o_proj", "up_proj"], rank_pattern={"o_proj": 2},
                             modules_to_save=["lm_head"]),
        "embedding": save_adapter(llama["base"], root / "embedding", 3, r=2, lora_alpha=4,
                                  target_modules=["embed_tokens", "gate_proj"]),
        "phi": save_adapter(phi16, root / "phi_adapter", 4, r=4, lora_alpha=4, target_modules=["fc1", "dense"]),
    }
    return {"llama": llama, "phi16": phi16, "phi16_b": phi16_b, "adapters": adapters}


def mergekit_merge(config: dict, out: Path, cache: Path, dtype: str | None = None) -> dict:
    """mergekit-yaml in its own process: in process, mergekit's loader cache keeps the first merged
    adapter of a model+adapter reference, whatever the later runs' --lora-merge-dtype."""
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "mergekit.yml").write_text(yaml.safe_dump(config))
    extra = ["--lora-merge-dtype", dtype] if dtype else []
    result = subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(out.parent / "mergekit.yml"),
                             str(out), "--quiet", "--no-write-model-card", "--lora-merge-cache", str(cache), *extra],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return load_folder(out)


def llama_configs(s):
    f, a = s["llama"], s["adapters"]
    return {
        "linear-plain-string": {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": f"{f['child_1']}+{a['plain']}", "parameters": {"weight": 0.6}},
            {"model": str(f["child_2"]), "parameters": {"weight": 0.4}}]},
        "ties-dora-dict-base-adapter": {"merge_method": "ties", "dtype": "float32",  # no half ties at the threshold
                                        "base_model": f"{f['base']}+{a['embedding']}", "models": [
            {"model": {"model": str(f["child_1"]), "lora": str(a["dora"])},
             "parameters": {"weight": 0.5, "density": 0.7}},
            {"model": {"model": {"path": str(f["child_2"])}, "lora": {"path": str(a["plain"])}},
             "parameters": {"weight": [0.2, 0.8], "density": 0.5}}]},
        "slerp-slices": {"merge_method": "slerp", "dtype": "float16", "base_model": f"{f['child_3']}+{a['plain']}",
                         "parameters": {"t": [0, 0.5, 1]}, "slices": [{"sources": [
                             {"model": f"{f['child_3']}+{a['plain']}", "layer_range": [0, 4]},
                             {"model": f"{f['child_1']}+{a['dora']}", "layer_range": [0, 4]}]}]},
    }


@pytest.mark.parametrize("name", ["linear-plain-string", "ties-dora-dict-base-adapter", "slerp-slices"])
def test_adapters_merge_as_mergekit_merges_them(lora_setup, tmp_path, monkeypatch, name):
    config = llama_configs(lora_setup)[name]
    expected = mergekit_merge(config, tmp_path / "mergekit", tmp_path / "mergekit-cache")

    cache = tmp_path / "cache"
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    result = run_cli("merge", str(tmp_path / "config.yml"), str(tmp_path / "ours"), "--lora-merge-cache", str(cache))
    assert result.returncode == 0, result.stderr
    written = load_folder(tmp_path / "ours")
    assert sorted(written) == sorted(expected)
    for tensor_name, theirs in expected.items():
        assert written[tensor_name].dtype == theirs.dtype, tensor_name
        assert torch.equal(written[tensor_name], theirs), f"{tensor_name} differs from mergekit-yaml"

    monkeypatch.setenv("MERGE_SEARCH_LORA_CACHE", str(cache))
    merger = Merger(MergePlan(parse_config(config)))
    model = merger.new_model()
    merger.build_into(model)
    live = {n: p.detach() for n, p in model.state_dict().items() if n in written}
    assert sorted(live) == sorted(written)
    for tensor_name, tensor in written.items():
        assert torch.equal(live[tensor_name], tensor), f"{tensor_name}: in-memory candidate differs"


def test_adapters_change_the_parents_they_name(lora_setup, tmp_path, monkeypatch):
    """The adapter's layers, and only they, differ from the model without it; modules_to_save replace."""
    f, a = lora_setup["llama"], lora_setup["adapters"]
    monkeypatch.setenv("MERGE_SEARCH_LORA_CACHE", str(tmp_path / "cache"))
    from merge_core.refs import resolve

    plain = load_folder(f["child_1"])
    merged = load_folder(resolve(f"{f['child_1']}+{a['dora']}"))
    changed = {n for n in plain if not torch.equal(plain[n], merged[n])}
    assert changed and all(any(m in n for m in ("k_proj", "o_proj", "up_proj", "lm_head")) for n in changed)
    assert "lm_head.weight" in changed and any("o_proj" in n for n in changed)


@pytest.mark.parametrize("lora_dtype", [None, "bfloat16"])
def test_half_precision_models_and_lora_merge_dtype(lora_setup, tmp_path, lora_dtype):
    s = lora_setup
    config = {"merge_method": "linear", "models": [
        {"model": f"{s['phi16']}+{s['adapters']['phi']}", "parameters": {"weight": 0.7}},
        {"model": str(s["phi16_b"]), "parameters": {"weight": 0.3}}]}
    expected = mergekit_merge(config, tmp_path / "mergekit", tmp_path / "mergekit-cache", lora_dtype)
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    extra = ["--lora-merge-dtype", lora_dtype] if lora_dtype else []
    result = run_cli("merge", str(tmp_path / "config.yml"), str(tmp_path / "ours"),
                     "--lora-merge-cache", str(tmp_path / "cache"), *extra)
    assert result.returncode == 0, result.stderr
    written = load_folder(tmp_path / "ours")
    assert sorted(written) == sorted(expected)
    for name, theirs in expected.items():
        assert (written[name].dtype, torch.equal(written[name], theirs)) == (theirs.dtype, True), name


def test_the_merged_model_is_built_once_and_rebuilt_when_the_adapter_changes(lora_setup, tmp_path):
    f = lora_setup["llama"]
    adapter = save_adapter(f["base"], tmp_path / "adapter", 5, r=2, lora_alpha=2, target_modules=["q_proj"])
    cache = tmp_path / "cache"
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": f"{f['child_1']}+{adapter}", "parameters": {"weight": 0.5}},
        {"model": str(f["child_2"]), "parameters": {"weight": 0.5}}]}))

    def merge(out):
        result = run_cli("merge", str(config), str(tmp_path / out), "--lora-merge-cache", str(cache))
        assert result.returncode == 0, result.stderr
        return sorted(p for p in cache.iterdir() if not p.name.startswith("."))

    first = merge("one")
    stamp = (first[0] / "model.safetensors").stat().st_mtime_ns
    assert merge("two") == first and (first[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert (first[0] / "config.json").read_bytes() == (f["child_1"] / "config.json").read_bytes()
    assert (first[0] / "tokenizer.json").is_file()

    # a build killed before its rename leaves a hidden folder: the next build clears it
    killed = cache / f".{first[0].name}.killed"
    first[0].rename(killed)
    assert merge("rebuilt") == first and not killed.exists()
    assert not [p for p in cache.iterdir() if p.is_dir() and p.name.startswith(".")]

    save_adapter(f["base"], adapter, 6, r=2, lora_alpha=2, target_modules=["q_proj"])  # retrained in place
    assert len(merge("three")) == 2
    assert not torch.equal(load_folder(tmp_path / "one")["model.layers.0.self_attn.q_proj.weight"],
                           load_folder(tmp_path / "three")["model.layers.0.self_attn.q_proj.weight"])


def test_model_card_names_model_and_adapter_as_mergekit_does(lora_setup, tmp_path):
    f, a = lora_setup["llama"], lora_setup["adapters"]
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(f["base"]), "models": [
        {"model": f"{f['child_1']}+{a['plain']}", "parameters": {"weight": 0.5}}]}))
    result = run_cli("merge", str(config), str(tmp_path / "out"), "--lora-merge-cache", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert f"* {f['child_1']} + {a['plain']}\n" in (tmp_path / "out" / "README.md").read_text()


def bad_cases(s, tmp_path):
    f, a = s["llama"], s["adapters"]
    not_adapter = tmp_path / "not_adapter"
    not_adapter.mkdir()
    (not_adapter / "README.md").write_text("hi")
    return {
        "missing adapter folder": (f"{f['child_1']}+{tmp_path / 'nope'}", [], "LoRA adapter", "no such folder"),
        "not an adapter": (f"{f['child_1']}+{not_adapter}", [], "not a peft adapter folder", "adapter_config.json"),
        "adapter of another model": (f"{f['child_1']}+{a['phi']}", [], "cannot apply the adapter", "child_1"),
        "two plus signs": (f"{f['child_1']}+{a['plain']}+{a['dora']}", [], "model+adapter", "one `+`"),
        "bad lora dtype": (f"{f['child_1']}+{a['plain']}", ["--lora-merge-dtype", "int8"], "--lora-merge-dtype",
                           "float16"),
    }


@pytest.mark.parametrize("case", ["missing adapter folder", "not an adapter", "adapter of another model",
                                  "two plus signs", "bad lora dtype"])
def test_bad_adapters_say_what_to_fix(lora_setup, tmp_path, case):
    model, extra, *words = bad_cases(lora_setup, tmp_path)[case]
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": model, "parameters": {"weight": 0.5}},
        {"model": str(lora_setup["llama"]["child_2"]), "parameters": {"weight": 0.5}}]}))
    cache = tmp_path / "cache"
    result = run_cli("merge", str(config), str(tmp_path / "out"), "--lora-merge-cache", str(cache), *extra)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # nothing half-built is left where the next run would take it for a merged model
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert not cache.exists() or not [p for p in cache.iterdir() if p.is_dir()]


def refused_then_allowed(tmp_path, reference: str, out: str = "out") -> Path:
    """A one-model linear merge of `reference`: exit 2 naming --allow-pickle without the flag, nothing
    written; merged with it. Returns the merged folder."""
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": reference, "parameters": {"weight": 1.0}}]}))
    args = ["merge", str(config), str(tmp_path / out), "--lora-merge-cache", str(tmp_path / "cache")]
    refused = run_cli(*args)
    assert refused.returncode == 2 and "--allow-pickle" in refused.stderr, refused.stderr
    assert not (tmp_path / out).exists()
    allowed = run_cli(*args, "--allow-pickle")
    assert allowed.returncode == 0, allowed.stderr
    return tmp_path / out


def test_pickled_adapter_weights_need_allow_pickle(lora_setup, tmp_path):
    from safetensors.torch import load_file

    f, a = lora_setup["llama"], lora_setup["adapters"]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((a["plain"] / "adapter_config.json").read_bytes())
    torch.save(load_file(a["plain"] / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    out = refused_then_allowed(tmp_path, f"{f['child_1']}+{pickled}")
    config = tmp_path / "config.yml"
    config.write_text(config.read_text().replace(str(pickled), str(a["plain"])))
    same = run_cli("merge", str(config), str(tmp_path / "safetensors"), "--lora-merge-cache", str(tmp_path / "cache"))
    assert same.returncode == 0, same.stderr
    ours, reference = load_folder(out), load_folder(tmp_path / "safetensors")
    assert sorted(ours) == sorted(reference) and all(torch.equal(ours[n], reference[n]) for n in reference)


def test_a_study_searches_a_parent_with_an_adapter(lora_setup, tmp_path):
    """The alias `child_1+plain` names the parent in the space; the export keeps `model+adapter` and
    builds with mergekit-yaml into the same tensors as search merge."""
    from tests.search.conftest import write_task

    f, a = lora_setup["llama"], lora_setup["adapters"]
    (tmp_path / "tasks").mkdir()
    write_task(tmp_path / "tasks", "toy_a", 1)
    config = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": f"{f['child_1']}+{a['plain']}", "parameters": {"weight": 0.6}},
        {"model": str(f["child_2"]), "parameters": {"weight": 0.4}}]}
    study = {
        "study": {"name": "lora", "storage": f"sqlite:///{tmp_path / 'lora.db'}", "n_trials": 3, "seed": 0},
        "merge": {"config": config},
        "search_space": [{"parameter": "weight", "models": ["child_1+plain"], "anchors": 1, "low": 0.1, "high": 1.0}],
        "objectives": {"include_path": [str(tmp_path / "tasks")], "batch_size": 8, "tasks": [
            {"name": "toy_a", "metric": "acc", "search_items": 20, "holdout_items": 10}]},
        "pruner": {"type": "none"},
        "export": {"top_k": 1, "dir": str(tmp_path / "export")},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    env = {"MERGE_SEARCH_LORA_CACHE": str(tmp_path / "cache"), "MERGE_SEARCH_LORA_DTYPE": "float32"}
    done = run_cli("start", str(path), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_cli("export", str(path), env=env).returncode == 0
    best = sorted((tmp_path / "export").glob("*.yml"))[0]
    exported = yaml.safe_load(best.read_text())
    assert exported["models"][0]["model"] == f"{f['child_1']}+{a['plain']}"
    ours = run_cli("merge", str(best), str(tmp_path / "ours"), env=env)
    assert ours.returncode == 0, ours.stderr
    # the export's header says how mergekit-yaml builds it: that command, as written, runs
    header = next(line for line in best.read_text().splitlines() if line.startswith("#   mergekit-yaml"))
    command = header.removeprefix("#   ").split("   (or:")[0].replace("THIS.yml", str(best)).replace("OUT", "mk/out")
    assert "--lora-merge-cache" in command and "--lora-merge-dtype float32" in command
    # the study note's rebuild commands say the same, from the study's record, whatever this shell's variables
    import optuna

    from search.notes import reproduce_commands

    recorded = optuna.load_study(study_name="lora", storage=f"sqlite:///{tmp_path / 'lora.db'}")
    note = reproduce_commands(recorded, recorded.best_trial.number, str(path))
    assert "--lora-merge-cache ./lora-cache --lora-merge-dtype float32" in note
    built = subprocess.run([str(Path(sys.executable).parent / command.split()[0]), *command.split()[1:]],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    theirs = load_folder(tmp_path / "mk" / "out")
    written = load_folder(tmp_path / "ours")
    assert sorted(written) == sorted(theirs) and all(torch.equal(written[n], theirs[n]) for n in theirs)


def test_evolve_genomes_and_study_files_read_adapters_in_every_form(tmp_path):
    """mergekit-evolve's genome takes ModelReferences: `{model, lora}` becomes `model+lora`; a study file's
    relative adapter path resolves against its folder like the model's."""
    from search.study_config import resolve_paths
    from search.study_init import from_evolve

    genome = {"genome": {"merge_method": "ties", "base_model": "org/base",
                         "models": [{"model": "org/a", "lora": {"path": "org/a-lora", "revision": "v2"}},
                                    "org/b+org/b-lora"]}}
    config, items, _, _ = from_evolve(genome, 4)
    assert [m["model"] for m in config["models"]] == ["org/a+org/a-lora@v2", "org/b+org/b-lora", "org/base"]
    assert items
    (tmp_path / "adapters").mkdir()
    data = {"merge": {"models": [{"model": {"model": "org/a", "lora": "./adapters"}}]}}
    assert resolve_paths(data, tmp_path)["merge"]["models"] == [
        {"model": {"model": "org/a", "lora": str(tmp_path / "adapters")}}]


def test_a_pickled_model_with_an_adapter_needs_allow_pickle(lora_setup, tmp_path):
    """transformers would load the pickle while applying the adapter: the flag guards that load too."""
    model = build_tiny_model(tmp_path / "pickled_model", "llama", seed=11, safe=False)
    refused_then_allowed(tmp_path, f"{model}+{lora_setup['adapters']['plain']}")


def test_mergekit_flags_for_adapters_follow_the_dtype_we_applied_them_in():
    """What an export header or a study note adds to mergekit-yaml: nothing without adapters; the cache
    folder it needs with one; the dtype the study applied them in (recorded with the study, so a later
    `search report` in another shell still says it) as --lora-merge-dtype."""
    from merge_core.refs import mergekit_lora_flags

    assert mergekit_lora_flags(["org/base", "/models/child"], "bfloat16") == ""
    assert mergekit_lora_flags(["org/base", "/models/child+/adapters/a"], None) == " --lora-merge-cache ./lora-cache"
    assert mergekit_lora_flags(["/models/child+/adapters/a"], "bfloat16").endswith(" --lora-merge-dtype bfloat16")
