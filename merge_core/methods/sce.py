"""sce: Select (by variance across models), Calculate (weights from delta energy), Erase (signs)."""

from __future__ import annotations

import torch

from merge_core.methods.base import Contract, MergeMethod, Param
from merge_core.methods.task_arithmetic import _sign_consensus


class Sce(MergeMethod):
    """mergekit's sce. Without selection (select_topk >= 1, the default) nothing depends on a
    searched parameter, so the per-model weights are prepared once; with selection, the variance
    top-k changes every weight, and the candidate runs as mergekit runs it."""

    name = "sce"
    params = (Param("int8_mask", bool, "global", False), Param("select_topk", float, "global", 1.0))
    contract = Contract(base="required")

    @torch.no_grad()
    def prepare(self, inputs):
        if not inputs.non_base:
            return None
        return _weights(_task_vectors(inputs))

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        base = inputs.base_tensor
        if not inputs.non_base:
            out.copy_(base)
            return
        mask_dtype = torch.int8 if values.shared["int8_mask"] else base.dtype
        topk = values.shared["select_topk"]
        vectors = _task_vectors(inputs)
        weights = state
        if topk < 1:
            vectors = vectors * _select(vectors, topk, mask_dtype).unsqueeze(0)
            weights = _weights(vectors)
        erase = _sign_consensus(vectors, mask_dtype)
        while weights.dim() < vectors.dim():
            weights = weights.unsqueeze(-1)
        erased = weights * erase
        del erase
        merged = (vectors * erased).sum(dim=0)
        out.copy_(base + merged / torch.sum(erased, dim=0).clamp(min=1e-6))


def _task_vectors(inputs) -> torch.Tensor:
    base = inputs.base_tensor
    return torch.stack([inputs.tensors[i] - base for i in inputs.non_base], dim=0)


def _weights(vectors: torch.Tensor) -> torch.Tensor:
    """Each model's share of the mean squared delta (equal shares when all deltas are ~0)."""
    energy = vectors.square().reshape(vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def _select(vectors: torch.Tensor, density: float, mask_dtype: torch.dtype) -> torch.Tensor:
    """Mask of the elements whose variance across models is in the top `density` of the nonzero ones."""
    if density <= 0:
        return torch.zeros_like(vectors[0], dtype=mask_dtype)
    variance = torch.var(vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * density)
    mask = torch.zeros_like(variance, dtype=mask_dtype)
    if k == 0:
        return mask
    _, indices = torch.topk(variance.abs().view(-1), k=k, largest=True)
    mask.view(-1)[indices] = 1
    return mask
