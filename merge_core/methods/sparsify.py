"""Sparsification of task vectors as mergekit does it: magnitude, outliers, DARE and DELLA masks.

Ties at a magnitude threshold: mergekit selects with `torch.argsort`, which on the CPU is not
stable, so which of several equal magnitudes it keeps is an accident of the sort. We keep the
lowest indices among equal magnitudes (a stable order), computed in O(n) with `kthvalue`
instead of a sort. Both keep the same number of elements of the tied magnitude; away from the
threshold the masks are identical (tests/merge_core/test_methods_oracle.py shows both facts).
DELLA needs every element's rank, so it sorts anyway: it makes mergekit's exact argsort call and
matches it at ties too. The ranks depend on the inputs only: a study sorts once (`draw_state`,
int16 ranks kept per input) and each candidate draws its DARE/DELLA masks with `DrawnMask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from merge_core.methods.chunks import chunk_ranges
from merge_core.methods.draws import GeneratorStream, keep_thresholds


def stable_positions_mask(w: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Mask of the elements whose position in a stable ascending sort of 1-D `w` is in [lo, hi)."""
    n = w.numel()
    lo, hi = max(0, lo), min(n, hi)
    if hi <= lo:
        return torch.zeros(n, dtype=torch.bool, device=w.device)
    low_value = torch.kthvalue(w, lo + 1).values
    high_value = torch.kthvalue(w, hi).values
    mask = (w > low_value) & (w < high_value)
    for boundary in {float(low_value), float(high_value)}:
        equal = w == boundary
        before = int((w < boundary).sum())
        position = before + torch.cumsum(equal, 0) - 1  # position of each equal element in the stable order
        mask |= equal & (position >= lo) & (position < hi)
    return mask


HALF = (torch.float16, torch.bfloat16)
COUNT_CHUNK = 256 * 1024  # small slices: glibc keeps freed blocks under 32 MB in the heap


def magnitude_counts(tensor: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor | None:
    """Cumulative counts of a half tensor's magnitudes (of tensor - base when given) by bit pattern
    (int32, 32768 bins), or None.

    |delta| of a float16/bfloat16 tensor has at most 32768 values, ordered as its bits without the
    sign; their counts give any magnitude threshold exactly, with no selection pass per candidate.
    The delta is taken slice by slice (elementwise: the same values), so no whole-size copy is made.
    """
    if tensor.dtype not in HALF or tensor.numel() == 0 or tensor.numel() >= 2**31:
        return None
    flat = tensor.reshape(-1)
    flat_base = base.reshape(-1) if base is not None else None
    counts = torch.zeros(32768, dtype=torch.int64, device=tensor.device)
    for start in range(0, flat.numel(), COUNT_CHUNK):
        piece = flat[start:start + COUNT_CHUNK]
        if flat_base is not None:
            piece = piece - flat_base[start:start + COUNT_CHUNK]
        counts += torch.bincount(_magnitude_bits(piece), minlength=32768)  # int16 bits, no int64 copy
    return counts.cumsum(0).to(torch.int32)


def _magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    return delta.reshape(-1).view(torch.int16) & 0x7FFF


def _positions_from_counts(bits: torch.Tensor, cum: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """stable_positions_mask for magnitude bits, using the cumulative counts of the bits."""
    n = bits.numel()
    lo, hi = max(0, lo), min(n, hi)
    if hi <= lo:
        return torch.zeros(n, dtype=torch.bool, device=bits.device)
    low = int(torch.searchsorted(cum, lo, right=True))  # the value at sorted position lo
    high = int(torch.searchsorted(cum, hi - 1, right=True))  # ... at position hi - 1
    mask = (bits > low) & (bits < high)
    for value in {low, high}:
        before = int(cum[value - 1]) if value > 0 else 0
        count = int(cum[value]) - before
        first, last = max(lo - before, 0), min(hi - before, count)  # ranks among equals that fall in range
        if last <= first:
            continue
        if first == 0 and last == count:
            mask |= bits == value
        else:  # a tie group cut by the threshold: lowest indices first (a stable order)
            mask[(bits == value).nonzero().flatten()[first:last]] = True
    return mask


def rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """tensor * mask, scaled to the tensor's L1 norm when `rescale` (mergekit's RescaleNorm.l1)."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude(delta: torch.Tensor, density: float, rescale: bool, cum: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the `density` share of largest magnitudes (at least one element)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    if cum is not None:
        # descending positions [0, k) are ascending positions [n - k, n) with ties taken from the
        # top: the tie group keeps its lowest indices, as in the kthvalue path below.
        keep = _top_from_counts(_magnitude_bits(delta), cum, k)
        return rescaled(delta, keep.to(delta.dtype).reshape_as(delta), rescale)
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    keep = stable_positions_mask(-w, 0, k)  # descending order, ties by index
    return rescaled(delta, keep.to(delta.dtype).reshape_as(delta), rescale)


def _top_from_counts(bits: torch.Tensor, cum: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest magnitudes; among equals at the threshold, the lowest indices."""
    n = bits.numel()
    value = int(torch.searchsorted(cum, n - k, right=True))  # magnitude at descending position k - 1
    above = n - int(cum[value])
    mask = bits > value
    take = k - above
    count = int(cum[value]) - (int(cum[value - 1]) if value > 0 else 0)
    if take >= count:
        mask |= bits == value
    elif take > 0:
        mask[(bits == value).nonzero().flatten()[:take]] = True
    return mask


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool,
                       cum: torch.Tensor | None = None) -> torch.Tensor:
    """Drop the `gamma` share of largest magnitudes, then the smallest, keeping `density`."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep_n, top_n = int(density * n), int(gamma * n)
    bottom_n = max(0, n - keep_n - top_n)
    if cum is not None:
        keep = _positions_from_counts(_magnitude_bits(delta), cum, bottom_n, bottom_n + keep_n)
        return rescaled(delta, keep.to(delta.dtype).reshape_as(delta), rescale)
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    keep = stable_positions_mask(w, bottom_n, bottom_n + keep_n)
    return rescaled(delta, keep.to(delta.dtype).reshape_as(delta), rescale)


class MagnitudeCut:
    """The magnitude selection of one half-type task vector, applied chunk by chunk in index order.

    Keeps the same elements as `magnitude` / `magnitude_outliers` with per-study counts (the
    values strictly between two magnitude bounds, and at each bound the tie group's elements whose
    rank among equals, in index order, falls in [first, last)), without whole-tensor temporaries:
    each chunk is masked with integer operations on the delta's bits (bool masks and masked_fill
    are 20-50x slower on half tensors here). Dropped elements become +0 where mergekit's
    `delta * mask` gives -0 for negative deltas; the half-type merge pass sums from +0, so no
    zero's sign reaches its result.
    """

    def __init__(self, lower: int, upper: int, groups: list[list[int]]):
        self.lower, self.upper = lower, upper  # exclusive magnitude-bit bounds
        self.groups = groups  # [value, first, last, count, seen]

    @classmethod
    def top(cls, cum: torch.Tensor, n: int, density: float) -> MagnitudeCut | None:
        """`magnitude`'s selection (None when density keeps everything)."""
        if density >= 1:
            return None
        if density <= 0 or n == 0:
            return cls(32767, 32768, [])
        k = max(1, int(density * n))
        value = int(torch.searchsorted(cum, n - k, right=True))
        before = int(cum[value - 1]) if value > 0 else 0
        count = int(cum[value]) - before
        take = min(k - (n - int(cum[value])), count)
        return cls(value, 32768, [[value, 0, take, count, 0]] if take > 0 else [])

    @classmethod
    def positions(cls, cum: torch.Tensor, n: int, density: float, gamma: float) -> MagnitudeCut | None:
        """`magnitude_outliers`'s selection (None when density keeps everything)."""
        if density >= 1:
            return None
        keep_n, top_n = int(density * n), int(gamma * n)
        lo = max(0, max(0, n - keep_n - top_n))
        hi = min(n, max(0, n - keep_n - top_n) + keep_n)
        if hi <= lo:
            return cls(32767, 32768, [])
        low = int(torch.searchsorted(cum, lo, right=True))
        high = int(torch.searchsorted(cum, hi - 1, right=True))
        groups = []
        for value in sorted({low, high}):
            before = int(cum[value - 1]) if value > 0 else 0
            count = int(cum[value]) - before
            first, last = max(lo - before, 0), min(hi - before, count)
            if last > first:
                groups.append([value, first, last, count, 0])
        return cls(low, high, groups)

    def apply(self, delta: torch.Tensor, bits: torch.Tensor, scratch: torch.Tensor, flags: torch.Tensor) -> None:
        """Zero the dropped elements of the next chunk of the task vector (half `delta`, in place)."""
        lower, upper = self.lower, self.upper
        as_int = delta.view(torch.int16)
        torch.bitwise_and(as_int, 0x7FFF, out=bits)
        restore = []
        for group in self.groups:
            value, first, last, count, seen = group
            if seen >= last:
                continue  # past the group's kept ranks: the strict bound drops it
            if seen >= first and last == count:
                cut = None  # every remaining element of the group is kept
            else:
                in_chunk = int(torch.eq(bits, value, out=flags).sum())
                group[4] = seen + in_chunk
                a, z = max(first - seen, 0), min(last - seen, in_chunk)
                if z <= a:
                    continue
                cut = None if a == 0 and z == in_chunk else (a, z)
            if cut is None:  # widen the bound at this value to keep the whole group here
                if value == self.lower:
                    lower = value - 1
                if value == self.upper:
                    upper = value + 1
            else:
                where = flags.nonzero().flatten()[cut[0]:cut[1]]
                restore.append((where, delta[where]))
        if lower >= 32767 or upper <= 0 or upper <= lower + 1:
            delta.zero_()
        else:
            if lower >= 0:  # keep bits > lower: sign bit of (bits - lower - 1) clear
                torch.sub(bits, lower + 1, out=scratch).bitwise_right_shift_(15).bitwise_not_()
                as_int.bitwise_and_(scratch)
            if upper <= 32767:  # keep bits < upper: sign bit of (bits - upper) set
                torch.sub(bits, upper, out=scratch).bitwise_right_shift_(15)
                as_int.bitwise_and_(scratch)
        for where, kept in restore:
            delta[where] = kept


def random_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype of mergekit's DARE/DELLA probabilities and masked deltas for this tensor."""
    # mergekit draws in float32 on the CPU unless the tensor is bfloat16.
    return tensor.dtype if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16 else torch.float32


def bernoulli(delta: torch.Tensor, density: float, rescale: bool, rng: torch.Generator) -> torch.Tensor:
    """DARE: keep each element with probability `density` (the same RNG calls as mergekit)."""
    if density >= 1:
        return delta
    dtype = random_dtype(delta)
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=dtype), generator=rng)
    return rescaled(delta.to(dtype), mask, rescale).to(delta.dtype)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool,
                   rng: torch.Generator) -> torch.Tensor:
    """DELLA: keep probability from density - epsilon to density + epsilon by magnitude rank per row."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    shape = delta.shape
    dtype = random_dtype(delta)
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    # mergekit's own argsort call, so equal magnitudes get its ranks too (DELLA needs every rank,
    # so there is no sort to save); the second argsort is an inverse permutation: a scatter.
    order = torch.argsort(rows.abs(), dim=1, descending=False)
    ranks = torch.empty_like(order)
    # positions along dim 1, broadcast over the other dims (stacked experts have three)
    positions = torch.arange(order.shape[1], device=order.device).reshape(1, -1, *[1] * (order.dim() - 2))
    ranks.scatter_(1, order, positions.expand_as(order))
    ranks = ranks.to(dtype) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs, generator=rng).to(dtype)
    return rescaled(rows.to(dtype), mask, rescale).to(delta.dtype).reshape(shape)


# --- DARE / DELLA masks drawn whole and applied chunk by chunk ----------------------------------
RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor default


@dataclass(frozen=True)
class DrawState:
    """What a DARE/DELLA draw needs from one input that the candidate cannot change: the L1 norm
    of its task vector (as mergekit sums it) and, for DELLA, each element's rank in its row."""

    l1: torch.Tensor  # 0-dim, in the draw's dtype
    ranks: np.ndarray | None = None  # flat, 0-based positions of mergekit's per-row argsort


def draw_state(x: torch.Tensor, base: torch.Tensor, della: bool) -> DrawState | None:
    """The per-study part of an input's DARE (or DELLA) draw, or None where it is drawn as mergekit does."""
    delta = x - base
    if della and (delta.dim() > 2 or delta.numel() == 0 or delta.shape[-1] < 2):
        return None
    magnitudes = delta.to(random_dtype(delta), copy=True)
    l1 = magnitudes.abs_().sum()  # mergekit's tensor.abs().sum(), with one full-size temporary fewer
    del magnitudes
    return DrawState(l1, _row_ranks(delta).numpy() if della else None)


def _row_ranks(delta: torch.Tensor) -> torch.Tensor:
    """Each element's position in mergekit's argsort of |delta| along its row (int16 where it fits).

    Rows sort independently, so blocks of rows give mergekit's ranks with int64 scratch for a
    block only.
    """
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    n = rows.shape[1]
    ranks = torch.empty(rows.shape, dtype=torch.int16 if n <= 2**15 else torch.int32, device=rows.device)
    step = max(1, COUNT_CHUNK // n)
    positions = torch.arange(n, dtype=ranks.dtype, device=rows.device)
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step]
        order = torch.argsort(block.abs(), dim=1, descending=False)  # mergekit's own call: its ties
        ranks[start:start + step].scatter_(1, order, positions.expand_as(order))
    return ranks.reshape(-1)


def della_thresholds(n: int, density: float, epsilon: float, dtype: torch.dtype) -> np.ndarray:
    """Keep thresholds by 0-based rank in a row of n: mergekit's probabilities, rank by rank."""
    ranks = torch.arange(n).to(dtype).unsqueeze(0) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return keep_thresholds(probs.reshape(-1))


class DrawnMask:
    """One input's DARE/DELLA mask, drawn whole in mergekit's RNG order, applied chunk by chunk.

    Applying it to a chunk of the input's task vector gives that chunk of mergekit's
    `rescaled_masked_tensor(delta.to(work), mask, l1).to(delta.dtype)`: the same multiplications
    by the 0/1 mask and by the rescale factor, in the same dtype.
    """

    def __init__(self, keep: torch.Tensor | None, ratio: torch.Tensor | None):
        self.keep = keep  # 0/1 uint8, flat; None: every element dropped (DELLA at density 0)
        self.ratio = ratio

    @classmethod
    def draw(cls, x: torch.Tensor, base: torch.Tensor, thresholds, rng: torch.Generator,
             rescale: bool, l1: torch.Tensor, magnitudes: torch.Tensor) -> DrawnMask:
        """Draw the mask of task vector x - base (flat); thresholds(start, stop): keep thresholds
        (numpy uint32, see draws.keep_thresholds) of those elements.

        `magnitudes` is scratch for |masked delta| (x's size, random_dtype), summed whole as
        mergekit sums it.
        """
        # 0/1 bytes: multiplying a float by uint8 is 3x faster here than by bool, the same values
        keep = torch.empty(x.numel(), dtype=torch.uint8, device=x.device)
        flags = keep.numpy().view(np.bool_)
        with GeneratorStream(rng) as stream:
            for start, stop in chunk_ranges(x.numel()):
                chunk = keep[start:stop]
                stream.draw_keep(thresholds(start, stop), flags[start:stop])
                if rescale:
                    piece = magnitudes[start:stop]
                    piece.copy_(x[start:stop] - base[start:stop]).abs_().mul_(chunk)
        ratio = None
        if rescale:
            after = magnitudes.sum()
            if not (l1 < RESCALE_EPS or after < RESCALE_EPS):
                ratio = l1 / after
        return cls(keep, ratio)

    def apply(self, delta: torch.Tensor, start: int, stop: int, work: torch.Tensor) -> None:
        """Sparsify chunk [start, stop) of the task vector in place; `work`: scratch of the chunk's
        size in the draw's dtype."""
        if self.keep is None:
            delta.zero_()
            return
        masked = work.copy_(delta).mul_(self.keep[start:stop])
        if self.ratio is not None:
            masked.mul_(self.ratio)
        delta.copy_(masked)
