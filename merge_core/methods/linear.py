"""linear: the weighted average of the inputs, in float32 (float64 for float64 inputs)."""

from __future__ import annotations

import torch

from merge_core import native
from merge_core.methods.base import MergeMethod, Param, refuse_zero_sum
from merge_core.methods.chunks import CHUNK_ELEMENTS, chunk_ranges, working_dtype


class Linear(MergeMethod):
    """sum(w_i x_i) / sum(w_i) as mergekit computes it: one addcmul per input, then one division."""

    name = "linear"
    params = (Param("weight", float, "per_model"), Param("normalize", bool, "global", True))

    def check(self, values, where, dtype) -> None:
        if values.shared["normalize"]:  # mergekit sums the weights in float32 (float64 for float64 inputs)
            summed_in = torch.float64 if dtype == torch.float64 else torch.float32
            refuse_zero_sum(values.of("weight", range(len(values.per_input))), "normalize", summed_in)

    def merge(self, out, inputs, state, values, rng) -> None:
        dtype = working_dtype(inputs.tensors[0])
        # mergekit packs the weights into a float32 tensor; the same rounding here.
        weights = torch.tensor(values.of("weight", range(len(inputs.tensors))), dtype=dtype)
        normalize = values.shared["normalize"]
        variant = _native_variant(out, inputs.tensors)
        if variant is not None:
            native.linear(variant, out, inputs.tensors, weights.tolist(), weights.sum().item() if normalize else None)
        else:
            _eager_pass(out, inputs.tensors, weights, normalize)


def _native_variant(out: torch.Tensor, tensors: list[torch.Tensor]):
    if not native.usable(out, tensors):
        return None

    def run_native(variant, probe, into):
        weights = torch.tensor([0.3, -1.7, 0.55, 2.1], dtype=torch.float32)
        native.linear(variant, into, probe, weights.tolist(), weights.sum().item())

    def run_eager(probe, into):
        _eager_pass(into, probe, torch.tensor([0.3, -1.7, 0.55, 2.1], dtype=torch.float32), True)

    return native.verified(("linear", out.dtype), native.LINEAR_VARIANTS, run_native, run_eager)


def _eager_pass(out: torch.Tensor, tensors: list[torch.Tensor], weights: torch.Tensor, normalize: bool) -> None:
    """The merge in chunks of torch operations, mergekit's own in its order and dtypes."""
    dtype = weights.dtype
    denominator = weights.sum() if normalize else None
    coefficients = weights.unbind(0)
    flat_out = out.view(-1)
    flats = [t.reshape(-1) for t in tensors]
    same = out.dtype == tensors[0].dtype
    acc_buffer = torch.empty(min(flat_out.numel(), CHUNK_ELEMENTS), dtype=dtype, device=out.device)
    for start, stop in chunk_ranges(flat_out.numel()):
        # zeros + addcmul_ of the first input is exactly x * c: start from that product.
        acc = acc_buffer[: stop - start].copy_(flats[0][start:stop]).mul_(coefficients[0])
        for x, c in zip(flats[1:], coefficients[1:], strict=True):
            acc.addcmul_(x[start:stop], c)
        if denominator is not None:
            acc.div_(denominator)
        # one rounding to the input dtype, as mergekit's .to(first.dtype); a second to out_dtype
        flat_out[start:stop].copy_(acc if same else acc.to(tensors[0].dtype))
