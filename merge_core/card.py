"""The model card (README.md) written next to a merged model, as mergekit writes one."""

from __future__ import annotations

from pathlib import Path

import yaml

from merge_core.config import MergeConfig


def _is_hub_id(ref: str) -> bool:
    name = ref.split("@")[0]
    return name.count("/") == 1 and not Path(name).expanduser().exists() and not name.startswith((".", "/", "~"))


def model_card(config: MergeConfig, yaml_text: str, method_url: str | None = None) -> str:
    """Front matter (base models, tags) and a body naming the method, the models and the YAML."""
    models = config.model_names()
    hub = [m.split("@")[0] for m in models if _is_hub_id(m)]
    front = {"base_model": hub, "library_name": "transformers", "tags": ["mergekit", "merge", "merge-search"]}
    if not hub:
        front.pop("base_model")
    base = config.base_model if config.merge_method != "slerp" else None
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "# merged model", "",
             f"Built with merge-search (a drop-in for [mergekit](https://github.com/arcee-ai/mergekit)) using the "
             f"`{config.merge_method}` merge method" + (f", with {_ref(base)} as the base." if base else "."), "",
             "## Models merged", ""]
    lines += [f"* {_ref(m)}" for m in models if m != base]
    lines += ["", "## Configuration", "", "```yaml", yaml_text.rstrip(), "```", ""]
    return "\n".join(lines)


def _ref(model: str) -> str:
    name = model.split("@")[0]
    return f"[{model}](https://huggingface.co/{name})" if _is_hub_id(model) else model
