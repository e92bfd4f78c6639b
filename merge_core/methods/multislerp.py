"""multislerp: barycentric interpolation of N models (or their deltas) on a hypersphere."""

from __future__ import annotations

import torch

from merge_core.errors import MergeInputError
from merge_core.methods.base import MergeMethod, Param
from merge_core.methods.non_base import NonBaseContract


class MultiSlerp(MergeMethod):
    """mergekit's multislerp: map each input to the unit sphere, average in the tangent space at
    their weighted mean direction, map back and rescale by the weighted mean norm.

    The per-input norms do not depend on the weights: computed once per study. The rest depends
    on the weights through whole-tensor reductions, so it runs as mergekit runs it.
    """

    name = "multislerp"
    params = (
        Param("weight", float, "per_non_base"),
        Param("normalize_weights", bool, "global", True),
        Param("eps", float, "global", 1e-8),
    )
    contract = NonBaseContract(base="optional", min_inputs=1, min_non_base=1)

    @torch.no_grad()
    def prepare(self, inputs):
        if len(inputs.non_base) == 1:
            return None
        flat = _deltas(inputs)
        return torch.norm(flat, dim=-1, keepdim=True)

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        others = inputs.non_base
        if len(others) == 1:
            out.copy_(inputs.tensors[others[0]])
            return
        eps = values.shared["eps"]
        flat = _deltas(inputs)
        weights = torch.tensor(values.of("weight", others), dtype=flat.dtype, device=flat.device)
        if values.shared["normalize_weights"]:
            weights = weights / weights.sum()
        norms = state
        units = flat / (norms + eps)
        mean = (units * weights.view(-1, 1)).sum(0)
        mean_norm = torch.norm(mean)
        base = inputs.base_tensor if inputs.base is not None else None
        if mean_norm < eps:
            if len(others) != 2:
                raise MergeInputError(
                    f"multislerp ({inputs.name}): the weighted sum of the unit inputs is zero (antipodal inputs "
                    "whose weights balance out); change the weights")
            result = (flat[0] * weights[0] + flat[1] * weights[1]).view(out.shape)
            out.copy_(result if base is None else result + base)
            return
        mean = mean / mean_norm
        dots = (units * mean).sum(-1, keepdim=True)
        tangents = units - dots * mean
        del units
        tangent = (tangents * weights.view(-1, 1)).sum(0)
        del tangents
        tangent_norm = torch.norm(tangent) + eps
        result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
        result = result * (norms.squeeze(-1) * weights).sum()
        result = result.view(out.shape)
        out.copy_(result if base is None else result + base)


def _deltas(inputs) -> torch.Tensor:
    """The non-base inputs stacked (minus the base when there is one), one row per input."""
    stacked = torch.stack([inputs.tensors[i] for i in inputs.non_base], dim=0)
    if inputs.base is not None:
        stacked -= inputs.base_tensor
    return stacked.view(stacked.shape[0], -1)
