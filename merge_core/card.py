"""The model card (README.md) written next to a merged model, as mergekit's `generate_card` writes it.

mergekit lists the models in the order of a Python set (it varies from run to run); we list them in
the order the config first names them. It asks the Hub whether a local folder with one slash in its
name is also a Hub repository; we never reach the network and call an existing folder local.
"""

from __future__ import annotations

import os

import yaml

from merge_core.config import MergeConfig

TEMPLATE = """---
{metadata}
---
# {name}

This is a merge of pre-trained language models created using [mergekit](https://github.com/cg123/mergekit).

## Merge Details
### Merge Method

This model was merged using the {merge_method} merge method{base_text}.

### Models Merged

The following models were included in the merge:
{model_list}

### Configuration

The following YAML configuration was used to produce this model:

```yaml
{config_yaml}
```
"""

# mergekit's method_md: each method's pretty name, linked to its reference when it has one.
METHOD_NAMES = {
    "arcee_fusion": "[Arcee Fusion](https://arcee.ai)",
    "breadcrumbs": "[Model Breadcrumbs](https://arxiv.org/abs/2312.06795)",
    "breadcrumbs_ties": "[Model Breadcrumbs with TIES](https://arxiv.org/abs/2312.06795)",
    "dare_linear": "[Linear DARE](https://arxiv.org/abs/2311.03099)",
    "dare_ties": "[DARE TIES](https://arxiv.org/abs/2311.03099)",
    "della": "[DELLA](https://arxiv.org/abs/2406.11617)",
    "della_linear": "[Linear DELLA](https://arxiv.org/abs/2406.11617)",
    "karcher": "[Karcher Mean](https://arxiv.org/abs/2603.04972)",
    "linear": "[Linear](https://arxiv.org/abs/2203.05482)",
    "model_stock": "[Model Stock](https://arxiv.org/abs/2403.19522)",
    "multislerp": "[Multi-SLERP](https://goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
    "nearswap": "[NearSwap](https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)",
    "nuslerp": "NuSLERP",
    "passthrough": "Passthrough",
    "ram": "[Reinforced Agent Merging](https://arxiv.org/abs/2601.13572)",
    "ramplus_tl": "[Reinforced Agent Merging Plus (Tensor-Local)](https://arxiv.org/abs/2601.13572)",
    "sce": "[SCE](https://arxiv.org/abs/2408.07990)",
    "slerp": "[SLERP](https://en.wikipedia.org/wiki/Slerp)",
    "task_arithmetic": "[Task Arithmetic](https://arxiv.org/abs/2212.04089)",
    "ties": "[TIES](https://arxiv.org/abs/2306.01708)",
}


def is_hub_id(path: str, local: frozenset[str] = frozenset()) -> bool:
    """mergekit's is_hf without the network: not an absolute/home path, at most one slash, no such folder."""
    if not path or path[0] in "/~" or path.count("/") > 1 or path in local:
        return False
    return not os.path.exists(path)


def model_card(config: MergeConfig, yaml_text: str, name: str | None = None,
               local: frozenset[str] = frozenset()) -> str:
    """README.md for a merge of `config` whose source text is `yaml_text`; `local` names are never Hub links."""
    paths = [part.split("@")[0] for m in _referenced(config) for part in m.split("+")]
    base = None if config.merge_method == "slerp" else config.base_model  # mergekit: slerp names no base
    base_text = f" using {_reference(base, local)} as a base" if base else ""
    bullets = [f"* {_reference(m, local)}" for m in _referenced(config) if m != base]
    metadata = yaml.dump({"base_model": [p for p in paths if is_hub_id(p, local)], "tags": ["mergekit", "merge"],
                          "library_name": "transformers"})
    return TEMPLATE.format(metadata=metadata, name=name or "Untitled Model (1)", model_list="\n".join(bullets),
                           merge_method=METHOD_NAMES.get(config.merge_method, config.merge_method),
                           base_text=base_text, config_yaml=yaml_text)


def _referenced(config: MergeConfig) -> list[str]:
    """mergekit's referenced_models (base, models, slice sources), in first-mention order."""
    names = [config.base_model] if config.base_model else []
    names += [m.model for m in config.models or []]
    names += [s.model for sl in config.slices or [] for s in sl.sources]
    return list(dict.fromkeys(names))


def _reference(name: str, local: frozenset[str]) -> str:
    """A model as mergekit's modelref_md writes it: `model + adapter`, each a Hub link where it is one."""
    return " + ".join(_link(part.split("@")[0], local) for part in name.split("+"))


def _link(path: str, local: frozenset[str]) -> str:
    return f"[{path}](https://huggingface.co/{path})" if is_hub_id(path, local) else path
