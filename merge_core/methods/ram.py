"""ram and ramplus_tl: Reinforced Agent Merging. Deltas that only one model moves are kept whole,
deltas that several move are averaged over the models that move them (ramplus_tl also scales the
unique ones up by how much each model overlaps with the others, per tensor)."""

from __future__ import annotations

import torch

from merge_core.methods.base import Contract, MergeMethod, Param


class Ram(MergeMethod):
    """mergekit's ram: a delta counts as moved where |delta| > epsilon.

    Every quantity depends on epsilon through the moved masks, so a candidate runs as mergekit
    runs it; nothing is worth keeping across candidates but the inputs.
    """

    name = "ram"
    params = (Param("epsilon", float, "global", 1e-5),)
    contract = Contract(base="required")

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        base = inputs.base_tensor
        if not inputs.non_base:
            out.copy_(base)
            return
        flat, moved, counts, overlap, unique = _masks(inputs, values.shared["epsilon"])
        kept = flat * moved
        merged = ((kept * unique) + (kept * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
        out.copy_(base + merged.reshape_as(base))


class RamPlusTl(MergeMethod):
    """mergekit's ramplus_tl: unique deltas of model i scaled by 1 + r * clamp(rho_i, 0, alpha),
    rho_i = (its overlapping moved count) / (its unique moved count) within this tensor."""

    float32_result = True  # a float32 mask/scale times half inputs: mergekit writes float32
    name = "ramplus_tl"
    params = (Param("r", float, "global", 0.1), Param("alpha", float, "global", 0.2),
              Param("epsilon", float, "global", 1e-5))
    contract = Contract(base="required")

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        base = inputs.base_tensor
        if not inputs.non_base:
            out.copy_(base)
            return
        epsilon = values.shared["epsilon"]
        flat, moved, counts, overlap, unique = _masks(inputs, epsilon)
        shared_counts = (moved & overlap).sum(dim=1)
        unique_counts = (moved & unique).sum(dim=1)
        rho = shared_counts / unique_counts.clamp(min=epsilon)
        scale = 1 + values.shared["r"] * rho.clamp(min=0, max=values.shared["alpha"])
        kept = flat * moved
        merged = ((kept * unique * scale.unsqueeze(-1)) + (kept * overlap / counts.clamp(min=1))).sum(
            dim=0, keepdim=True)
        out.copy_(base + merged.reshape_as(base))


def _masks(inputs, epsilon: float):
    """Flattened deltas (one row per model), where each moved, how many moved each element, and
    where several / exactly one did."""
    base = inputs.base_tensor
    flat = torch.stack([inputs.tensors[i] - base for i in inputs.non_base], dim=0).view(len(inputs.non_base), -1)
    moved = flat.abs() > epsilon
    counts = moved.sum(dim=0, keepdim=True)
    return flat, moved, counts, counts > 1, counts == 1
