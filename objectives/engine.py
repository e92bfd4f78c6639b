"""The fast LM side: batched log-likelihood and greedy generation on a live transformers model.

Requests arrive tokenised (objectives.requests). Work is organised as a prefix tree of at most
three levels, each run once and extended through the KV cache:

    shared prefix of a task split  (e.g. a fixed few-shot block; once per run)
      -> prefix of one item        (the context its choices share; once per item)
        -> remainder of a request  (the tokens that differ: a choice, or a decoding step)

Rows are right-padded. A level's attention mask is the cached mask of the level below (zeros at
its padding) followed by ones: valid tokens never see later padding under the causal mask, and
padding queries always see themselves, so no row is fully masked. Positions are explicit, so a
row continues at its own length however much padding the cache holds.
"""

from __future__ import annotations

import inspect
import time
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from objectives.requests import GenRequest, LLRequest, postprocess


@dataclass(frozen=True)
class LLItem:
    """The loglikelihood requests of one item and how much of their input they share."""

    shared_key: Hashable
    shared: tuple[int, ...]  # tokens shared with other items of the same task split
    prefix: int  # tokens (>= len(shared)) that every request of this item starts with
    requests: tuple[LLRequest, ...]


@dataclass(frozen=True)
class GenItem:
    """One greedy generation request and the prompt tokens it shares with other items."""

    shared_key: Hashable
    shared: tuple[int, ...]
    request: GenRequest


class _Past:
    """A KV cache and, per row, which cached positions hold real tokens."""

    def __init__(self, cache: Any, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask

    def select(self, index: torch.Tensor, config: Any) -> _Past:
        """A new cache holding the given rows (repeats allowed); self stays usable."""
        from transformers import DynamicCache

        data = [(layer.keys[index], layer.values[index]) for layer in self.cache.layers]
        return _Past(DynamicCache(ddp_cache_data=data, config=config), self.mask[index])

    def keep(self, index: torch.Tensor) -> None:
        """Drop all rows but the given ones, in place."""
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]


class Engine:
    """Scores tokenised requests with a model; caches only within one run (weights may change after)."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self._eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._shared: dict[Hashable, _Past] = {}
        self.forward_seconds = 0.0
        self.forward_calls = 0

    # -- model calls -------------------------------------------------------------------------
    def _forward(self, past: _Past | None, rows: Sequence[Sequence[int]], keep: int) -> tuple[Any, _Past]:
        """Extend `past` by one right-padded row per sequence, logits of the last `keep` columns (0: all)."""
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            valid[i, : len(row)] = 1
        ids, valid = ids.to(self.device), valid.to(self.device)
        ones = torch.ones_like(valid)
        if past is None:
            start = torch.zeros((len(rows), 1), dtype=torch.long, device=self.device)
            attention = ones
        else:
            start = past.mask.sum(dim=1, keepdim=True)
            attention = torch.cat([past.mask, ones], dim=1)
        kwargs: dict[str, Any] = {}
        if keep and self._keep_logits:
            kwargs["logits_to_keep"] = keep
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = self.model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=start + torch.arange(width, device=self.device),
            past_key_values=None if past is None else past.cache,
            use_cache=True,
            **kwargs,
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.forward_seconds += time.perf_counter() - t0
        self.forward_calls += 1
        mask = valid if past is None else torch.cat([past.mask, valid], dim=1)
        logits = out.logits if not keep or self._keep_logits else out.logits[:, -keep:]
        return logits, _Past(out.past_key_values, mask)

    def _shared_past(self, key: Hashable, tokens: tuple[int, ...], rows: int) -> _Past | None:
        if not tokens:
            return None
        if key not in self._shared:
            self._shared[key] = self._forward(None, [tokens], keep=1)[1]
        index = torch.zeros(rows, dtype=torch.long, device=self.device)
        return self._shared[key].select(index, self.model.config)

    # -- loglikelihood -----------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, items: Sequence[LLItem]) -> list[list[tuple[float, bool]]]:
        """(log-likelihood, is-greedy) of every request of every item, in order."""
        out: list[list[tuple[float, bool]]] = [[] for _ in items]
        by_key: dict[Hashable, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            by_key[item.shared_key].append(i)
        for idxs in by_key.values():
            # Length buckets: longest item prefixes first, so padding within a batch stays small.
            idxs.sort(key=lambda i: (items[i].prefix, len(items[i].requests)), reverse=True)
            for batch in _batches(idxs, [len(items[i].requests) for i in idxs], self.batch_size):
                for i, res in zip(batch, self._ll_batch([items[i] for i in batch]), strict=True):
                    out[i] = res
        return out

    def _ll_batch(self, items: list[LLItem]) -> list[list[tuple[float, bool]]]:
        shared = items[0].shared
        past = self._shared_past(items[0].shared_key, shared, len(items))
        level1 = [it.requests[0].feed[len(shared) : it.prefix] for it in items]
        if any(level1):
            past = self._forward(past, level1, keep=1)[1]
        reqs = [(p, r) for p, it in enumerate(items) for r in it.requests]
        results: list[tuple[float, bool]] = []
        for lo in range(0, len(reqs), self.batch_size):
            chunk = reqs[lo : lo + self.batch_size]
            parents = torch.as_tensor([p for p, _ in chunk], device=self.device)
            rows = [r.feed[items[p].prefix :] for p, r in chunk]
            starts = [r.scored_from - items[p].prefix for p, r in chunk]
            width = max(len(r) for r in rows)
            keep = width - min(starts)  # logits only from the first scored column on
            sub = past.select(parents, self.model.config) if past is not None else None
            logits = self._forward(sub, rows, keep=keep)[0]
            results.extend(self._score(logits, chunk, starts, width - keep))
        out: list[list[tuple[float, bool]]] = [[] for _ in items]
        for (p, _), res in zip(reqs, results, strict=True):
            out[p].append(res)
        return out

    def _score(
        self, logits: torch.Tensor, chunk: list[tuple[int, LLRequest]], starts: list[int], offset: int
    ) -> list[tuple[float, bool]]:
        row_ix, col_ix, targets = [], [], []
        for j, ((_, req), start) in enumerate(zip(chunk, starts, strict=True)):
            row_ix += [j] * req.n_cont
            col_ix += range(start - offset, start - offset + req.n_cont)
            targets += req.tokens[-req.n_cont :]
        picked = logits[
            torch.as_tensor(row_ix, device=self.device), torch.as_tensor(col_ix, device=self.device)
        ]
        target = torch.as_tensor(targets, device=self.device)
        # Same arithmetic as HFLM: log_softmax in the logits' dtype, summed per request in that dtype.
        token_ll = F.log_softmax(picked, dim=-1).gather(1, target[:, None]).squeeze(1)
        greedy = picked.argmax(dim=-1) == target
        res, pos = [], 0
        for _, req in chunk:
            seg = slice(pos, pos + req.n_cont)
            res.append((float(token_ll[seg].sum()), bool(greedy[seg].all())))
            pos += req.n_cont
        return res

    # -- generation --------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, items: Sequence[GenItem]) -> list[str]:
        """Greedy continuation of every item, cut at its stop strings as lm-eval does."""
        out = [""] * len(items)
        by_key: dict[Hashable, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            by_key[item.shared_key].append(i)
        for idxs in by_key.values():
            idxs.sort(key=lambda i: len(items[i].request.context), reverse=True)
            for lo in range(0, len(idxs), self.batch_size):
                batch = idxs[lo : lo + self.batch_size]
                for i, text in zip(batch, self._gen_batch([items[i] for i in batch]), strict=True):
                    out[i] = text
        return out

    def _gen_batch(self, items: list[GenItem]) -> list[str]:
        shared = items[0].shared
        past = self._shared_past(items[0].shared_key, shared, len(items))
        level1 = [it.request.context[len(shared) : -1] for it in items]
        if any(level1):
            past = self._forward(past, level1, keep=1)[1]
        generated: list[list[int]] = [[] for _ in items]
        alive = list(range(len(items)))
        step_in = [it.request.context[-1] for it in items]
        while alive:
            logits, past = self._forward(past, [[t] for t in step_in], keep=1)
            chosen = logits[:, -1].argmax(dim=-1).tolist()
            still = []
            for j, (row, token) in enumerate(zip(alive, chosen, strict=True)):
                req = items[row].request
                generated[row].append(token)
                if (
                    token in self._eos
                    or len(generated[row]) >= req.max_gen_toks
                    or self._stopped(generated[row], req.until)
                ):
                    continue
                still.append(j)
            if len(still) < len(alive):
                if not still:
                    break
                past.keep(torch.as_tensor(still, device=self.device))
                alive = [alive[j] for j in still]
            step_in = [generated[row][-1] for row in alive]
        return [
            postprocess(self.tokenizer.decode(toks, skip_special_tokens=True), it.request.until)
            for toks, it in zip(generated, items, strict=True)
        ]

    def _stopped(self, tokens: list[int], until: tuple[str, ...]) -> bool:
        # Only the tail can hold a new stop string; a miss merely generates further, and the final
        # cut at the first stop string decides the text either way.
        window = max((len(u) for u in until), default=0) + 2
        tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=True)
        return any(u and u in tail for u in until)


def _batches(idxs: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive groups whose sizes sum to at most `limit` (an oversized entry goes alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in zip(idxs, sizes, strict=True):
        if current and total + size > limit:
            batches.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        batches.append(current)
    return batches
