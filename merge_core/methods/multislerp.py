"""multislerp: barycentric interpolation of N models (or their deltas) on a hypersphere."""

from __future__ import annotations

import torch

from merge_core import native
from merge_core.errors import MergeInputError
from merge_core.methods.base import Inputs, MergeMethod, Param, refuse_zero_sum
from merge_core.methods.chunks import CHUNK_ELEMENTS, chunk_ranges, half_row_sum
from merge_core.methods.non_base import NonBaseContract
from merge_core.methods.sparsify import HALF


class MultiSlerp(MergeMethod):
    """mergekit's multislerp: map each input to the unit sphere, average in the tangent space at
    their weighted mean direction, map back and rescale by the weighted mean norm.

    The per-input norms do not depend on the weights: computed once per study. The rest runs in
    chunks of mergekit's own operations in its dtype (`_ChunkedPass`), with its whole-tensor
    reductions (two norms, one dot product per input) taken by the same torch calls on whole
    vectors assembled chunk by chunk.
    """

    name = "multislerp"
    params = (
        Param("weight", float, "per_non_base"),
        Param("normalize_weights", bool, "global", True),
        Param("eps", float, "global", 1e-8),
    )
    contract = NonBaseContract(base="optional", min_inputs=1, min_non_base=1)

    def check(self, values, where, dtype) -> None:
        weights = [v["weight"] for v in values.per_input if "weight" in v]
        if values.shared["normalize_weights"] and len(weights) > 1:  # one input is copied as it is
            refuse_zero_sum(weights, "normalize_weights", dtype)  # mergekit: weights in the tensors' dtype

    @torch.no_grad()
    def prepare(self, inputs):
        if len(inputs.non_base) == 1:
            return None
        base = inputs.base_tensor.reshape(-1) if inputs.base is not None else None
        rows = (inputs.tensors[i].reshape(-1) for i in inputs.non_base)
        deltas = (row if base is None else row - base for row in rows)  # one at a time: no stacked copy
        if inputs.tensors[0].device.type != "cpu":
            return torch.norm(torch.stack(list(deltas)), dim=-1, keepdim=True)
        return torch.stack([row_reduction(torch.norm, delta) for delta in deltas]).view(-1, 1)

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        others = inputs.non_base
        if len(others) == 1:
            out.copy_(inputs.tensors[others[0]])
            return
        first = inputs.tensors[others[0]]
        weights = torch.tensor(values.of("weight", others), dtype=first.dtype, device=first.device)
        if values.shared["normalize_weights"]:
            weights = weights / weights.sum()
        eps = values.shared["eps"]
        if first.device.type != "cpu" or not _chunked_pass(out, inputs, state, weights, eps).run():
            _merge_whole(out, inputs, state, weights, eps)


def row_reduction(reduce, row: torch.Tensor) -> torch.Tensor:
    """reduce(rows, dim=-1) of one row, as torch gives it for that row of a stacked (N, M) tensor.

    On the CPU, torch reduces each row of a multi-row tensor serially (its threads split the rows), but splits
    a lone row across threads and rounds their partial sums: a two-row view of the same memory
    keeps the row's reduction serial, with no copy.
    """
    return reduce(row.expand(2, row.numel()), dim=-1)[0]


class _ChunkedPass:
    """One candidate of multislerp in four chunked passes over the inputs, bit for bit mergekit's.

    1. units u_i = (x_i - base) / (norm_i + eps) and their weighted sum, the mean, written into the
       output tensor (whole: its norm is taken whole);
    2. the mean normalised in place, and per input the products u_i * mean into one whole scratch
       vector, summed as the row of a stacked tensor: the dots;
    3. the tangent sum(w_i (u_i - dot_i * mean)) into the scratch vector, then its norm;
    4. mean * cos + tangent * sin / norm, times the mean input norm, plus the base, into the output.

    The units are recomputed in each pass (two elementwise operations) instead of being kept.
    """

    def __init__(self, out, inputs, norms, weights, eps):
        self.out, self.eps, self.weights, self.norms = out, eps, weights, norms
        others = inputs.non_base
        self.flats = [inputs.tensors[i].reshape(-1) for i in others]
        self.base = inputs.base_tensor.reshape(-1) if inputs.base is not None else None
        first = self.flats[0]
        self.dtype, self.numel = first.dtype, first.numel()
        self.scale = norms + eps
        size = min(CHUNK_ELEMENTS, max(1, self.numel))
        self.units = first.new_empty((len(others), size))
        self.products = first.new_empty((len(others), size))
        self.acc = first.new_empty(size, dtype=torch.float32) if self.dtype in HALF and len(others) > 2 else None
        direct = out.dtype == self.dtype and out.is_contiguous()
        self.mean = out.view(-1) if direct else first.new_empty(self.numel)
        self.vector = first.new_empty(self.numel)  # the products of one input, then the tangent

    def run(self) -> bool:
        """Write the candidate into `out`; False (nothing usable written) where the mean is ~0."""
        self._mean()
        mean_norm = torch.norm(self.mean)
        if mean_norm < self.eps:
            return False
        dots = self._dots(mean_norm)
        tangent_norm = self._tangent(dots)
        self._result(tangent_norm)
        return True

    def _units_of(self, start: int, stop: int) -> torch.Tensor:
        units = self.units[:, : stop - start]
        for row in range(len(self.flats)):
            self._unit(row, start, stop, units[row])
        return units

    def _unit(self, row: int, start: int, stop: int, into: torch.Tensor) -> torch.Tensor:
        x = self.flats[row][start:stop]
        if self.base is None:
            return torch.div(x, self.scale[row], out=into)
        return torch.sub(x, self.base[start:stop], out=into).div_(self.scale[row])

    def _row_sum(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.dtype in HALF:
            return half_row_sum(rows, out, self.acc)
        return torch.sum(rows, dim=0, out=out)

    def _weighted_sum(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        products = torch.mul(rows, self.weights.view(-1, 1), out=self.products[:, : rows.shape[1]])
        return self._row_sum(products, out)

    def _mean(self) -> None:
        for start, stop in chunk_ranges(self.numel):
            self._weighted_sum(self._units_of(start, stop), self.mean[start:stop])

    def _dots(self, mean_norm: torch.Tensor) -> torch.Tensor:
        dots = []
        for row in range(len(self.flats)):
            for start, stop in chunk_ranges(self.numel):
                mean = self.mean[start:stop]
                if row == 0:
                    mean.div_(mean_norm)
                unit = self._unit(row, start, stop, self.units[0, : stop - start])
                torch.mul(unit, mean, out=self.vector[start:stop])
            dots.append(row_reduction(torch.sum, self.vector))
        return torch.stack(dots).view(-1, 1)

    def _tangent(self, dots: torch.Tensor) -> torch.Tensor:
        for start, stop in chunk_ranges(self.numel):
            units = self._units_of(start, stop)
            units.sub_(dots * self.mean[start:stop])
            self._weighted_sum(units, self.vector[start:stop])
        return torch.norm(self.vector) + self.eps

    def _result(self, tangent_norm: torch.Tensor) -> None:
        cos = torch.cos(tangent_norm)
        sin_over = torch.sin(tangent_norm) / tangent_norm
        mean_input_norm = (self.norms.squeeze(-1) * self.weights).sum()
        flat_out = self.out.view(-1)
        for start, stop in chunk_ranges(self.numel):
            result = torch.mul(self.mean[start:stop], cos, out=self.units[0, : stop - start])
            result.add_(torch.mul(self.vector[start:stop], sin_over, out=self.units[1, : stop - start]))
            result.mul_(mean_input_norm)
            if self.base is not None:
                result.add_(self.base[start:stop])
            flat_out[start:stop].copy_(result)


def _chunked_pass(out, inputs, norms, weights, eps) -> _ChunkedPass:
    """The native passes where they give the eager passes' bits, else the eager ones."""
    tensors = [inputs.tensors[i] for i in inputs.non_base]
    base = inputs.base_tensor if inputs.base is not None else None
    everything = tensors + ([base] if base is not None else [])
    if not native.usable(out, everything) or (out.dtype == torch.float32 and len(tensors) > 4):
        # torch sums more than four float32 rows in another order than the pass's (see native.c)
        return _ChunkedPass(out, inputs, norms, weights, eps)
    rows = min(len(tensors), 3)  # two rows and more are summed differently

    def run(variant, probe, into):
        if base is not None:
            probe_inputs = Inputs(tuple(probe[: rows + 1]), base=0)
        else:
            probe_inputs = Inputs(tuple(probe[1: rows + 1]))
        probe_norms = MultiSlerp().prepare(probe_inputs)
        probe_weights = torch.tensor([0.5, 0.2, 0.3][:rows], dtype=into.dtype)
        probe_weights = probe_weights / probe_weights.sum()
        if variant is None:
            chosen = _ChunkedPass(into, probe_inputs, probe_norms, probe_weights, 1e-8)
        else:
            chosen = _NativePass(into, probe_inputs, probe_norms, probe_weights, 1e-8, variant)
        if not chosen.run():
            raise RuntimeError("multislerp: the probe's weighted mean is zero")

    key = ("multislerp", out.dtype, rows, base is not None)
    variant = native.verified(key, native.ONE_VARIANT, run, lambda probe, into: run(None, probe, into),
                              specials=False)
    if variant is None:
        return _ChunkedPass(out, inputs, norms, weights, eps)
    return _NativePass(out, inputs, norms, weights, eps, variant)


class _NativePass(_ChunkedPass):
    """_ChunkedPass with each chunked pass one native.multislerp call; the reductions are the same."""

    def __init__(self, out, inputs, norms, weights, eps, variant):
        super().__init__(out, inputs, norms, weights, eps)
        self.variant = variant
        self.scales = self.scale.view(-1).tolist()
        self.weight_values = self.weights.view(-1).tolist()

    def _pass(self, which: int, **values) -> None:
        out = self.out.view(-1) if which == 4 else None
        native.multislerp(self.variant, which, self.flats, self.base, self.mean, self.vector, out, self.scales,
                          self.weight_values, **values)

    def _mean(self) -> None:
        self._pass(1)

    def _dots(self, mean_norm: torch.Tensor) -> torch.Tensor:
        dots = []
        for row in range(len(self.flats)):
            self._pass(2, row=row, mean_norm=mean_norm.item())
            dots.append(row_reduction(torch.sum, self.vector))
        return torch.stack(dots).view(-1, 1)

    def _tangent(self, dots: torch.Tensor) -> torch.Tensor:
        self._pass(3, dots=dots.view(-1).tolist())
        return torch.norm(self.vector) + self.eps

    def _result(self, tangent_norm: torch.Tensor) -> None:
        cos = torch.cos(tangent_norm)
        sin_over = torch.sin(tangent_norm) / tangent_norm
        mean_input_norm = (self.norms.squeeze(-1) * self.weights).sum()
        self._pass(4, cos=cos.item(), sin_over=sin_over.item(), mean_input_norm=mean_input_norm.item())


def _merge_whole(out, inputs, norms, weights, eps) -> None:
    """mergekit's multislerp on whole stacked tensors (its zero-mean fallback included)."""
    others = inputs.non_base
    stacked = torch.stack([inputs.tensors[i] for i in others], dim=0)
    base = inputs.base_tensor if inputs.base is not None else None
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(others) != 2:
            raise MergeInputError(
                f"multislerp ({inputs.name}): the weighted sum of the unit inputs is zero (antipodal inputs "
                "whose weights balance out); change the weights")
        result = (flat[0] * weights[0] + flat[1] * weights[1]).view(out.shape)
        out.copy_(result if base is None else result + base)
        return
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    del units
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    del tangents
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = result * (norms.squeeze(-1) * weights).sum()
    result = result.view(out.shape)
    out.copy_(result if base is None else result + base)
