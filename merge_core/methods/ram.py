"""ram and ramplus_tl: Reinforced Agent Merging. Deltas that only one model moves are kept whole,
deltas that several move are averaged over the models that move them (ramplus_tl also scales the
unique ones up by how much each model overlaps with the others, per tensor)."""

from __future__ import annotations

import torch

from merge_core.methods.base import Contract, MergeMethod, Param
from merge_core.methods.chunks import BIT_TYPES, CHUNK_ELEMENTS, chunk_ranges, half_row_sum
from merge_core.methods.sparsify import HALF


class Ram(MergeMethod):
    """mergekit's ram: a delta counts as moved where |delta| > epsilon.

    Elementwise given epsilon: a candidate runs chunk by chunk (`_Chunks`) with the values of
    mergekit's operations; `prepare` only checks that every delta is finite (mergekit's masks turn
    an infinite delta into NaN: such tensors run mergekit's whole-tensor code).
    """

    name = "ram"
    params = (Param("epsilon", float, "global", 1e-5),)
    contract = Contract(base="required")

    def prepare(self, inputs):
        return _chunkable(inputs)

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        base = inputs.base_tensor
        if not inputs.non_base:
            out.copy_(base)
            return
        epsilon = values.shared["epsilon"]
        if not state:
            _ram_whole(out, inputs, epsilon)
            return
        chunks = _Chunks(inputs, epsilon)
        flat_out = out.view(-1)
        same = out.dtype == base.dtype
        for start, stop in chunk_ranges(chunks.base.numel()):
            deltas, moved = chunks.masked(start, stop)
            merged = chunks.row_sum(chunks.divide(deltas, moved))
            if same:  # base + merged (addition commutes exactly), written straight into the output
                torch.add(merged, chunks.base[start:stop], out=flat_out[start:stop])
            else:
                flat_out[start:stop].copy_(merged.add_(chunks.base[start:stop]))


class RamPlusTl(MergeMethod):
    """mergekit's ramplus_tl: unique deltas of model i scaled by 1 + r * clamp(rho_i, 0, alpha),
    rho_i = (its overlapping moved count) / (its unique moved count) within this tensor.

    Two chunked passes: the per-model counts, then the merge (ram's, with the unique deltas
    scaled: where one model moves an element, the sum is that model's delta).
    """

    float32_result = True  # a float32 mask/scale times half inputs: mergekit writes float32
    name = "ramplus_tl"
    params = (Param("r", float, "global", 0.1), Param("alpha", float, "global", 0.2),
              Param("epsilon", float, "global", 1e-5))
    contract = Contract(base="required")

    def prepare(self, inputs):
        return _chunkable(inputs)

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        base = inputs.base_tensor
        if not inputs.non_base:
            out.copy_(base)
            return
        r, alpha, epsilon = values.shared["r"], values.shared["alpha"], values.shared["epsilon"]
        if not state:
            _ramplus_whole(out, inputs, r, alpha, epsilon)
            return
        chunks = _Chunks(inputs, epsilon)
        n = len(chunks.rows)
        moved_counts, unique_counts = chunks.counts()
        # mergekit's (moved & overlap) count: a moved element is unique or overlapping
        shared_counts = moved_counts - unique_counts
        rho = shared_counts / unique_counts.clamp(min=epsilon)
        scale = 1 + r * rho.clamp(min=0, max=alpha)
        result = self.result_dtype(base.dtype)
        if not bool(torch.isfinite(scale).all()):  # mergekit's 0 * inf: whole-tensor NaNs
            _ramplus_whole(out, inputs, r, alpha, epsilon)
            return
        # where one model moves an element the merged delta is that delta times the model's scale,
        # else the plain sum (times 1): one scale per element, built on the result's bits
        bits = BIT_TYPES[result]
        one = torch.ones((), dtype=result).view(bits)
        toggles = (scale.to(result).view(bits) ^ one).reshape(n, 1)
        # a product that rounds to zero keeps its sign where mergekit's sum returns +0
        normalise = bool((scale < 1).any())
        size = chunks.deltas.shape[1]
        widened = torch.empty((n, size), dtype=bits, device=base.device)
        factor_bits = torch.empty(size, dtype=bits, device=base.device)
        terms = torch.empty((n, size), dtype=result, device=base.device)
        merged_all = torch.empty(size, dtype=result, device=base.device)
        base_part = torch.empty(size, dtype=result, device=base.device)
        flat_out = out.view(-1)
        same = out.dtype == result
        for start, stop in chunk_ranges(chunks.base.numel()):
            k = stop - start
            deltas, moved = chunks.masked(start, stop)
            unique = widened[:, :k].copy_(chunks.unique(moved)).bitwise_and_(toggles)
            factor = factor_bits[:k].copy_(unique[0])
            for row in unique[1:]:
                factor.bitwise_or_(row)
            factor.bitwise_xor_(one)
            shared = terms[:, :k].copy_(chunks.divide(deltas, moved))
            merged = chunks.row_sum(shared, merged_all[:k]).mul_(factor.view(result))
            if normalise:
                merged.add_(0.0)
            b = chunks.base[start:stop]
            if b.dtype != result:
                b = base_part[:k].copy_(b)
            if same:
                torch.add(merged, b, out=flat_out[start:stop])
            else:
                flat_out[start:stop].copy_(merged.add_(b))


def _chunkable(inputs) -> bool:
    """Whether a candidate can run chunk by chunk: a CPU float type whose every delta is finite."""
    base = inputs.base_tensor if inputs.base is not None else None
    if base is None or not inputs.non_base or base.device.type != "cpu" or base.dtype not in BIT_TYPES \
            or base.numel() == 0 or any(inputs.tensors[i].dtype != base.dtype for i in inputs.non_base):
        return False
    bits = BIT_TYPES[base.dtype]
    infinite = torch.tensor(float("inf"), dtype=base.dtype).view(bits)
    flat = base.reshape(-1)
    delta = torch.empty(min(CHUNK_ELEMENTS, flat.numel()), dtype=base.dtype)
    for i in inputs.non_base:
        x = inputs.tensors[i].reshape(-1)
        for start, stop in chunk_ranges(flat.numel()):
            d = torch.sub(x[start:stop], flat[start:stop], out=delta[: stop - start]).view(bits)
            if bool(d.bitwise_and_(_magnitude_mask(bits)).max() >= infinite):
                return False
    return True


def _magnitude_mask(bits: torch.dtype) -> int:
    """The bits of |x|: all but the sign bit."""
    return torch.iinfo(bits).max


def _threshold(dtype: torch.dtype, epsilon: float) -> int:
    """The largest bit pattern of |delta| that mergekit's `|delta| > epsilon` leaves unmoved.

    torch compares in the tensor's dtype (epsilon rounded to it); |x| > e is bits(|x|) > bits(e)
    for finite x and e >= 0. Half types check every finite pattern with the comparison itself.
    """
    bits = BIT_TYPES[dtype]
    if dtype in HALF:
        infinite = int(torch.tensor(float("inf"), dtype=dtype).view(bits))
        patterns = torch.arange(infinite + 1, dtype=bits).view(dtype)
        return infinite - int((patterns > epsilon).sum())
    e = torch.tensor(epsilon, dtype=dtype)
    if torch.isnan(e):
        return torch.iinfo(bits).max
    if e < 0:
        return -1
    return int(e.abs().view(bits))


class _Chunks:
    """Per-merge scratch and the chunk steps of ram and ramplus_tl, in mergekit's values.

    For a chunk: each model's delta (in the working dtype, as mergekit takes it), its moved mask
    from the delta's bits (-1 where |delta| > epsilon, else 0), and the delta zeroed where it did
    not move (mergekit's `delta * mask`; a zero's sign never reaches a sum that starts from +0).
    """

    def __init__(self, inputs, epsilon: float):
        base = inputs.base_tensor
        self.base = base.reshape(-1)
        self.rows = [inputs.tensors[i].reshape(-1) for i in inputs.non_base]
        n, size = len(self.rows), min(CHUNK_ELEMENTS, self.base.numel())
        self.bits_type = BIT_TYPES[base.dtype]
        self.shift = torch.iinfo(self.bits_type).bits - 1
        self.threshold = torch.tensor(_threshold(base.dtype, epsilon), dtype=self.bits_type)
        self.deltas = base.new_empty((n, size))
        self.moved = torch.empty((n, size), dtype=self.bits_type)
        self.alone = torch.empty((n, size), dtype=self.bits_type)
        self.count = torch.empty(size, dtype=self.bits_type)
        self.count_values = torch.empty(size, dtype=base.dtype)
        self.total = torch.empty(size, dtype=base.dtype)
        self.acc = torch.empty(size, dtype=torch.float32) if base.dtype in HALF and n > 2 else None
        self.one = torch.ones((), dtype=base.dtype).view(self.bits_type)
        # 1 - 0.5 in the bits: the exponent's lowest bit
        self.half_step = int(self.one) - int(torch.tensor(0.5, dtype=base.dtype).view(self.bits_type))

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per model over the tensor: how many elements it moves, and how many only it moves (int64)."""
        n, size = self.moved.shape
        # elementwise tallies (a row sum per chunk costs 15x an add), summed when they could overflow
        tallies = torch.zeros((2, n, size), dtype=self.bits_type)
        totals = torch.zeros((2, n), dtype=torch.int64)
        limit = torch.iinfo(self.bits_type).max
        for i, (start, stop) in enumerate(chunk_ranges(self.base.numel())):
            k = stop - start
            _, moved = self.masked(start, stop, zero=False)
            tallies[0, :, :k].add_(moved)
            tallies[1, :, :k].add_(self.unique(moved))
            if (i + 1) % limit == 0:
                totals -= tallies.sum(dim=2)
                tallies.zero_()
        totals -= tallies.sum(dim=2)
        return totals[0], totals[1]

    def masked(self, start: int, stop: int, zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(deltas, moved masks) of elements start:stop, one row per model; the deltas zeroed where
        unmoved unless `zero` is false."""
        k = stop - start
        deltas, moved = self.deltas[:, :k], self.moved[:, :k]
        base = self.base[start:stop]
        for row, x in enumerate(self.rows):
            torch.sub(x[start:stop], base, out=deltas[row])
        bits = deltas.view(self.bits_type)
        torch.bitwise_and(bits, _magnitude_mask(self.bits_type), out=moved)
        torch.sub(self.threshold, moved, out=moved).bitwise_right_shift_(self.shift)
        if zero:
            bits.bitwise_and_(moved)
        return deltas, moved

    def divide(self, deltas: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        """The deltas divided by how many models moved their element (at least 1), in place.

        mergekit divides the overlapping deltas by the count (`/ counts.clamp(min=1)`, in the
        working dtype) and keeps the unique ones: x / 1 = x. With two models the count is 1 or 2
        and a product by 1 or 0.5 equals the quotient.
        """
        n, k = deltas.shape
        if n == 1:
            return deltas
        if n == 2:
            both = torch.bitwise_and(moved[0], moved[1], out=self.count[:k]).bitwise_and_(self.half_step)
            factor = torch.sub(self.one, both, out=both).view(deltas.dtype)  # 1, or 0.5 where both moved
            return deltas.mul_(factor)
        ones = moved.bitwise_and_(self.one).view(deltas.dtype)  # 1.0 where moved, else +0; overwrites `moved`
        count = torch.add(ones[0], ones[1], out=self.count_values[:k])
        for row in ones[2:]:
            count.add_(row)
        return deltas.div_(count.clamp_min_(1))

    def row_sum(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """rows.sum(dim=0), bit for bit torch's, into `out` (default: scratch of the working dtype)."""
        out = self.total[: rows.shape[1]] if out is None else out
        if rows.dtype in HALF or len(rows) <= 2:  # one or two rows: (+0 + a) + b in any float type
            return half_row_sum(rows, out, self.acc)
        return torch.sum(rows, dim=0, out=out)

    def unique(self, moved: torch.Tensor) -> torch.Tensor:
        """The moved masks where only one model moved (-1), else 0, into scratch."""
        n, k = moved.shape
        if n == 1:
            return self.alone[:, :k].copy_(moved)
        if n == 2:
            alone = torch.bitwise_xor(moved[0], moved[1], out=self.count[:k])
        else:  # -count + 1 is 0 where exactly one moved: y | -y has the sign bit set unless y == 0
            y = torch.add(moved[0], moved[1], out=self.count[:k])
            for row in moved[2:]:
                y.add_(row)
            y.add_(1)
            alone = y.bitwise_or_(-y).bitwise_right_shift_(self.shift).bitwise_not_()
        return torch.bitwise_and(moved, alone, out=self.alone[:, :k])


def _masks(inputs, epsilon: float):
    """Flattened deltas (one row per model), where each moved, how many moved each element, and
    where several / exactly one did."""
    base = inputs.base_tensor
    flat = torch.stack([inputs.tensors[i] - base for i in inputs.non_base], dim=0).view(len(inputs.non_base), -1)
    moved = flat.abs() > epsilon
    counts = moved.sum(dim=0, keepdim=True)
    return flat, moved, counts, counts > 1, counts == 1


def _ram_whole(out: torch.Tensor, inputs, epsilon: float) -> None:
    """mergekit's ram on whole tensors."""
    base = inputs.base_tensor
    flat, moved, counts, overlap, unique = _masks(inputs, epsilon)
    kept = flat * moved
    merged = ((kept * unique) + (kept * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    out.copy_(base + merged.reshape_as(base))


def _ramplus_whole(out: torch.Tensor, inputs, r: float, alpha: float, epsilon: float) -> None:
    """mergekit's ramplus_tl on whole tensors."""
    base = inputs.base_tensor
    flat, moved, counts, overlap, unique = _masks(inputs, epsilon)
    shared_counts = (moved & overlap).sum(dim=1)
    unique_counts = (moved & unique).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    scale = 1 + r * rho.clamp(min=0, max=alpha)
    kept = flat * moved
    merged = ((kept * unique * scale.unsqueeze(-1)) + (kept * overlap / counts.clamp(min=1))).sum(
        dim=0, keepdim=True)
    out.copy_(base + merged.reshape_as(base))
