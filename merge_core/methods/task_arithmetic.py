"""The task-arithmetic family: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

Each input's delta from the base (taken in the merge dtype) is sparsified, weighted, optionally
sign-elected (TIES), summed, normalised and scaled by lambda, in mergekit's operations and dtypes.
"""

from __future__ import annotations

import numpy as np
import torch

from merge_core import native
from merge_core.methods import draws, sparsify
from merge_core.methods.base import Contract, Inputs, InputValueError, MergeMethod, Param, Values
from merge_core.methods.chunks import CHUNK_ELEMENTS, chunk_ranges, half_row_sum
from merge_core.methods.sparsify import HALF


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

    def check(self, values, where, dtype) -> None:
        if self.sparsification == "random":  # mergekit's Bernoulli draw fails on a negative probability
            for position, per_input in enumerate(values.per_input):
                if per_input.get("density") is not None and per_input["density"] < 0:
                    raise InputValueError(position, f"density {per_input['density']:g} is negative; DARE keeps "
                                          "each element with probability density, so give a value from 0 to 1")
        if self.sparsification != "della":
            return
        for position, per_input in enumerate(values.per_input):
            density, epsilon = per_input.get("density"), per_input.get("epsilon")
            if density is None or not 0 < density < 1:
                continue  # density >= 1 keeps everything, <= 0 drops everything: epsilon unused
            if density + epsilon >= 1 or density - epsilon <= 0:
                raise InputValueError(position, f"density {density:g} +/- epsilon {epsilon:g} must stay inside (0, 1)")

    def prepare(self, inputs):
        """Per input: magnitude counts of its task vector (half types), exact thresholds with no sort
        per candidate; for DARE/DELLA its L1 norm and (DELLA) its per-row ranks."""
        if self.sparsification is None or inputs.base is None:
            return None
        base = inputs.base_tensor
        if self.sparsification in ("random", "della"):
            if base.device.type != "cpu":
                return None
            della = self.sparsification == "della"
            return {i: sparsify.draw_state(inputs.tensors[i], base, della) for i in inputs.non_base}
        return {i: sparsify.magnitude_counts(inputs.tensors[i], base) for i in inputs.non_base}

    def _cut(self, cum, n: int, p: dict) -> sparsify.MagnitudeCut | None:
        if self.sparsification == "magnitude":
            return sparsify.MagnitudeCut.top(cum, n, p["density"])
        return sparsify.MagnitudeCut.positions(cum, n, p["density"], p["gamma"])

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
        self._merge(out, inputs, state, values, rng, allow_native=True)

    def _merge(self, out, inputs, state, values, rng, allow_native: bool) -> None:
        base = inputs.base_tensor
        others = inputs.non_base
        if not others:
            out.copy_(base)
            return
        shared = values.shared
        # Sparsification needs whole tensors (thresholds, masks, L1 norms): magnitude cuts come from
        # per-study counts and DARE/DELLA masks are drawn whole first (in mergekit's RNG order);
        # other cases make the sparse deltas whole. Everything after is elementwise across the
        # inputs and runs in chunks of the same operations in the same dtypes.
        sparse = cuts = drawn = None
        fast = base.dtype in HALF and base.device.type == "cpu"
        if fast and self.sparsification in ("magnitude", "magnitude_outliers") and not shared["rescale"] \
                and state and all(state.get(i) is not None for i in others):
            cuts = [self._cut(state[i], base.numel(), values.per_input[i]) for i in others]
        elif self.sparsification in ("random", "della") and draws.drawable(rng, base) and state \
                and all(self._drawn_here(state[i], values.per_input[i]) for i in others):
            drawn = self._draw(inputs, state, values, rng)
        elif self.sparsification:
            sparse = [self._sparsify(inputs.tensors[i] - base, values.per_input[i], shared["rescale"], rng,
                                     state.get(i) if state else None).reshape(-1) for i in others]
        weights = torch.tensor(values.of("weight", others), dtype=base.dtype, device=base.device).reshape(-1, 1)
        if not self.consensus:
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        plain = sparse is None and drawn is None and (cuts is None or all(cut is None for cut in cuts))
        if allow_native and plain and fast and not self.consensus:
            variant = self._native_variant(out, inputs)
            if variant is not None:
                native.delta_sum(variant, out, [inputs.tensors[i] for i in others], base, weights.view(-1).tolist(),
                                 divisor.item() if shared["normalize"] else None,
                                 shared["lambda"] if shared["lambda"] != 1 else None)
                return
        mask_dtype = torch.int8 if shared["int8_mask"] else base.dtype
        flat_base, flat_out = base.reshape(-1), out.view(-1)
        flats = [inputs.tensors[i].reshape(-1) for i in others]
        same = out.dtype == base.dtype
        size = min(CHUNK_ELEMENTS, max(1, flat_base.numel()))
        buffer = base.new_empty((len(others), size))
        draw_work = base.new_empty(size, dtype=sparsify.random_dtype(base)) if drawn else None
        # Half types: mergekit's sums over the inputs and its boolean masks are slow there (a sum
        # over dim 0 costs 20x an add); the same values come from adds and sign arithmetic.
        scratch = _Scratch(len(others), size, base.dtype, base.device) if fast else None
        for start, stop in chunk_ranges(flat_base.numel()):
            b = flat_base[start:stop]
            deltas = buffer[:, : stop - start]
            for row, x in enumerate(flats):
                if sparse is None:
                    torch.sub(x[start:stop], b, out=deltas[row])
                    if cuts is not None and cuts[row] is not None:
                        k = stop - start
                        cuts[row].apply(deltas[row], scratch.bits[:k], scratch.mask[:k], scratch.flags[:k])
                    if drawn is not None and drawn[row] is not None:
                        drawn[row].apply(deltas[row], start, stop, draw_work[: stop - start])
                else:
                    deltas[row].copy_(sparse[row][start:stop])
            deltas.mul_(weights)
            if fast:
                mixed, chunk_divisor = scratch.mix(deltas, weights, self.consensus)
                if not self.consensus:
                    chunk_divisor = divisor
            elif self.consensus:
                mask = _sign_consensus(deltas, mask_dtype)
                mixed = (deltas * mask).sum(dim=0)
                chunk_divisor = (weights * mask).sum(dim=0)
                chunk_divisor[chunk_divisor == 0] = 1
            else:
                mixed = deltas.sum(dim=0)
                chunk_divisor = divisor
            if shared["normalize"]:
                mixed /= chunk_divisor
            if shared["lambda"] != 1:
                mixed *= shared["lambda"]
            if same:  # base + mixed (addition commutes exactly), written straight into the output
                torch.add(mixed, b, out=flat_out[start:stop])
            else:
                flat_out[start:stop].copy_(mixed.add_(b))

    def _native_variant(self, out, inputs):
        """The verified native pass for this plain weighted sum of deltas (native.py), or None."""
        tensors = list(inputs.tensors)
        if not native.usable(out, tensors):
            return None
        rows = min(len(inputs.non_base), 3)  # one, two and more rows are summed differently

        def probe_call(variant, probe, into):
            weights = [0.5, -1.25, 0.8][:rows]
            per_input = ({},) + tuple({"weight": w, "density": 1.0} for w in weights)
            values = Values({"int8_mask": False, "normalize": True, "rescale": False, "lambda": 0.7}, per_input)
            probe_inputs = Inputs(tuple(probe[: rows + 1]), base=0)
            if variant is None:  # the plain pass is the same for every method of the family
                TaskArithmetic()._merge(into, probe_inputs, None, values, None, allow_native=False)
            else:
                # the weights and divisor as the eager pass rounds them
                rounded = torch.tensor(weights, dtype=into.dtype)
                native.delta_sum(variant, into, list(probe[1: rows + 1]), probe[0], rounded.tolist(),
                                 rounded.sum().item(), 0.7)

        return native.verified(("task_arithmetic", out.dtype, rows), native.ONE_VARIANT,
                               probe_call, lambda probe, into: probe_call(None, probe, into))

    @staticmethod
    def _drawn_here(state, p: dict) -> bool:
        """Whether this input's mask is drawn chunk by chunk (else as mergekit draws it, whole)."""
        return state is not None and p["density"] >= 0

    def _draw(self, inputs, state, values, rng) -> list[sparsify.DrawnMask | None]:
        """Each input's DARE/DELLA mask, drawn in mergekit's order (None: the input is kept whole)."""
        base = inputs.base_tensor.reshape(-1)
        rescale = values.shared["rescale"]
        magnitudes = base.new_empty(base.numel(), dtype=sparsify.random_dtype(base)) if rescale else None
        masks = []
        for i in inputs.non_base:
            p = values.per_input[i]
            if p["density"] >= 1:
                masks.append(None)
                continue
            if self.sparsification == "della" and p["density"] <= 0:
                masks.append(sparsify.DrawnMask(None, None))
                continue
            thresholds = self._thresholds(inputs.tensors[i], state[i], p)
            x = inputs.tensors[i].reshape(-1)
            masks.append(sparsify.DrawnMask.draw(x, base, thresholds, rng, rescale, state[i].l1, magnitudes))
        return masks

    def _thresholds(self, tensor: torch.Tensor, state: sparsify.DrawState, p: dict):
        """thresholds(start, stop) of one input's draw: DARE's constant, or DELLA's by rank."""
        dtype = sparsify.random_dtype(tensor)
        if self.sparsification == "random":
            # mergekit's probability tensor is torch.full_like(..., density) in the draw's dtype
            constant = draws.keep_thresholds(torch.tensor([p["density"]], dtype=dtype))[0]
            return lambda start, stop: constant
        table = sparsify.della_thresholds(tensor.shape[-1], p["density"], p["epsilon"], dtype)
        ranks = state.ranks
        return lambda start, stop: np.take(table, ranks[start:stop])


class _Scratch:
    """Per-merge buffers for the half-type chunk pass, and that pass's exact shortcuts.

    mergekit's `sum(dim=0)` on a half tensor is `half_row_sum` (chunks.py). Its sign election
    `sign(d) == majority` and product with the boolean mask give the same values as
    clamp(sign(d) * majority, 0) * d, where majority is sign(sign(sum) + 0.5) (+1 at a zero sum, as
    `sum >= 0`): only the sign of a zero product can differ, and the sum that follows starts from
    +0, so no zero's sign reaches the result. int8_mask changes only the mask's dtype, not these
    values.
    """

    def __init__(self, rows: int, size: int, dtype: torch.dtype, device: torch.device):
        self.total = torch.empty(size, dtype=dtype, device=device)
        self.divisor = torch.empty(size, dtype=dtype, device=device)
        self.zeros = torch.empty(size, dtype=dtype, device=device)  # 1 where the divisor is 0
        self.agree = torch.empty((rows, size), dtype=dtype, device=device)
        self.acc = torch.empty(size, dtype=torch.float32, device=device) if rows > 2 else None
        self.bits = torch.empty(size, dtype=torch.int16, device=device)  # magnitude selection scratch
        self.mask = torch.empty(size, dtype=torch.int16, device=device)
        self.flags = torch.empty(size, dtype=torch.bool, device=device)

    def row_sum(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """rows.sum(dim=0) for a half tensor, bit for bit, written into `out`."""
        return half_row_sum(rows, out, self.acc)

    def mix(self, deltas: torch.Tensor, weights: torch.Tensor, consensus: bool):
        """(mixed delta, divisor or None) of one chunk of weighted deltas; `deltas` is overwritten."""
        size = deltas.shape[1]
        total = self.row_sum(deltas, self.total[:size])
        if not consensus:
            return total, None
        majority = total.sign_().add_(0.5).sign_()  # -1 where the sum is < 0, else +1
        agree = torch.sign(deltas, out=self.agree[:, :size]).mul_(majority).clamp_min_(0)
        mixed = self.row_sum(deltas.mul_(agree), self.total[:size])
        divisor = self.row_sum(agree.mul_(weights), self.divisor[:size])
        # + (divisor == 0) is masked_fill_(divisor == 0, 1) bit for bit (x + 0 = x, +-0 + 1 = 1), 5x faster
        divisor.add_(torch.eq(divisor, 0, out=self.zeros[:size]))
        return mixed, divisor


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
