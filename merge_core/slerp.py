"""SLERP as mergekit computes it, split into a per-study geometry and a per-candidate pass.

theta depends only on the two parents, so `geometry` runs once per tensor per study;
a candidate is then `slerp_into`: one bandwidth-bound pass that reads v0 and v1 and
writes the result.
"""

from __future__ import annotations

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
    cos = _cosine_as_mergekit(a, b, _compute_dtype(v0))
    if abs(cos) > DOT_THRESHOLD:
        return Geometry(0.0, True)
    return Geometry(float(torch.acos(torch.tensor(cos, dtype=_compute_dtype(v0)))), False)


def _cosine_as_mergekit(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    """mergekit's cosine, in its order: chunked norms, then each chunk normalised before the products
    are summed, in its chunk size and working dtype. Half-precision outputs show other orders too: a
    float64 sum of the products gave a cosine 4e-5 apart on a 26M-element bfloat16 pair, and 0.3% of
    a float16 SLERP's elements 1-2 ulp off mergekit's. Two working-dtype buffers serve every chunk
    (the same operations as mergekit's fresh tensors, without an allocation per step)."""
    chunk = MERGEKIT_CHUNK_ELEMENTS
    x = torch.empty(min(chunk, a.numel()), dtype=dtype, device=a.device)
    y = torch.empty_like(x)

    def part(v: torch.Tensor, s: int, n: int, into: torch.Tensor) -> torch.Tensor:  # v[s:s+n].to(dtype)
        return v[s : s + n] if v.dtype == dtype else into[:n].copy_(v[s : s + n])

    norms_a, norms_b = [], []
    for s in range(0, a.numel(), chunk):
        n = min(chunk, a.numel() - s)
        norms_a.append(torch.linalg.vector_norm(part(a, s, n, x)))
        norms_b.append(torch.linalg.vector_norm(part(b, s, n, y)))
    norm_a = torch.linalg.vector_norm(torch.stack(norms_a))
    norm_b = torch.linalg.vector_norm(torch.stack(norms_b))
    norm_a = torch.where(norm_a > EPS, norm_a, 1)
    norm_b = torch.where(norm_b > EPS, norm_b, 1)
    parts = []
    for s in range(0, a.numel(), chunk):
        n = min(chunk, a.numel() - s)
        xs = torch.div(part(a, s, n, x), norm_a, out=x[:n])
        ys = torch.div(part(b, s, n, y), norm_b, out=y[:n])
        parts.append(torch.mul(xs, ys, out=xs).sum())
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
