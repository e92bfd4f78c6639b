"""slerp of a base and one other model; theta is prepared once, a candidate is one pass."""

from __future__ import annotations

from merge_core.methods.base import Contract, MergeMethod, Param
from merge_core.slerp import coefficients, geometry, slerp_into


class Slerp(MergeMethod):
    """mergekit's SLERP: t = 0 gives the base."""

    name = "slerp"
    params = (Param("t", float),)
    contract = Contract(base="required", min_inputs=2, max_inputs=2)

    def prepare(self, inputs):
        other = inputs.non_base[0]
        return geometry(inputs.base_tensor, inputs.tensors[other])

    def merge(self, out, inputs, state, values, rng) -> None:
        v0, v1 = inputs.base_tensor, inputs.tensors[inputs.non_base[0]]
        s0, s1 = coefficients(state, values.shared["t"], _working(v0))
        if out.dtype == v0.dtype:
            slerp_into(out, v0, v1, s0, s1)
        else:
            out.copy_(slerp_into(v0.new_empty(v0.shape), v0, v1, s0, s1))


def _working(v):
    import torch

    return torch.float64 if v.dtype == torch.float64 else torch.float32
