"""model_stock: interpolate from the base toward the average by the angle between task vectors."""

from __future__ import annotations

import torch

from merge_core.methods.base import Contract, MergeMethod, Param


class ModelStock(MergeMethod):
    """Model Stock (arXiv 2403.19522) as mergekit computes it; `filter_wise` works per row."""

    name = "model_stock"
    params = (Param("filter_wise", bool, "global", False),)
    contract = Contract(base="required", min_inputs=3)

    @torch.no_grad()
    def merge(self, out, inputs, state, values, rng) -> None:
        w_0 = inputs.base_tensor
        ws = [inputs.tensors[i] for i in inputs.non_base]
        shape = w_0.shape
        if values.shared["filter_wise"]:
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
        cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        count = len(ws)
        denominator = 1 + (count - 1) * cos_theta
        singular = denominator.abs() < 1e-6
        safe = torch.where(singular, torch.ones_like(denominator), denominator)
        t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
        average = sum(ws) / count
        out.copy_((t * average + (1 - t) * w_0).reshape(shape))
