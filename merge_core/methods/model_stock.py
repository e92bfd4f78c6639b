"""model_stock: interpolate from the base toward the average by the angle between task vectors."""

from __future__ import annotations

import math

import torch

from merge_core.methods.base import Contract, MergeMethod, Param
from merge_core.methods.chunks import CHUNK_ELEMENTS, chunk_ranges


class ModelStock(MergeMethod):
    """Model Stock (arXiv 2403.19522) as mergekit computes it; `filter_wise` works per row.

    The interpolation factor t (one per tensor, or one per row with filter_wise) depends on the
    inputs alone: `prepare` computes it for both values of filter_wise with mergekit's reductions
    on whole tensors. A candidate is then mergekit's elementwise `t * average + (1 - t) * w_0`,
    `average = sum(ws) / count`, in its dtype and order, block by block.
    """

    name = "model_stock"
    params = (Param("filter_wise", bool, "global", False),)
    contract = Contract(base="required", min_inputs=3)

    @torch.no_grad()
    def prepare(self, inputs):
        base = inputs.base_tensor
        if inputs.base is None or len(inputs.non_base) < 2 or base.dim() == 0 or base.numel() == 0:
            return None
        w_0 = base.reshape(-1)
        ws = [inputs.tensors[i].reshape(-1) for i in inputs.non_base]
        whole = torch.empty_like(w_0)  # one tensor-sized buffer: each reduction's operand in turn
        # the shapes mergekit reduces over dim -1: flat, or filter_wise (a 1-D tensor as one row)
        views = {False: (w_0.numel(),), True: tuple(base.shape) if base.dim() > 1 else (1, w_0.numel())}
        return {"factors": {fw: _factors(w_0, ws, view, whole) for fw, view in views.items()},
                "all_negative_zero": _all_negative_zero(ws)}

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        filter_wise = values.shared["filter_wise"]
        if state is None:
            _merge_whole(out, inputs, filter_wise)
            return
        t, rest = state["factors"][filter_wise]
        # sum(ws) starts from int 0: 0 + w_1 turns -0 into +0, which changes the sum only where
        # every w_i is -0, so the + 0 is skipped where no element is
        from_zero = state["all_negative_zero"]
        shape = _rows(inputs.base_tensor, filter_wise)
        w_0 = inputs.base_tensor.reshape(shape)
        ws = [inputs.tensors[i].reshape(shape) for i in inputs.non_base]
        target = out.view(shape)
        rows, cols = shape
        row_step = max(1, CHUNK_ELEMENTS // cols)
        col_step = min(cols, CHUNK_ELEMENTS)
        work = w_0.new_empty(min(row_step, rows) * col_step)
        other = w_0.new_empty(work.numel())
        count = len(ws)
        same = out.dtype == w_0.dtype
        for r0, r1 in chunk_ranges(rows, row_step):
            for c0, c1 in chunk_ranges(cols, col_step):
                block = (slice(r0, r1), slice(c0, c1))
                size = (r1 - r0, c1 - c0)
                average = work[: math.prod(size)].view(size)
                if from_zero:
                    torch.add(ws[0][block], 0, out=average)
                    for w in ws[1:]:
                        average.add_(w[block])
                else:
                    torch.add(ws[0][block], ws[1][block], out=average)
                    for w in ws[2:]:
                        average.add_(w[block])
                average.div_(count).mul_(t[r0:r1])
                base_part = torch.mul(rest[r0:r1], w_0[block], out=other[: math.prod(size)].view(size))
                if same:
                    torch.add(average, base_part, out=target[block])
                else:
                    target[block].copy_(average.add_(base_part))


def _rows(tensor: torch.Tensor, filter_wise: bool) -> tuple[int, int]:
    """The (rows, columns) view mergekit's reductions run over: one row per filter, or one row."""
    if filter_wise and tensor.dim() > 1:
        return math.prod(tensor.shape[:-1]), tensor.shape[-1]
    return 1, tensor.numel()


def _factors(w_0: torch.Tensor, ws: list[torch.Tensor], view: tuple[int, ...], whole: torch.Tensor):
    """(t, 1 - t) as mergekit computes them over dim -1 of the inputs seen as `view`, each (rows, 1).

    mergekit reduces whole tensors (`torch.norm(offset, dim=-1)`, `(a * b).sum(dim=-1)`); each
    operand is assembled here block by block in one tensor-sized buffer, instead of keeping every
    offset, with the same values, shape and layout, so each reduction returns the same result.
    """
    rows = math.prod(view[:-1])

    def offset_of(i: int, into: torch.Tensor) -> torch.Tensor:
        for start, stop in chunk_ranges(w_0.numel()):
            torch.sub(ws[i][start:stop], w_0[start:stop], out=into[start:stop])
        return into.view(view)

    def product_of(i: int, j: int, into: torch.Tensor) -> torch.Tensor:
        size = min(CHUNK_ELEMENTS, w_0.numel())
        scratch = w_0.new_empty(size)
        for start, stop in chunk_ranges(w_0.numel()):
            a = torch.sub(ws[i][start:stop], w_0[start:stop], out=into[start:stop])
            a.mul_(torch.sub(ws[j][start:stop], w_0[start:stop], out=scratch[: stop - start]))
        return into.view(view)

    norms = [torch.norm(offset_of(i, whole), dim=-1) for i in range(len(ws))]
    cosines = []
    for i in range(len(ws)):
        for j in range(i + 1, len(ws)):
            norm_product = norms[i] * norms[j]
            dot = product_of(i, j, whole).sum(dim=-1)
            cosines.append((dot / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    t = _interpolation_factor(cosines, len(ws))
    return t.reshape(rows, 1), (1 - t).reshape(rows, 1)


def _interpolation_factor(cosines: list[torch.Tensor], count: int) -> torch.Tensor:
    """mergekit's t from the pairwise cosines of the task vectors (0 where the estimate is singular)."""
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)


def _all_negative_zero(ws: list[torch.Tensor]) -> bool:
    """Whether some element is -0 in every one of these (flat) tensors."""
    for start, stop in chunk_ranges(ws[0].numel()):
        hits = torch.signbit(ws[0][start:stop]) & (ws[0][start:stop] == 0)
        for w in ws[1:]:
            hits &= torch.signbit(w[start:stop]) & (w[start:stop] == 0)
        if bool(hits.any()):
            return True
    return False


def _merge_whole(out: torch.Tensor, inputs, filter_wise: bool) -> None:
    """mergekit's model_stock on whole tensors."""
    w_0 = inputs.base_tensor
    ws = [inputs.tensors[i] for i in inputs.non_base]
    shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    count = len(ws)
    t = _interpolation_factor(cosines, count)
    average = sum(ws) / count
    out.copy_((t * average + (1 - t) * w_0).reshape(shape))
