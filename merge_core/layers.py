"""Which transformer layer a tensor belongs to, from its name alone."""

from __future__ import annotations

import re

# `model.layers.3.`, `transformer.h.3.`, `gpt_neox.layers.3.`, `blocks.3.`, `encoder.layer.3.`; and Qwen3-VL's
# `deepstack_merger_list.1.`, a stack of projectors that mergekit's architecture file spreads over a gradient
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|deepstack_merger_list)\.(\d+)\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")  # the last: whisper


def layer_index(name: str) -> int | None:
    """The layer number in a tensor name, or None for tensors outside the layers."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


def layer_stack(name: str) -> str | None:
    """The name of the layer stack a tensor belongs to (`model.layers`, `visual.blocks`), or None.

    Vision-language and encoder-decoder models hold several stacks, each numbered from 0.
    """
    match = LAYER_PATTERN.search(name)
    return name[: match.start(1) - 1] if match else None


def with_layer(name: str, index: int) -> str:
    """The same tensor name pointing at another layer."""
    match = LAYER_PATTERN.search(name)
    if match is None:
        raise ValueError(f"{name} is not a layer tensor")
    return name[: match.start(1)] + str(index) + name[match.end(1) :]


def layer_count(config: dict) -> int | None:
    """The number of layers a config.json declares, if it says."""
    for source in (config, config.get("text_config") or {}):
        for key in LAYER_COUNT_KEYS:
            if isinstance(source.get(key), int):
                return source[key]
    return None

