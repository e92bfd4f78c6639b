"""sce: Select (by variance across models), Calculate (weights from delta energy), Erase (signs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_core import native
from merge_core.methods.base import Contract, Inputs, MergeMethod, Param
from merge_core.methods.chunks import BIT_TYPES, CHUNK_ELEMENTS, chunk_ranges, half_row_sum
from merge_core.methods.sparsify import HALF
from merge_core.methods.task_arithmetic import _sign_consensus


@dataclass
class SceState:
    """What a study keeps per tensor: the per-model weights without selection, and, from the first
    candidate with select_topk < 1, |variance| across models and its count of nonzeros (one tensor
    the size of the output: the slowest step of mergekit's candidate, a float64 Welford per element)."""

    weights: torch.Tensor
    variance: torch.Tensor | None = None
    nonzero: int = 0


class Sce(MergeMethod):
    """mergekit's sce. Without selection (select_topk >= 1, the default) nothing depends on a
    searched parameter, so the per-model weights are prepared once and a candidate is one pass (the
    native one where it gives `_merge_chunked`'s bits, else `_merge_chunked`); with selection, the
    variance top-k changes every weight, and the candidate runs as mergekit runs it (whole tensors)
    from the variance kept after its first use."""

    name = "sce"
    params = (Param("int8_mask", bool, "global", False), Param("select_topk", float, "global", 1.0))
    contract = Contract(base="required")

    @torch.no_grad()
    def prepare(self, inputs):
        if not inputs.non_base:
            return None
        return SceState(_weights(_task_vectors(inputs)))

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        base = inputs.base_tensor
        if not inputs.non_base:
            out.copy_(base)
            return
        mask_dtype = torch.int8 if values.shared["int8_mask"] else base.dtype
        topk = values.shared["select_topk"]
        weights = state.weights
        chunked = base.dtype in BIT_TYPES and _same_dtypes(inputs)
        if topk >= 1 and chunked and bool(torch.isfinite(weights).all()):
            children = [inputs.tensors[i] for i in inputs.non_base]
            variant = _native_variant(out, base, children)
            if variant is not None:
                native.sce(variant, out, children, base, weights.tolist())
            else:
                _merge_chunked(out, inputs, weights)
            return
        vectors = _task_vectors(inputs)
        if topk < 1:
            vectors = vectors.mul_(_select(vectors, topk, mask_dtype, state).unsqueeze(0))
            weights = _weights(vectors)  # a reduction over whole rows: torch's own, for its summation order
            if chunked and bool(torch.isfinite(weights).all()):
                _merge_chunked(out, inputs, weights, vectors)
                return
        erase = _sign_consensus(vectors, mask_dtype)
        while weights.dim() < vectors.dim():
            weights = weights.unsqueeze(-1)
        erased = weights * erase
        del erase
        merged = (vectors * erased).sum(dim=0)
        out.copy_(base + merged / torch.sum(erased, dim=0).clamp(min=1e-6))


def _native_variant(out: torch.Tensor, base: torch.Tensor, children: list[torch.Tensor]):
    """The verified native pass of the unselected candidate (native.py), or None."""
    if out.dtype != base.dtype or not native.usable(out, [base, *children]):
        return None
    if out.dtype == torch.float32 and len(children) > 4:
        return None  # torch sums more than four float32 rows in another order than the pass's (see native.c)
    rows = min(len(children), 3)  # one, two and more rows are summed differently

    def probe_call(variant, probe, into):
        weights = torch.tensor([0.375, 0.5, 0.125][:rows], dtype=into.dtype)
        if variant is None:
            _merge_chunked(into, Inputs(tuple(probe[: rows + 1]), base=0), weights)
        else:
            native.sce(variant, into, list(probe[1: rows + 1]), probe[0], weights.tolist())

    return native.verified(("sce", out.dtype, rows), native.ONE_VARIANT, probe_call,
                           lambda probe, into: probe_call(None, probe, into))


def _same_dtypes(inputs) -> bool:
    return all(inputs.tensors[i].dtype == inputs.base_tensor.dtype for i in inputs.non_base)


def _merge_chunked(out: torch.Tensor, inputs, weights: torch.Tensor, masked: torch.Tensor | None = None) -> None:
    """The candidate from its weights, chunk by chunk (`masked`: the task vectors after selection,
    else they are the children minus the base): every operation after the weights
    is elementwise or a sum over the models' axis, so mergekit's operations on a chunk of every
    input give that chunk of its result, bit for bit. Everything runs in preallocated chunk buffers:
    the sums over models as `half_row_sum` (torch's float32 accumulation, rounded once) for half
    types, `weights * mask` as the mask copied to the merge dtype times the weight (the weight or
    +0, as mergekit's product), one row at a time.

    Only for finite weights: an infinite or NaN delta makes them non-finite, and then the NaNs of
    the result carry sign and payload bits that depend on how torch splits the whole tensor (seen
    in bfloat16), so such tensors run mergekit's whole-tensor operations. With finite weights every
    delta is finite and the result has no NaN (the erased sum only adds same-signed products)."""
    base = inputs.base_tensor.reshape(-1)
    children = [inputs.tensors[i].reshape(-1) for i in inputs.non_base]
    masked = None if masked is None else masked.reshape(len(children), -1)
    flat = out.view(-1)
    m, size = len(children), min(flat.numel(), CHUNK_ELEMENTS)
    shares = [float(w) for w in weights]  # half values, exact as Python floats; >= 0 when finite
    rows = [base.new_empty(m * size) for _ in range(3)]  # task vectors, signs, erased weights
    erase = torch.empty(size, dtype=torch.bool)
    total, denom = base.new_empty(size), base.new_empty(size)
    majority = base.new_empty(size)  # in the merge dtype: +-1 compare alike in any mask dtype
    bits = BIT_TYPES[base.dtype]
    acc = torch.empty(size) if m > 2 else None
    if base.dtype in HALF:
        def row_sum(r, into):
            return half_row_sum(r, into, acc)
    else:
        def row_sum(r, into):
            return torch.sum(r, dim=0, out=into)
    direct = flat.dtype == base.dtype
    for start, stop in chunk_ranges(flat.numel()):
        n = stop - start
        vectors, signs, erased = (r[: m * n].view(m, n) for r in rows)
        x, t, d, e = base[start:stop], total[:n], denom[:n], erase[:n]
        if masked is not None:
            vectors.copy_(masked[:, start:stop])
        else:
            for i, child in enumerate(children):
                torch.sub(child[start:stop], x, out=vectors[i])
        # _sign_consensus: sign(delta) == (sum(delta) >= 0) * 2 - 1 (int8_mask changes no value)
        maj = majority[:n].copy_(torch.ge(row_sum(vectors, t), 0, out=e)).mul_(2).sub_(1)
        sign_bits, maj_bits = torch.sign(vectors, out=signs).view(bits), maj.view(bits)
        for i in range(m):
            # sign == majority on bit patterns: signs are +-1 or +-0 and majority +-1, all exact in
            # the mask dtype too; weight * mask: the weight where the sign agrees, else +0
            erased[i].copy_(torch.eq(sign_bits[i], maj_bits, out=e)).mul_(shares[i])
        row_sum(erased, d).clamp_(min=1e-6)
        row_sum(vectors.mul_(erased), t).div_(d)
        if direct:
            torch.add(x, t, out=flat[start:stop])
        else:
            flat[start:stop].copy_(t.add_(x))


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


def _select(vectors: torch.Tensor, density: float, mask_dtype: torch.dtype, state: SceState) -> torch.Tensor:
    """Mask of the elements whose variance across models is in the top `density` of the nonzero ones
    (mergekit's calls on the same |variance|, so equal variances at the cut are chosen alike)."""
    if density <= 0:
        return torch.zeros_like(vectors[0], dtype=mask_dtype)
    if state.variance is None:
        state.variance = torch.var(vectors, dim=0, unbiased=False).abs_()
        state.nonzero = int(torch.count_nonzero(state.variance))
    # mergekit's int(count_nonzero(var) * density): an int64 tensor times a float is a float32 product
    # (torch's default dtype), which rounds differently from Python's float64 (0.49999999999999994 * 2048)
    k = int(torch.tensor(state.nonzero) * density)
    mask = torch.zeros_like(state.variance, dtype=mask_dtype)
    if k == 0:
        return mask
    # unsorted: the same index set (torch's nth_element or partial_sort), without sorting k of them
    _, indices = torch.topk(state.variance.view(-1), k=k, largest=True, sorted=False)
    mask.view(-1)[indices] = 1
    return mask
