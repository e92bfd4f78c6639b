"""Shared fixtures: tiny real transformers models saved as folders, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "to", "home", "is", "big", "small", "red", "blue"]


def save_tokenizer(folder: Path) -> None:
    """A small word-level tokenizer, saved the way transformers loads it offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(folder)


ARCHS = {
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # mixture-of-experts: checkpoints hold one tensor per expert, transformers' model stacked ones
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_key_value_heads=2, num_local_experts=3,
                                                            num_experts_per_tok=2)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_key_value_heads=2, num_experts=3,
                                                               num_experts_per_tok=2, moe_intermediate_size=16,
                                                               shared_expert_intermediate_size=16)),
}


def build_tiny_model(folder: Path, arch: str = "phi", seed: int = 0, layers: int = 4, hidden: int = 32,
                     intermediate: int = 64, dtype: str = "float32", max_shard_size: str | None = None,
                     safe: bool = True, vocab_rows: int | None = None, extra: dict | None = None) -> Path:
    """Save a random tiny causal LM of `arch` (with tokenizer) to `folder`; `vocab_rows` embedding rows
    (default: one per token of the tokenizer); `extra` config fields override the architecture's."""
    import torch
    import transformers

    config_cls, model_cls, fields = ARCHS[arch]
    config = getattr(transformers, config_cls)(
        vocab_size=vocab_rows or len(WORDS) + 2, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=64, **(fields | (extra or {})),
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(getattr(torch, dtype))
    with torch.no_grad():  # random norms too, so every tensor pair takes the SLERP branch
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.add_(torch.randn_like(param) * 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    if not safe:  # transformers 5 writes safetensors only; make the legacy pickled layout by hand
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
    save_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Pairs of tiny models per architecture: `{arch}_a`, `{arch}_b` (same shapes, other seeds)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ("phi", "llama", "qwen2"):
        out[f"{arch}_a"] = build_tiny_model(root / f"{arch}_a", arch, seed=1)
        out[f"{arch}_b"] = build_tiny_model(root / f"{arch}_b", arch, seed=2, max_shard_size="20KB")
    return out


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run the `search` CLI in a subprocess, as a user would."""
    # One torch thread: tiny models gain nothing from more, and tests may share the cores.
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=full_env, timeout=timeout)


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
