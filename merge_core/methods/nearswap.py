"""nearswap: take the other model's value where it is near the base's, the base's elsewhere."""

from __future__ import annotations

import torch

from merge_core.methods.base import Contract, MergeMethod, Param
from merge_core.methods.chunks import chunk_ranges


class NearSwap(MergeMethod):
    """weight = clamp(t / max(|base - other|, 1e-6), 0, 1); weight * other + (1 - weight) * base.

    Everything is elementwise in the merge dtype, so a candidate is one chunked pass that reads
    both inputs once; nothing is worth keeping across candidates.
    """

    name = "nearswap"
    params = (Param("t", float),)
    contract = Contract(base="required", min_inputs=2, max_inputs=2)

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        t = values.shared["t"]
        a = inputs.base_tensor.reshape(-1)
        b = inputs.tensors[inputs.non_base[0]].reshape(-1)
        flat = out.view(-1)
        for start, stop in chunk_ranges(flat.numel()):
            x, y = a[start:stop], b[start:stop]
            weight = (t / torch.abs(x - y).clamp(min=1e-6)).clamp(min=0, max=1)
            flat[start:stop].copy_(weight * y + (1 - weight) * x)
