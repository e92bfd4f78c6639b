"""nuslerp: SLERP of two models (or of their deltas from a base), t from their two weights.

The angle between the two (deltas of the) inputs does not depend on the weights, so it is
computed once per tensor and layout (flattened, per row or per column) and kept; a candidate
then only needs the two sine coefficients and one pass over the inputs.
"""

from __future__ import annotations

import torch

from merge_core import native
from merge_core.methods.base import MergeMethod, Param
from merge_core.methods.chunks import chunk_ranges
from merge_core.methods.non_base import NonBaseContract

EPS = 1e-8  # colinear when 1 - cos^2 <= EPS^2
NORM_EPS = 1e-7


class NuSlerp(MergeMethod):
    """mergekit's nuslerp: t = w_1 / (w_0 + w_1) (0.5 when the weights sum to ~0)."""

    name = "nuslerp"
    params = (
        Param("weight", float, "per_non_base"),
        Param("nuslerp_row_wise", bool, "global", False),
        Param("nuslerp_flatten", bool, "global", True),
    )
    contract = NonBaseContract(base="optional", min_non_base=2, max_non_base=2)

    def prepare(self, inputs):
        # Geometry per layout, filled on first use: the layout is a parameter, the angle is not.
        return {}

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        first, second = inputs.non_base
        weights = values.of("weight", (first, second))
        total = sum(weights)
        t = 0.5 if abs(total) < 1e-6 else weights[1] / total
        flatten = values.shared["nuslerp_flatten"]
        row_wise = values.shared["nuslerp_row_wise"]
        mode = "flat" if flatten else ("rows" if row_wise else "last")
        if mode not in state:
            state[mode] = _geometry(*_operands(inputs, first, second, mode))
        colinear, theta, sin_theta = state[mode]
        if mode == "flat":
            _flat_pass(out, inputs, first, second, t, colinear, theta, sin_theta)
            return
        v0, v1 = _operands(inputs, first, second, mode)
        result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
        result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
        if mode == "rows":
            result = result.transpose(0, -1)
        result = result.reshape(out.shape)
        if inputs.base is not None:
            result = inputs.base_tensor + result
        out.copy_(result)


def _operands(inputs, first: int, second: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    v0, v1 = inputs.tensors[first], inputs.tensors[second]
    if inputs.base is not None:
        v0, v1 = v0 - inputs.base_tensor, v1 - inputs.base_tensor
    if mode == "flat":
        return v0.reshape(-1), v1.reshape(-1)
    if mode == "rows":
        return v0.transpose(0, -1), v1.transpose(0, -1)
    return v0, v1


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=NORM_EPS)


def _geometry(v0: torch.Tensor, v1: torch.Tensor):
    """(colinear, theta, sin theta) along the last axis, in the merge dtype, as mergekit has them."""
    cos_theta = torch.sum(_normalised(v0) * _normalised(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    return colinear, theta, torch.sin(theta)


def _flat_pass(out, inputs, first, second, t, colinear, theta, sin_theta) -> None:
    """The flattened layout has one angle: elementwise from here on, so one pass (native.py's
    delta_sum where it gives the eager pass's bits)."""
    tensors = [inputs.tensors[first], inputs.tensors[second]]
    base = inputs.base_tensor if inputs.base is not None else None
    linear = bool(colinear.item())
    variant = _native_variant(out, tensors, base, linear)
    if variant is None:
        _eager_flat_pass(out, tensors, base, t, linear, theta, sin_theta)
    elif linear:
        native.delta_sum(variant, out, tensors, base, [1 - t, t], plus_zero=False)
    else:
        s0, s1 = torch.sin((1 - t) * theta), torch.sin(t * theta)
        native.delta_sum(variant, out, tensors, base, [s0.item(), s1.item()], sin_theta.item(), plus_zero=False)


def _native_variant(out, tensors, base, linear: bool):
    if not native.usable(out, tensors + ([base] if base is not None else [])):
        return None
    theta = torch.tensor([1.234], dtype=out.dtype)
    t = 0.3125 if linear else 0.61

    def run_native(variant, probe, into):
        probe_base = probe[0] if base is not None else None
        if linear:
            native.delta_sum(variant, into, probe[1:3], probe_base, [1 - t, t], plus_zero=False)
        else:
            s0, s1 = torch.sin((1 - t) * theta), torch.sin(t * theta)
            native.delta_sum(variant, into, probe[1:3], probe_base, [s0.item(), s1.item()],
                             torch.sin(theta).item(), plus_zero=False)

    def run_eager(probe, into):
        probe_base = probe[0] if base is not None else None
        _eager_flat_pass(into, probe[1:3], probe_base, t, linear, theta, torch.sin(theta))

    key = ("nuslerp", out.dtype, base is not None, linear)
    return native.verified(key, native.ONE_VARIANT, run_native, run_eager)


def _eager_flat_pass(out, tensors, base, t, linear: bool, theta, sin_theta) -> None:
    """mergekit's operations, chunk by chunk."""
    c0, c1 = tensors[0].reshape(-1), tensors[1].reshape(-1)
    base = base.reshape(-1) if base is not None else None
    s0, s1 = torch.sin((1 - t) * theta), torch.sin(t * theta)
    flat = out.view(-1)
    for start, stop in chunk_ranges(flat.numel()):
        v0, v1 = c0[start:stop], c1[start:stop]
        if base is not None:
            b = base[start:stop]
            v0, v1 = v0 - b, v1 - b
        if linear:
            result = (1 - t) * v0 + t * v1
        else:
            result = (s0 * v0 + s1 * v1) / sin_theta
        if base is not None:
            result = b + result
        flat[start:stop].copy_(result)
