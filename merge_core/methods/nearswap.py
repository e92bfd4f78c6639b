"""nearswap: take the other model's value where it is near the base's, the base's elsewhere."""

from __future__ import annotations

import torch

from merge_core import native
from merge_core.methods.base import Contract, MergeMethod, Param
from merge_core.methods.chunks import CHUNK_ELEMENTS, chunk_ranges


class NearSwap(MergeMethod):
    """weight = clamp(t / max(|base - other|, 1e-6), 0, 1); weight * other + (1 - weight) * base.

    Everything is elementwise in the merge dtype, so a candidate is one chunked pass that reads
    both inputs once; nothing is worth keeping across candidates. Each chunk runs mergekit's
    operations one by one, in place in two preallocated chunk buffers (no temporaries): `t / x`
    is torch's reciprocal(x) * t, and `1 - weight` is a buffer of ones minus weight (not -weight + 1,
    which flips the sign bit of a NaN weight).
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
        if a.dtype != b.dtype:  # mixed inputs: mergekit's expressions, with their type promotion
            for start, stop in chunk_ranges(flat.numel()):
                x, y = a[start:stop], b[start:stop]
                weight = (t / torch.abs(x - y).clamp(min=1e-6)).clamp(min=0, max=1)
                flat[start:stop].copy_(weight * y + (1 - weight) * x)
            return
        variant = _native_variant(out, a, b)
        if variant is not None:
            native.nearswap(variant, out, a, b, t)
        else:
            _eager_pass(flat, a, b, t)


def _native_variant(out, base, other):
    """native.py's fused nearswap where it gives the eager pass's bits, else None."""
    if not native.usable(out, [base, other]):
        return None

    def run_native(variant, probe, into):
        native.nearswap(variant, into, probe[0], probe[1], 0.0123)

    def run_eager(probe, into):
        _eager_pass(into, probe[0], probe[1], 0.0123)

    return native.verified(("nearswap", out.dtype), native.ONE_VARIANT, run_native, run_eager)


def _eager_pass(flat, a, b, t: float) -> None:
    """mergekit's operations in place in two chunk buffers, for inputs of one dtype."""
    size = min(flat.numel(), CHUNK_ELEMENTS)
    weight_buf, rest_buf = a.new_empty(size), a.new_empty(size)
    direct = flat.dtype == a.dtype
    result_buf = None if direct else a.new_empty(size)
    for start, stop in chunk_ranges(flat.numel()):
        x, y, n = a[start:stop], b[start:stop], stop - start
        weight, rest = weight_buf[:n], rest_buf[:n]
        torch.sub(x, y, out=weight).abs_().clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(min=0, max=1)
        rest.fill_(1).sub_(weight).mul_(x)  # (1 - weight) * base
        if direct:
            torch.mul(weight, y, out=flat[start:stop]).add_(rest)
        else:
            flat[start:stop].copy_(torch.mul(weight, y, out=result_buf[:n]).add_(rest))
