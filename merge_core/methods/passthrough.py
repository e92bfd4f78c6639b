"""passthrough: copy one input (optionally scaled); with slices it stacks layers."""

from __future__ import annotations

import torch

from merge_core.methods.base import Contract, MergeMethod, Param


class Passthrough(MergeMethod):
    """Each output tensor is its single input, times `scale` when given."""

    name = "passthrough"
    params = (Param("scale", float, "per_model", None),)
    contract = Contract(max_inputs=1)

    def merge(self, out, inputs, state, values, rng) -> None:
        tensor = inputs.tensors[0]
        scale = values.per_input[0]["scale"]
        if scale is None:
            out.copy_(tensor)
        elif out.dtype == tensor.dtype:
            torch.mul(tensor, scale, out=out)  # no full-size temporary
        else:
            out.copy_(tensor * scale)
