"""karcher: the weighted Karcher (Riemannian) mean of the inputs' directions, times their mean norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    tol: computed once per study. The iteration reduces over whole tensors, so it runs mergekit's
    operations, into buffers allocated once per tensor.
    """

    name = "karcher"
    params = (IntParam("max_iter", int, "global", 10), Param("tol", float, "global", 1e-5))

    @torch.no_grad()
    def prepare(self, inputs):
        tensors = inputs.tensors
        if len(tensors) == 1:
            return None
        dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
        return [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        tensors = inputs.tensors
        if len(tensors) == 1:
            out.copy_(tensors[0])
            return
        out.copy_(_karcher_mean(tensors, state, values.shared["max_iter"], values.shared["tol"]))


def _karcher_mean(tensors, norms, max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's karcher_merge_tensors with the same operations in the same order and dtypes, each
    elementwise step written into buffers allocated once per tensor (`out=` and in-place forms of the
    same torch operations, so the same kernels and bits) instead of a fresh tensor per step."""
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
        tangent.zero_()
        flat_mean = mean.flatten()
        for share, unit in zip(shares, valid_units, strict=True):
            dot = torch.clamp(torch.dot(flat_mean, unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            torch.mul(dot, mean, out=step)
            torch.sub(unit, step, out=step)
            tangent += torch.mul(share * (theta / torch.sin(theta)), step, out=step)
        tangent_norm = _norm(tangent, widened)
        if tangent_norm.item() < tol:
            break
        torch.mul(torch.cos(tangent_norm), mean, out=step)
        torch.div(tangent, tangent_norm, out=tangent)
        torch.add(step, torch.mul(torch.sin(tangent_norm), tangent, out=tangent), out=mean)
        unit_norm = _norm(mean, widened)
        if unit_norm.item() > tol:
            torch.div(mean, unit_norm, out=mean)

    del valid_units, step, tangent, widened  # before the result is allocated
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return scale * mean


def _norm(x: torch.Tensor, widened: torch.Tensor | None) -> torch.Tensor:
    """vector_norm(x.to(dtype)) as mergekit takes it, the widening copy made into `widened`."""
    return torch.linalg.vector_norm(x if widened is None else widened.copy_(x))
