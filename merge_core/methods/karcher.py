"""karcher: the weighted Karcher (Riemannian) mean of the inputs' directions, times their mean norm."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from merge_core import native
from merge_core.methods.base import MergeMethod, Param


@dataclass(frozen=True)
class IntParam(Param):
    """An integer parameter: whole numbers only (mergekit validates it as int)."""

    def coerce(self, value):
        number = super().coerce(value)
        if number != int(number):
            raise ValueError(f"must be a whole number, got {value!r}")
        return int(number)


class Karcher(MergeMethod):
    """mergekit's karcher: equal weights 1/N, up to `max_iter` gradient steps on the sphere.

    The norms of the inputs (in float32, float64 for float64 inputs) do not depend on max_iter or
    tol: computed once per study. The iteration reduces over whole tensors (dots and norms: torch's,
    for their summation order), into buffers allocated once per tensor; its elementwise steps run as
    two fused native passes per iteration where those give the eager steps' bits (`_native_variant`).
    """

    name = "karcher"
    params = (IntParam("max_iter", int, "global", 10), Param("tol", float, "global", 1e-5))

    @torch.no_grad()
    def prepare(self, inputs):
        if len(inputs.tensors) == 1:
            return None
        norms = _norms(inputs.tensors)
        return KarcherState(norms, _native_variant(inputs.tensors, norms))

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        tensors = inputs.tensors
        if len(tensors) == 1:
            out.copy_(tensors[0])
            return
        out.copy_(_karcher_mean(tensors, state.norms, values.shared["max_iter"], values.shared["tol"], state.variant))


@dataclass(frozen=True)
class KarcherState:
    """What a study keeps per tensor: the inputs' norms, and the native variant they can take (None:
    the eager steps)."""

    norms: list[torch.Tensor]
    variant: tuple | None


def _norms(tensors) -> list[torch.Tensor]:
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]


def _native_variant(tensors, norms):
    """The verified native variant for these inputs, or None (eager steps): finite inputs only (the
    probe has no infinities or NaNs), of one dtype the passes take."""
    if not native.usable(tensors[0], tensors) or not all(bool(torch.isfinite(norm)) for norm in norms):
        return None
    dtype = tensors[0].dtype

    def run(variant, probe, into):
        into.copy_(_karcher_mean(*_probe(dtype, probe[0].numel()), 4, 1e-5, variant).view(-1))

    return native.verified(("karcher", dtype), native.KARCHER_VARIANTS, run,
                           lambda probe, into: run(None, probe, into), specials=False)


@lru_cache(maxsize=4)
def _probe(dtype: torch.dtype, numel: int):
    """Three inputs, two near each other and one far from both: the normalised mean starts far from
    the Karcher mean, so the first steps are large (cos and sin of the tangent's norm far from 1 and
    0) and every rounding the native variants differ in changes the result's bits."""
    generator = torch.Generator().manual_seed(1234)
    near = torch.randn(numel, generator=generator)
    inputs = [near, near + torch.randn(numel, generator=generator) * 0.1, torch.randn(numel, generator=generator) * 3]
    inputs = [x.to(dtype) for x in inputs]
    return inputs, _norms(inputs)


def _karcher_mean(tensors, norms, max_iter: int, tol: float, variant=None) -> torch.Tensor:
    """mergekit's karcher_merge_tensors with the same operations in the same order and dtypes, each
    elementwise step written into buffers allocated once per tensor (`out=` and in-place forms of the
    same torch operations, so the same kernels and bits) instead of a fresh tensor per step; with a
    native `variant`, each iteration's elementwise steps as its two fused passes."""
    dtype = norms[0].dtype
    alphas = [1.0 / len(tensors)] * len(tensors)
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)
    units = {i: torch.zeros_like(tensors[i]) if norms[i].item() == 0.0 else (tensors[i] / norms[i]).to(tensors[i].dtype)
             for i in valid}
    alpha_sum = sum(alphas[i] for i in valid)
    shares = [alphas[i] / alpha_sum for i in valid]
    valid_units = [units[i] for i in valid]
    del units
    mean = torch.zeros_like(valid_units[0])
    # half inputs: the float32 copy a norm takes, and the step of an update, share one buffer (a
    # step is done with before each norm, and each norm before the next step)
    widened = None if mean.dtype == dtype else torch.empty(mean.shape, dtype=dtype, device=mean.device)
    if widened is None:
        step = torch.empty_like(mean)
    else:
        step = widened.view(-1).view(mean.dtype)[:mean.numel()].view(mean.shape)

    for share, unit in zip(shares, valid_units, strict=True):
        mean += torch.mul(unit, share, out=step)  # share * unit: a Python float multiplies as mul(unit, share)
    mean_norm = _norm(mean, widened)
    if mean_norm.item() < tol:
        mean.copy_(valid_units[0])
    else:
        torch.div(mean, mean_norm, out=mean)

    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        flat_mean = mean.flatten()
        if variant is None:
            tangent.zero_()
        taking, dots, coefs = [], [], []
        for share, unit in zip(shares, valid_units, strict=True):
            dot = torch.clamp(torch.dot(flat_mean, unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            coef = share * (theta / torch.sin(theta))
            if variant is None:
                torch.mul(dot, mean, out=step)
                torch.sub(unit, step, out=step)
                tangent += torch.mul(coef, step, out=step)
            else:
                taking.append(unit)
                dots.append(dot.item())
                coefs.append(coef.item())
        if variant is None:
            tangent_norm = _norm(tangent, widened)
        else:  # the pass writes the float32 copy the norm takes
            native.karcher(variant[0], 1, mean, tangent, widened, taking, dots, coefs)
            tangent_norm = torch.linalg.vector_norm(tangent if widened is None else widened)
        if tangent_norm.item() < tol:
            break
        if variant is None:
            torch.mul(torch.cos(tangent_norm), mean, out=step)
            torch.div(tangent, tangent_norm, out=tangent)
            torch.add(step, torch.mul(torch.sin(tangent_norm), tangent, out=tangent), out=mean)
            unit_norm = _norm(mean, widened)
        else:
            factors = torch.stack([torch.cos(tangent_norm), torch.sin(tangent_norm)])
            cos, sin = (factors.to(mean.dtype) if variant[1] else factors).tolist()
            norm = (tangent_norm.to(mean.dtype) if variant[2] else tangent_norm).item()
            native.karcher(variant[0], 2, mean, tangent, widened, cos=cos, sin=sin, norm=norm)
            unit_norm = torch.linalg.vector_norm(mean if widened is None else widened)
        if unit_norm.item() > tol:
            torch.div(mean, unit_norm, out=mean)

    del valid_units, step, tangent, widened  # before the result is allocated
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return scale * mean


def _norm(x: torch.Tensor, widened: torch.Tensor | None) -> torch.Tensor:
    """vector_norm(x.to(dtype)) as mergekit takes it, the widening copy made into `widened`."""
    return torch.linalg.vector_norm(x if widened is None else widened.copy_(x))
