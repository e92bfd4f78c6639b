"""Vision-language models: each layer stack (text decoder, vision tower) merged over its own layers.

mergekit plans such a model module by module: under `models:` the vision tower's blocks take a
gradient of their own, over the tower's depth, and every block is kept. Qwen2.5-VL-7B's tower has 32
blocks for 28 text layers; the families here keep that shape (3 text layers, 5 vision blocks), where a
planner that reads every `.N.` as text layer N drops vision blocks 3 and 4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file

from merge_core.config import parse_config
from merge_core.merger import MergePlan, Merger
from tests.conftest import run_cli, save_tokenizer
from tests.merge_core.test_merge_output_files import both
from tests.merge_core.test_oracle import assert_within_one_ulp, load_folder

TEXT = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=1, bos_token_id=1, eos_token_id=1,
            tie_word_embeddings=False)
VISION_BLOCKS = 5


def _qwen2_5_vl():
    return transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=VISION_BLOCKS, hidden_size=32, out_hidden_size=32, intermediate_size=64,
                           num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                           fullatt_block_indexes=[1], in_channels=3),
        image_token_id=20, video_token_id=21, vision_start_token_id=22, vision_end_token_id=23,
        tie_word_embeddings=False))


def _mistral3():
    return transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
        text_config=dict(TEXT, model_type="mistral", head_dim=8),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=VISION_BLOCKS, num_attention_heads=4, image_size=16, patch_size=8,
                           head_dim=8),
        image_token_index=20, spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False))


def _qwen3_vl():  # three deepstack projectors, which mergekit spreads over a gradient like layers
    return transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(
        text_config=dict(TEXT, head_dim=8, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=VISION_BLOCKS, hidden_size=32, out_hidden_size=32, intermediate_size=64,
                           num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           num_position_embeddings=16, deepstack_visual_indexes=[1, 2, 3]),
        tie_word_embeddings=False))


ARCHS = {"qwen2_5_vl": _qwen2_5_vl, "mistral3": _mistral3, "qwen3_vl": _qwen3_vl}
CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "mistral3": "Mistral3ForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration"}


def build_vlm_family(root: Path, arch: str) -> dict[str, Path]:
    """`base`, `child_1`, `child_2`: fine-tune-like children (shared and opposed deltas) of a random base."""
    torch.manual_seed(0)
    model = ARCHS[arch]().float()
    with torch.no_grad():  # random norms, so SLERP's interpolation shows on them too
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    base = root / "base"
    model.save_pretrained(base)
    save_tokenizer(base)
    tensors = {}
    for f in sorted(base.glob("*.safetensors")):
        tensors.update(load_file(f))
    generator = torch.Generator().manual_seed(100)
    shared = {n: torch.randn(t.shape, generator=generator) * 0.02 for n, t in tensors.items()}
    family = {"base": base}
    for i in (1, 2):
        folder = root / f"child_{i}"
        shutil.copytree(base, folder)
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
        sign = -1.0 if i == 2 else 1.0
        save_file({n: (t + sign * shared[n] + torch.randn(t.shape, generator=generator) * 0.02 * i).contiguous()
                   for n, t in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
        family[f"child_{i}"] = folder
    return family


@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("vlm")
    return {arch: build_vlm_family(root / arch, arch) for arch in ARCHS}


def slerp_config(f: dict[str, Path]) -> str:
    return f"""merge_method: slerp
base_model: {f['child_1']}
dtype: float32
models:
  - model: {f['child_1']}
  - model: {f['child_2']}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: [0.2, 0.8]
"""


def ties_config(f: dict[str, Path], method: str = "ties") -> str:
    return f"""merge_method: {method}
base_model: {f['base']}
dtype: float32
models:
  - model: {f['child_1']}
    parameters: {{weight: [0.2, 0.9, 0.4], density: [0.3, 0.8]}}
  - model: {f['child_2']}
    parameters: {{weight: 0.4, density: 0.7}}
"""


def vision_blocks(tensors: dict) -> set[int]:
    return {int(n.split("blocks.")[1].split(".")[0]) if "blocks." in n else int(n.split("layers.")[1].split(".")[0])
            for n in tensors if n.startswith(("visual.blocks.", "model.visual.blocks.",
                                              "vision_tower.transformer.layers."))}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("config", [slerp_config, ties_config])
def test_every_vision_block_merges_on_its_own_gradient_as_mergekit_does(vlms, tmp_path, arch, config):
    """A gradient over `models:` spans the tower's blocks separately from the text layers: every tensor
    equals mergekit-yaml's, vision blocks 3 and 4 included (and Qwen3-VL's deepstack projectors, which
    mergekit places at 0, 0.5 and 1 on the gradient), and the in-memory candidate equals the file."""
    text = config(vlms[arch])
    mk, us = both(tmp_path, text)
    ours, theirs = load_folder(us), load_folder(mk)
    assert vision_blocks(theirs) == set(range(VISION_BLOCKS))
    assert_within_one_ulp(ours, theirs)
    plan = MergePlan(parse_config(yaml.safe_load(text)))
    assert plan.num_layers == TEXT["num_hidden_layers"]
    for name, tensor in Merger(plan).tensors():
        assert torch.equal(tensor, ours[name]), name


@pytest.mark.parametrize("arch", ["mistral3", "qwen3_vl"])
def test_dare_masks_follow_mergekit_across_stacks(vlms, tmp_path, arch):
    """DARE's masks, drawn in mergekit's order over both stacks, are mergekit-yaml --random-seed's."""
    mk, us = both(tmp_path, ties_config(vlms[arch], "dare_ties"), "--random-seed", "5")
    assert_within_one_ulp(load_folder(us), load_folder(mk))


def test_slices_on_a_model_with_several_stacks_are_refused(vlms, tmp_path):
    """A layer_range cannot say which stack it means (mergekit wants `modules:`): one line, exit 2,
    nothing written; before, the text gradient went to vision blocks by index and the run exited 0."""
    f = vlms["qwen2_5_vl"]
    config = tmp_path / "slices.yml"
    config.write_text(f"""merge_method: slerp
base_model: {f['child_1']}
slices:
  - sources:
      - model: {f['child_1']}
        layer_range: [0, 3]
      - model: {f['child_2']}
        layer_range: [0, 3]
parameters:
  t: 0.3
""")
    result = run_cli("merge", str(config), str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "several layer stacks" in lines[0] and "visual.blocks (5)" in lines[0]
    assert "models:" in lines[0]
    assert not (tmp_path / "out").exists()


def test_dare_on_qwen_vl_says_where_the_masks_leave_mergekits(vlms, tmp_path):
    """mergekit merges Qwen2.5-VL's projector MLP twice (a module of two layers in its architecture file)
    and keeps the second result: its draws shift, and search merge says which tensors differ."""
    config = tmp_path / "dare.yml"
    config.write_text(ties_config(vlms["qwen2_5_vl"], "dare_ties"))
    result = run_cli("merge", str(config), str(tmp_path / "out"), "--random-seed", "5")
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stderr.split())
    assert "visual.merger.mlp" in said and "twice" in said


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_study_builds_the_candidate_transformers_loads(vlms, tmp_path, arch):
    """A study's live model is the class config.json names (AutoModelForCausalLM maps neither), written
    under transformers' names (Mistral3's `language_model.model.*` is `model.language_model.*`): its state
    equals from_pretrained of search merge's folder, and its text-only forward gives finite logits."""
    text = ties_config(vlms[arch])
    config = tmp_path / "config.yml"
    config.write_text(text)
    assert run_cli("merge", str(config), str(tmp_path / "out")).returncode == 0
    merger = Merger(MergePlan(parse_config(yaml.safe_load(text))))
    live = merger.new_model()
    merger.build_into(live)
    loaded = getattr(transformers, CLASSES[arch]).from_pretrained(tmp_path / "out")
    assert type(live) is type(loaded)
    state, expected = live.state_dict(), loaded.state_dict()
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    with torch.no_grad():
        logits = live(input_ids=torch.tensor([[2, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, TEXT["vocab_size"]) and torch.isfinite(logits).all()


def test_search_score_loads_a_vision_language_model(vlms, tmp_path):
    """`search score` reads a model AutoModelForCausalLM does not map as the class config.json names
    (before: one line, 'Unrecognized configuration class'), so an exported VLM merge can be scored."""
    from tests.search.conftest import write_task

    write_task(tmp_path, "toy_a", 1)
    result = run_cli("score", "--model", str(vlms["mistral3"]["child_1"]), "--tasks", "toy_a",
                     "--include-path", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "weighted score" in result.stdout


@pytest.mark.parametrize("hub_config", [False, True])
def test_an_encoder_decoder_merges_each_stack_on_its_own_gradient(tmp_path, hub_config):
    """Whisper: 2 encoder layers, 3 decoder layers (config.json says decoder_layers; a Hub checkpoint saved
    by transformers 4 also says num_hidden_layers, its encoder's count). A weight gradient from one model
    to the other gives each stack's first layer to one model and its last to the other, whatever the
    stack's depth, and config.json's counts stay (mergekit-yaml 0.1.5 fails on whisper: its architecture
    file names `model.decoderembed_tokens.weight`)."""
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
            vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
            max_source_positions=16, max_target_positions=16, pad_token_id=1, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1))
        model.save_pretrained(tmp_path / f"m{seed}")
        folders.append(tmp_path / f"m{seed}")
        if hub_config:
            saved = json.loads((folders[-1] / "config.json").read_text())
            (folders[-1] / "config.json").write_text(json.dumps(dict(saved, num_hidden_layers=2)))
    config = tmp_path / "config.yml"
    config.write_text(f"""merge_method: linear
dtype: float32
models:
  - model: {folders[0]}
    parameters: {{weight: [0.0, 1.0]}}
  - model: {folders[1]}
    parameters: {{weight: [1.0, 0.0]}}
""")
    result = run_cli("merge", str(config), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    merged, a, b = load_folder(tmp_path / "out"), load_folder(folders[0]), load_folder(folders[1])
    assert sorted(merged) == sorted(a)
    fc1 = "model.{}.layers.{}.fc1.weight"
    assert torch.equal(merged[fc1.format("encoder", 0)], b[fc1.format("encoder", 0)])
    assert torch.equal(merged[fc1.format("encoder", 1)], a[fc1.format("encoder", 1)])
    assert torch.equal(merged[fc1.format("decoder", 0)], b[fc1.format("decoder", 0)])
    middle = fc1.format("decoder", 1)
    assert torch.allclose(merged[middle], (a[middle] + b[middle]) / 2, atol=1e-7)
    assert torch.equal(merged[fc1.format("decoder", 2)], a[fc1.format("decoder", 2)])
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["encoder_layers"], written["decoder_layers"]) == (2, 3)
    transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_new_tokenizer_rebuilds_the_text_embeddings_as_mergekit_does(vlms, tmp_path, arch):
    """Vision-language configs keep the vocabulary size under `text_config` (transformers 5): the
    embeddings and lm_head are rebuilt for the output tokenizer (they were left as they were), with
    mergekit's rows, the base's padding row included for an added token it "has" (mergekit adds the
    tokens to the base's own tokenizer); config.json says the new size where the model reads it, and
    the output loads. mergekit writes Qwen2.5-VL's at the top level, where transformers 5 does not
    read it, so its output does not load; ours goes to text_config."""
    f = vlms[arch]
    text = f"""merge_method: linear
base_model: {f['base']}
dtype: float32
models:
  - {{model: {f['base']}, parameters: {{weight: 0.2}}}}
  - {{model: {f['child_1']}, parameters: {{weight: 0.5}}}}
  - {{model: {f['child_2']}, parameters: {{weight: 0.3}}}}
tokenizer:
  source: base
  tokens:
    <new>: {{source: {{kind: zero}}}}
    <forced>: {{source: {{kind: zero}}, force: true}}
"""
    mk, us = both(tmp_path, text)
    ours, theirs = load_folder(us), load_folder(mk)
    assert_within_one_ulp(ours, theirs)
    rows = len(transformers.AutoTokenizer.from_pretrained(us))
    embeddings = [n for n in ours if n.endswith("embed_tokens.weight")]
    assert embeddings and all(ours[n].shape[0] == rows for n in embeddings)
    config = json.loads((us / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == rows and "vocab_size" not in config
    getattr(transformers, CLASSES[arch]).from_pretrained(us)
    plan = MergePlan(parse_config(yaml.safe_load(text)))
    for name, tensor in Merger(plan).tensors():
        assert torch.equal(tensor, ours[name]), name


def _tied_copy(model: Path, folder: Path) -> Path:
    """`model` as a model with tied embeddings: no output head stored, tie_word_embeddings set."""
    shutil.copytree(model, folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({n: t for n, t in tensors.items() if not n.endswith("lm_head.weight")}, folder / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    for part in (config, config.get("text_config", {})):
        part["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("tied_first", [False, True], ids=["untied_reference", "tied_reference"])
@pytest.mark.parametrize("arch", ["qwen3_vl", "mistral3"])
def test_a_tied_vision_language_model_merges_with_untied_ones_as_mergekit_does(vlms, tmp_path, arch, tied_first):
    """The text model's head sits under the model's own names (Qwen3-VL: `lm_head.weight` tied to
    `model.language_model.embed_tokens.weight`; Mistral3 as transformers 5 saves it:
    `language_model.lm_head.weight` tied to `language_model.model.embed_tokens.weight`). A tied model
    stands in for the head with those embeddings, as mergekit's `tied_names` do: its head was refused
    as missing (untied reference) or left out of the output (tied reference)."""
    f = vlms[arch]
    tied = _tied_copy(f["child_2"], tmp_path / "tied")
    models = [f["child_1"], tied][::-1 if tied_first else 1]
    text = (f"merge_method: linear\ndtype: float32\nmodels:\n  - {{model: {models[0]}, parameters: {{weight: 0.3}}}}\n"
            f"  - {{model: {models[1]}, parameters: {{weight: 0.7}}}}\n")
    mk, us = both(tmp_path, text)
    ours, theirs = load_folder(us), load_folder(mk)
    assert_within_one_ulp(ours, theirs)
    head = next(n for n in ours if n.endswith("lm_head.weight"))
    model = getattr(transformers, CLASSES[arch]).from_pretrained(us)
    assert torch.equal(model.get_output_embeddings().weight.detach(), ours[head])  # the merged head is the one used
    merger = Merger(MergePlan(parse_config(yaml.safe_load(text))))
    live = merger.new_model()
    merger.build_into(live)
    assert torch.equal(live.get_output_embeddings().weight.detach(), ours[head])
    for name, tensor in Merger(MergePlan(parse_config(yaml.safe_load(text)))).tensors():
        assert torch.equal(tensor, ours[name]), name
