"""SLERP as mergekit computes it, split into a per-study geometry and a per-candidate pass.

theta depends only on the two parents, so `geometry` runs once per tensor per study;
a candidate is then `slerp_into`: one bandwidth-bound pass that reads v0 and v1 and
writes the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from merge_core import native

DOT_THRESHOLD = 0.9995
EPS = 1e-8
# Full-precision scratch per step stays small (a few MB) whatever the tensor size.
CHUNK_ELEMENTS = 256 * 1024
MERGEKIT_CHUNK_ELEMENTS = 1024 * 1024


@dataclass(frozen=True)
class Geometry:
    """The angle between two parent tensors, or that they are (anti)parallel."""

    theta: float
    linear: bool


def _compute_dtype(v: torch.Tensor) -> torch.dtype:
    return torch.float64 if v.dtype == torch.float64 else torch.float32


@torch.no_grad()
def geometry(v0: torch.Tensor, v1: torch.Tensor) -> Geometry:
    """theta = arccos of the normalised dot product over the whole flattened tensors."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() == 0:
        return Geometry(0.0, True)
    if v0.dtype in (torch.float32, torch.float64):
        cos = _cosine_as_mergekit(a, b, _compute_dtype(v0))
    else:
        cos = _cosine_fused(a, b)
    if abs(cos) > DOT_THRESHOLD:
        return Geometry(0.0, True)
    return Geometry(float(torch.acos(torch.tensor(cos, dtype=_compute_dtype(v0)))), False)


def _cosine_fused(a: torch.Tensor, b: torch.Tensor) -> float:
    # One pass: dot(a, b) / (|a| |b|) with float64 sums across float32 chunks. It differs from
    # mergekit's order of operations by float32 rounding, which half outputs cannot show.
    # Two float32 scratch buffers reused for every chunk: allocating per chunk leaves the freed
    # memory in the allocator's heap, which showed up as ~0.1x of a model in peak RSS.
    buf_x = torch.empty(min(CHUNK_ELEMENTS, a.numel()), dtype=torch.float32, device=a.device)
    buf_y = torch.empty_like(buf_x)
    dot = sq_a = sq_b = 0.0
    for start in range(0, a.numel(), CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, a.numel() - start)
        x = buf_x[:n].copy_(a[start : start + n])
        y = buf_y[:n].copy_(b[start : start + n])
        dot += float(torch.inner(x, y))
        sq_a += float(torch.inner(x, x))
        sq_b += float(torch.inner(y, y))
    norm_a, norm_b = math.sqrt(sq_a), math.sqrt(sq_b)
    cos = dot / ((norm_a if norm_a > EPS else 1.0) * (norm_b if norm_b > EPS else 1.0))
    if math.isnan(cos):  # infinite inputs: mergekit's NaN angle, which makes the result NaN (torch's clamp keeps it)
        return cos
    return min(1.0, max(-1.0, cos))


def _cosine_as_mergekit(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    # Full-precision outputs show float32 rounding, so follow mergekit's exact order:
    # chunked norms, then normalise before multiplying, in its chunk size.
    chunk = MERGEKIT_CHUNK_ELEMENTS
    norm_a = torch.linalg.vector_norm(torch.stack([
        torch.linalg.vector_norm(a[s : s + chunk].to(dtype)) for s in range(0, a.numel(), chunk)]))
    norm_b = torch.linalg.vector_norm(torch.stack([
        torch.linalg.vector_norm(b[s : s + chunk].to(dtype)) for s in range(0, b.numel(), chunk)]))
    norm_a = torch.where(norm_a > EPS, norm_a, 1)
    norm_b = torch.where(norm_b > EPS, norm_b, 1)
    parts = [((a[s : s + chunk].to(dtype) / norm_a) * (b[s : s + chunk].to(dtype) / norm_b)).sum()
             for s in range(0, a.numel(), chunk)]
    return float(torch.stack(parts).sum().clamp(-1, 1))


def coefficients(geom: Geometry, t: float, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(s0, s1) with result = s0 * v0 + s1 * v1, computed in the merge's working precision."""
    t_ = torch.tensor(t, dtype=dtype)
    if geom.linear:
        return float(1 - t_), float(t_)
    theta = torch.tensor(geom.theta, dtype=dtype)
    sin_theta = torch.sin(theta)
    return float(torch.sin((1 - t_) * theta) / sin_theta), float(torch.sin(t_ * theta) / sin_theta)


@torch.no_grad()
def slerp_into(out: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, s0: float, s1: float) -> torch.Tensor:
    """Write s0 * v0 + s1 * v1 into `out` (same shape and dtype as v0 and v1), bit for bit as mergekit.

    mergekit multiplies and adds in float32 and rounds once to the output dtype; half types do the
    same here in cache-sized float32 chunks (two reused scratch buffers), so a chain of stages sees
    exactly mergekit's intermediate tensors. Full-precision types take mergekit's three operations.
    """
    if out.dtype in (torch.float32, torch.float64):
        torch.mul(v0, s0, out=out)
        return out.add_(v1 * s1)
    variant = _native_variant(out, v0, v1)
    if variant is not None:
        native.linear(variant, out, [v0, v1], [s0, s1], None)
        return out
    return _eager_half_pass(out, v0, v1, s0, s1)


def _native_variant(out: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor):
    """The fused pass (native.py's linear: x0 * s0 + x1 * s1, one rounding) where it gives the
    eager pass's bits, else None."""
    if not native.usable(out, [v0, v1]):
        return None
    s0, s1 = 0.8123456789, -0.3456789123

    def run_native(variant, probe, into):
        native.linear(variant, into, probe[:2], [s0, s1], None)

    def run_eager(probe, into):
        _eager_half_pass(into, probe[0], probe[1], s0, s1)

    return native.verified(("slerp", out.dtype), native.LINEAR_VARIANTS, run_native, run_eager)


def _eager_half_pass(out: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, s0: float, s1: float) -> torch.Tensor:
    flat_out, a, b = out.view(-1), v0.reshape(-1), v1.reshape(-1)
    size = min(CHUNK_ELEMENTS, max(1, flat_out.numel()))
    buf_a = torch.empty(size, dtype=torch.float32, device=out.device)
    buf_b = torch.empty_like(buf_a)
    for start in range(0, flat_out.numel(), size):
        n = min(size, flat_out.numel() - start)
        x = buf_a[:n].copy_(a[start:start + n]).mul_(s0)
        y = buf_b[:n].copy_(b[start:start + n]).mul_(s1)
        flat_out[start:start + n].copy_(x.add_(y))
    return out


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP of two tensors in one call (geometry + pass); v0 is the base, t = 0 gives v0."""
    s0, s1 = coefficients(geometry(v0, v1), t, _compute_dtype(v0))
    return slerp_into(torch.empty_like(v0), v0, v1, s0, s1)
