"""arcee_fusion: keep the other model's change only where its importance is an upper outlier."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from merge_core.methods.base import Contract, MergeMethod
from merge_core.methods.chunks import chunk_ranges

# mergekit estimates the quartiles from this many elements drawn with replacement (global RNG)
# when a tensor is larger; smaller tensors are sorted whole.
QUANTILE_SAMPLE_SIZE = 1_000_000


class ArceeFusion(MergeMethod):
    """importance = |other - base| * KL(softmax(other) || softmax(base)) along the last axis; the
    change is kept where importance >= median + 1.5 IQR, in a float32 mask as mergekit has it.

    There are no parameters: for tensors of at most QUANTILE_SAMPLE_SIZE elements the mask is
    computed once per study and a candidate is one pass. Larger tensors draw their quartile sample
    from the candidate's generator, in mergekit's order; their mask is kept with the generator
    state it was drawn from and reused (the generator advanced as the draw would) while later
    candidates reach that tensor in the same state, as they do under one fixed seed.
    """

    float32_result = True  # a float32 mask/scale times half inputs: mergekit writes float32
    name = "arcee_fusion"
    contract = Contract(base="required", min_inputs=2, max_inputs=2)
    randomised = True  # only tensors larger than QUANTILE_SAMPLE_SIZE draw

    @torch.no_grad()
    def prepare(self, inputs):
        if inputs.base_tensor.numel() > QUANTILE_SAMPLE_SIZE:
            return {}  # drawn on the first candidate: see `_drawn_mask`
        return _mask(inputs.tensors[inputs.non_base[0]], inputs.base_tensor, None)

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        base = inputs.base_tensor
        other = inputs.tensors[inputs.non_base[0]]
        mask = state if isinstance(state, torch.Tensor) else _drawn_mask(state, other, base, rng)
        b, o, m, flat = base.reshape(-1), other.reshape(-1), mask.reshape(-1), out.view(-1)
        for start, stop in chunk_ranges(flat.numel()):
            x = b[start:stop]
            flat[start:stop].copy_(x + (o[start:stop] - x) * m[start:stop].float())


def _drawn_mask(cache: dict | None, other, base, rng: torch.Generator | None) -> torch.Tensor:
    """The sampled-quartile mask; reused when the generator is where it was at the cached draw."""
    if rng is None or cache is None:
        return _mask(other, base, rng)
    before = rng.get_state()
    if "draw" in cache and torch.equal(cache["draw"][0], before):
        _, mask, after = cache["draw"]
        rng.set_state(after)
        return mask
    mask = _mask(other, base, rng)
    cache["draw"] = (before, mask, rng.get_state())
    return mask


def _importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    eps = 1e-8
    p = F.softmax(other, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def _mask(other: torch.Tensor, base: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    """Where the importance reaches median + 1.5 * (q3 - q1), as a bool tensor."""
    importance = _importance(other, base)
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE_SIZE,), device=flat.device, generator=rng)]
    ordered, _ = torch.sort(flat)
    positions = (torch.tensor([0.25, 0.5, 0.75]).to(ordered.device) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[positions]
    return importance >= median + 1.5 * (q3 - q1)
