"""The task-arithmetic family: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

Each input's delta from the base (taken in the merge dtype) is sparsified, weighted, optionally
sign-elected (TIES), summed, normalised and scaled by lambda, in mergekit's operations and dtypes.
"""

from __future__ import annotations

import torch

from merge_core.methods import sparsify
from merge_core.methods.base import Contract, MergeMethod, Param
from merge_core.methods.chunks import CHUNK_ELEMENTS, chunk_ranges


class TaskArithmetic(MergeMethod):
    """task_arithmetic; subclasses choose sparsification, sign consensus and defaults."""

    name = "task_arithmetic"
    contract = Contract(base="required")
    sparsification: str | None = None  # magnitude, random, magnitude_outliers, della
    consensus = False
    default_normalize = False
    default_rescale = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.params = cls._params()
        cls.randomised = cls.sparsification in ("random", "della")

    @classmethod
    def _params(cls) -> tuple[Param, ...]:
        params = [
            Param("int8_mask", bool, "global", False),
            Param("normalize", bool, "global", cls.default_normalize),
            Param("rescale", bool, "global", cls.default_rescale),
            Param("lambda", float, "global", 1.0),
            Param("weight", float, "per_non_base"),
            Param("density", float, "per_non_base", 1.0),
        ]
        if cls.sparsification == "magnitude_outliers":
            params.append(Param("gamma", float, "per_non_base", 0.01))
        if cls.sparsification == "della":
            params.append(Param("epsilon", float, "per_non_base", 0.15))
        return tuple(params)

    def check(self, values, where) -> None:
        if self.sparsification != "della":
            return
        for per_input in values.per_input:
            density, epsilon = per_input.get("density"), per_input.get("epsilon")
            if density is None or not 0 < density < 1:
                continue  # density >= 1 keeps everything, <= 0 drops everything: epsilon unused
            if density + epsilon >= 1 or density - epsilon <= 0:
                raise ValueError(f"density {density:g} +/- epsilon {epsilon:g} must stay inside (0, 1)")

    def prepare(self, inputs):
        """Magnitude counts of each task vector (half types): exact thresholds with no sort per candidate."""
        if self.sparsification not in ("magnitude", "magnitude_outliers") or inputs.base is None:
            return None
        base = inputs.base_tensor
        return {i: sparsify.magnitude_counts(inputs.tensors[i] - base) for i in inputs.non_base}

    def _sparsify(self, delta: torch.Tensor, p: dict, rescale: bool, rng, cum=None) -> torch.Tensor:
        kind = self.sparsification
        if kind == "magnitude":
            return sparsify.magnitude(delta, p["density"], rescale, cum)
        if kind == "magnitude_outliers":
            return sparsify.magnitude_outliers(delta, p["density"], p["gamma"], rescale, cum)
        if kind == "random":
            return sparsify.bernoulli(delta, p["density"], rescale, rng)
        return sparsify.della_magprune(delta, p["density"], p["epsilon"], rescale, rng)

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        base = inputs.base_tensor
        others = inputs.non_base
        if not others:
            out.copy_(base)
            return
        shared = values.shared
        # Sparsification needs whole tensors (thresholds, masks, L1 norms), so those deltas are
        # made whole; everything after is elementwise across the inputs and runs in chunks of the
        # same operations in the same dtypes, with no full-size temporaries.
        sparse = None
        if self.sparsification:
            sparse = [self._sparsify(inputs.tensors[i] - base, values.per_input[i], shared["rescale"], rng,
                                     state.get(i) if state else None).reshape(-1) for i in others]
        weights = torch.tensor(values.of("weight", others), dtype=base.dtype, device=base.device).reshape(-1, 1)
        mask_dtype = torch.int8 if shared["int8_mask"] else base.dtype
        flat_base, flat_out = base.reshape(-1), out.view(-1)
        flats = [inputs.tensors[i].reshape(-1) for i in others]
        same = out.dtype == base.dtype
        size = min(CHUNK_ELEMENTS, max(1, flat_base.numel()))
        buffer = base.new_empty((len(others), size))
        for start, stop in chunk_ranges(flat_base.numel()):
            b = flat_base[start:stop]
            deltas = buffer[:, : stop - start]
            for row, x in enumerate(flats):
                if sparse is None:
                    torch.sub(x[start:stop], b, out=deltas[row])
                else:
                    deltas[row].copy_(sparse[row][start:stop])
            deltas.mul_(weights)
            if self.consensus:
                mask = _sign_consensus(deltas, mask_dtype)
                mixed = (deltas * mask).sum(dim=0)
                divisor = (weights * mask).sum(dim=0)
                divisor[divisor == 0] = 1
            else:
                mixed = deltas.sum(dim=0)
                divisor = weights.sum(dim=0)
                divisor[divisor.abs() < 1e-8] = 1
            if shared["normalize"]:
                mixed /= divisor
            if shared["lambda"] != 1:
                mixed *= shared["lambda"]
            mixed += b  # base + mixed: addition commutes exactly
            flat_out[start:stop].copy_(mixed if same else mixed.to(base.dtype))


def _sign_consensus(deltas: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """TIES sign election by total mass: True where a delta agrees with the elected sign."""
    sign = deltas.sign().to(mask_dtype)
    majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


class Ties(TaskArithmetic):
    name = "ties"
    sparsification = "magnitude"
    consensus = True
    default_normalize = True


class DareTies(TaskArithmetic):
    name = "dare_ties"
    sparsification = "random"
    consensus = True
    default_rescale = True


class DareLinear(TaskArithmetic):
    name = "dare_linear"
    sparsification = "random"
    default_rescale = True


class Breadcrumbs(TaskArithmetic):
    name = "breadcrumbs"
    sparsification = "magnitude_outliers"


class BreadcrumbsTies(TaskArithmetic):
    name = "breadcrumbs_ties"
    sparsification = "magnitude_outliers"
    consensus = True


class Della(TaskArithmetic):
    name = "della"
    sparsification = "della"
    consensus = True
    default_normalize = True
    default_rescale = True


class DellaLinear(TaskArithmetic):
    name = "della_linear"
    sparsification = "della"
    default_rescale = True


TaskArithmetic.params = TaskArithmetic._params()
