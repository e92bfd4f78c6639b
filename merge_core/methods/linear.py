"""linear: the weighted average of the inputs, in float32 (float64 for float64 inputs)."""

from __future__ import annotations

import torch

from merge_core.methods.base import MergeMethod, Param
from merge_core.methods.chunks import chunk_ranges, working_dtype


class Linear(MergeMethod):
    """sum(w_i x_i) / sum(w_i) as mergekit computes it: one addcmul per input, then one division."""

    name = "linear"
    params = (Param("weight", float, "per_model"), Param("normalize", bool, "global", True))

    def merge(self, out, inputs, state, values, rng) -> None:
        dtype = working_dtype(inputs.tensors[0])
        # mergekit packs the weights into a float32 tensor; the same rounding here.
        weights = torch.tensor(values.of("weight", range(len(inputs.tensors))), dtype=dtype)
        denominator = weights.sum() if values.shared["normalize"] else None
        coefficients = weights.unbind(0)
        flat_out = out.view(-1)
        flats = [t.reshape(-1) for t in inputs.tensors]
        for start, stop in chunk_ranges(flat_out.numel()):
            acc = torch.zeros(stop - start, dtype=dtype, device=out.device)
            for x, c in zip(flats, coefficients, strict=True):
                acc.addcmul_(x[start:stop], c)
            if denominator is not None:
                acc.div_(denominator)
            flat_out[start:stop].copy_(acc.to(inputs.tensors[0].dtype))
