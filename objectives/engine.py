"""The fast LM side: batched log-likelihood and greedy generation on a live transformers model.

Requests arrive tokenised (objectives.requests). The work is a prefix tree, and each shared
prefix is run once:

    shared prefix of a task split  (a fixed few-shot block or primer: once per run, KV-cached)
      -> prefix of one item        (the context its choices share: once per item)
        -> remainder of a request  (a choice's tokens, or a generated token)

Loglikelihood: one row per item, packed as [item prefix | choice 1 | choice 2 | ...] with a 4D
attention mask in which each choice sees the prefix and itself only, and explicit positions (a
choice continues at the prefix length). One forward pass scores every choice of the item.

Generation: each item's prompt tail is run as its own row on top of the shared prefix, then the
batch's caches are repacked into ONE row [shared | tail 1 | tail 2 | ...]. Each decoding step
appends one token per live item to that row; the mask lets a token see the shared prefix, its
own tail and its own earlier tokens. Decoding is memory-bound, and this way the shared prefix is
read once per step instead of once per item; finished items just stop adding tokens.

Masks are additive floats (0 or the dtype's minimum), which both sdpa and eager attention take.

A broken model (a merge whose weights overflow) gives NaN/Inf logits, and lm-eval's metrics do not
notice: an argmax over NaN log-likelihoods is still a valid choice. So every batch's logits are
checked once (one reduction over the columns that are scored; generation folds each step's check
into one flag read at the end of the batch) and NonFiniteOutput is raised.
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
from transformers.cache_utils import DynamicLayer

from objectives.errors import NonFiniteOutput
from objectives.requests import GenRequest, LLRequest, postprocess

SUPPORTED_ATTENTION = ("sdpa", "eager")  # implementations that accept arbitrary 4D masks


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


class _RoomyLayer(DynamicLayer):
    """A DynamicLayer that appends into reserved room instead of re-allocating on every update.

    DynamicLayer.update concatenates the whole cache with each new token, which dominates greedy
    decoding; here `keys`/`values` are views of a buffer with spare room for the tokens to come.
    """

    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        super().__init__()
        n = keys.shape[-2]
        self._k = keys.new_empty((*keys.shape[:-2], n + room, keys.shape[-1]))
        self._v = values.new_empty((*values.shape[:-2], n + room, values.shape[-1]))
        self._k[..., :n, :] = keys
        self._v[..., :n, :] = values
        self._n = n
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self._k[..., : self._n, :]
        self.values = self._v[..., : self._n, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values; returns all of them, as DynamicLayer.update does."""
        new = key_states.shape[-2]
        if self._n + new > self._k.shape[-2]:  # out of room: grow (rare, room is reserved up front)
            grown = _RoomyLayer(self.keys, self.values, room=max(new, self._n))
            self._k, self._v = grown._k, grown._v
        self._k[..., self._n : self._n + new, :] = key_states
        self._v[..., self._n : self._n + new, :] = value_states
        self._n += new
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Number of cached positions."""
        return self._n

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the given rows."""
        self._k, self._v = self._k[indices], self._v[indices]
        self._views()


def _empty_cache() -> Any:
    """A plain DynamicCache for the model to fill."""
    from transformers import DynamicCache

    return DynamicCache()


def _cache(pieces: list[tuple[torch.Tensor, torch.Tensor]], room: int) -> Any:
    """A DynamicCache of roomy layers holding the given per-layer keys and values."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = [_RoomyLayer(k, v, room) for k, v in pieces]
    return cache


class Engine:
    """Scores tokenised requests with a model; caches only within one run (weights may change after)."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        attention = getattr(model.config, "_attn_implementation", None) or "eager"
        if attention not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attention implementation {attention!r} unsupported; load the model with sdpa or eager"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        first = next(model.parameters())
        self.device = first.device
        self._min = torch.finfo(first.dtype if first.is_floating_point() else torch.float32).min
        self._mask_dtype = first.dtype if first.is_floating_point() else torch.float32
        parameters = inspect.signature(model.forward).parameters
        self._keep_logits = "logits_to_keep" in parameters
        # newer transformers 5 releases name the cache argument `cache`; `past_key_values` goes in 5.40
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self._eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._shared: dict[Hashable, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.forward_seconds = 0.0
        self.forward_calls = 0

    # -- model calls -------------------------------------------------------------------------
    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, cache: Any, keep: int
    ) -> Any:
        """One forward pass with explicit positions and a boolean [rows, queries, keys] visibility mask."""
        mask = torch.zeros(allowed.shape, dtype=self._mask_dtype, device=self.device)
        mask.masked_fill_(~allowed, self._min)
        kwargs: dict[str, Any] = {}
        if keep and self._keep_logits:
            kwargs["logits_to_keep"] = keep
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = self.model(
            input_ids=ids,
            attention_mask=mask[:, None],
            position_ids=positions,
            use_cache=cache is not None,
            **{self._cache_arg: cache},
            **kwargs,
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.forward_seconds += time.perf_counter() - t0
        self.forward_calls += 1
        return out if not keep or self._keep_logits else _Sliced(out, keep)

    def _shared_kv(self, key: Hashable, tokens: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer keys/values of a shared prefix (batch 1), computed once per run."""
        if key not in self._shared:
            n = len(tokens)
            ids = torch.as_tensor([tokens], device=self.device)
            positions = torch.arange(n, device=self.device)[None]
            allowed = torch.ones((n, n), dtype=torch.bool, device=self.device).tril()[None]
            cache = _empty_cache()
            self._forward(ids, positions, allowed, cache, keep=1)
            self._shared[key] = [(layer.keys, layer.values) for layer in cache.layers]
        return self._shared[key]

    def _past(self, key: Hashable, shared: tuple[int, ...], rows: int, room: int) -> Any:
        """A cache holding the shared prefix once per row (None without a shared prefix)."""
        if not shared:
            return None
        kv = self._shared_kv(key, shared)
        return _cache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in kv], room)

    # -- loglikelihood -----------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, items: Sequence[LLItem]) -> list[list[tuple[float, bool]]]:
        """(log-likelihood, is-greedy) of every request of every item, in order."""
        out: list[list[tuple[float, bool]]] = [[] for _ in items]
        by_key: dict[Hashable, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            by_key[item.shared_key].append(i)
        for idxs in by_key.values():
            # Length buckets: longest packed rows first, so padding within a batch stays small.
            idxs.sort(key=lambda i: _packed_length(items[i]), reverse=True)
            for batch in _batches(idxs, [len(items[i].requests) for i in idxs], self.batch_size):
                for i, res in zip(batch, self._ll_batch([items[i] for i in batch]), strict=True):
                    out[i] = res
        return out

    def _ll_batch(self, items: list[LLItem]) -> list[list[tuple[float, bool]]]:
        n_shared = len(items[0].shared)
        rows, groups, positions, spans = [], [], [], []
        for it in items:
            head = list(it.requests[0].feed[n_shared : it.prefix])
            row, group, pos = head, [0] * len(head), list(range(n_shared, it.prefix))
            item_spans = []
            for j, req in enumerate(it.requests, start=1):
                rest = req.feed[it.prefix :]
                first = len(row) + req.scored_from - it.prefix  # row column whose logits score target 0
                item_spans.append((first, req))
                row, group, pos = (
                    row + list(rest),
                    group + [j] * len(rest),
                    pos + list(range(it.prefix, it.prefix + len(rest))),
                )
            rows.append(row)
            groups.append(group)
            positions.append(pos)
            spans.append(item_spans)
        width = max(len(r) for r in rows)
        ids, pos_t, allowed = self._pack(rows, groups, positions, width)
        cache = self._past(items[0].shared_key, items[0].shared, len(items), width)
        if cache is not None:
            past = torch.ones((len(items), width, n_shared), dtype=torch.bool, device=self.device)
            allowed = torch.cat([past, allowed], dim=2)
        first_scored = min(first for item_spans in spans for first, _ in item_spans)
        keep = width - first_scored
        logits = self._forward(ids, pos_t, allowed, cache, keep=keep).logits
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteOutput(f"NaN/Inf in the model's logits (loglikelihood batch of {len(items)} items)")
        offset = width - keep
        chunk = [(r, first - offset, req) for r, item_spans in enumerate(spans) for first, req in item_spans]
        scored = _score(logits, chunk, self.device)
        out, pos = [], 0
        for it in items:
            out.append(scored[pos : pos + len(it.requests)])
            pos += len(it.requests)
        return out

    def _pack(
        self, rows: list[list[int]], groups: list[list[int]], positions: list[list[int]], width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids and positions, and the visibility mask of a packed tree per row.

        A token sees earlier tokens of group 0 (the shared stem) and of its own group; padding
        (group -1) sees only itself, so that no query row is fully masked.
        """
        n = len(rows)
        ids = torch.zeros((n, width), dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        grp = torch.full((n, width), -1, dtype=torch.long)
        for i, (row, group, p) in enumerate(zip(rows, groups, positions, strict=True)):
            ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            pos[i, : len(row)] = torch.as_tensor(p, dtype=torch.long)
            grp[i, : len(row)] = torch.as_tensor(group, dtype=torch.long)
        ids, pos, grp = ids.to(self.device), pos.to(self.device), grp.to(self.device)
        causal = torch.ones((width, width), dtype=torch.bool, device=self.device).tril()
        gq, gk = grp[:, :, None], grp[:, None, :]
        allowed = causal & (gk >= 0) & ((gk == 0) | (gk == gq))
        allowed |= torch.eye(width, dtype=torch.bool, device=self.device) & (gq < 0)
        return ids, pos, allowed

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
        n = len(items)
        n_shared = len(items[0].shared)
        tails = [list(it.request.context[n_shared:-1]) for it in items]
        steps = max(it.request.max_gen_toks for it in items)
        # Single packed row: shared prefix, then each item's prompt tail, then generated tokens.
        owner = [-1] * n_shared
        pieces = list(self._shared_kv(items[0].shared_key, items[0].shared)) if n_shared else []
        if any(tails):
            width = max(len(t) for t in tails)
            ids, pos, allowed = self._pack(
                tails,
                [[0] * len(t) for t in tails],
                [list(range(n_shared, n_shared + len(t))) for t in tails],
                width,
            )
            cache = self._past(items[0].shared_key, items[0].shared, n, width)
            if cache is None:
                cache = _empty_cache()
            else:
                past = torch.ones((n, width, n_shared), dtype=torch.bool, device=self.device)
                allowed = torch.cat([past, allowed], dim=2)
            self._forward(ids, pos, allowed, cache, keep=1)
            repacked = []
            for li, layer in enumerate(cache.layers):
                parts = [pieces[li][0]] if pieces else []
                vparts = [pieces[li][1]] if pieces else []
                for r, t in enumerate(tails):
                    parts.append(layer.keys[r : r + 1, :, n_shared : n_shared + len(t)])
                    vparts.append(layer.values[r : r + 1, :, n_shared : n_shared + len(t)])
                repacked.append((torch.cat(parts, dim=2), torch.cat(vparts, dim=2)))
            pieces = repacked
            for r, t in enumerate(tails):
                owner += [r] * len(t)
        cache = _cache(pieces, room=n * steps) if pieces else None
        lengths = [n_shared + len(t) for t in tails]  # next position of each item
        owner_t = torch.as_tensor(owner, dtype=torch.long, device=self.device)
        generated: list[list[int]] = [[] for _ in items]
        alive = list(range(n))
        step_in = [it.request.context[-1] for it in items]
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        while alive:
            live = torch.as_tensor(alive, dtype=torch.long, device=self.device)
            owner_t = torch.cat([owner_t, live])
            # a token sees the shared prefix and whatever its own item wrote (tail, earlier tokens, itself)
            allowed = (owner_t[None, :] == -1) | (owner_t[None, :] == live[:, None])
            if cache is None:
                cache = _empty_cache()
            out = self._forward(
                torch.as_tensor([step_in], device=self.device),
                torch.as_tensor([[lengths[r] for r in alive]], device=self.device),
                allowed[None],
                cache,
                keep=len(alive),
            )
            if not isinstance(cache.layers[0], _RoomyLayer):
                cache = _cache([(lay.keys, lay.values) for lay in cache.layers], room=n * steps)
            step_logits = out.logits[0, -len(alive) :]
            finite &= torch.isfinite(step_logits).all()
            chosen = step_logits.argmax(dim=-1).tolist()
            still = []
            for row, token in zip(alive, chosen, strict=True):
                req = items[row].request
                generated[row].append(token)
                lengths[row] += 1
                if token in self._eos or len(generated[row]) >= req.max_gen_toks:
                    continue
                if self._stopped(generated[row], req.until):
                    continue
                still.append(row)
            alive = still
            step_in = [generated[row][-1] for row in alive]
        if not bool(finite):
            raise NonFiniteOutput(f"NaN/Inf in the model's logits (generation batch of {n} items)")
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


class _Sliced:
    """Model output whose logits are cut to the last `keep` columns (models without logits_to_keep)."""

    def __init__(self, out: Any, keep: int) -> None:
        self.logits = out.logits[:, -keep:]
        self.cache = getattr(out, "cache", None)


def _score(
    logits: torch.Tensor, chunk: list[tuple[int, int, LLRequest]], device: torch.device
) -> list[tuple[float, bool]]:
    """Sum of target log-probs and all-greedy flag per request; `chunk` holds (row, first column, request)."""
    row_ix, col_ix, targets = [], [], []
    for row, first, req in chunk:
        row_ix += [row] * req.n_cont
        col_ix += range(first, first + req.n_cont)
        targets += req.tokens[-req.n_cont :]
    picked = logits[torch.as_tensor(row_ix, device=device), torch.as_tensor(col_ix, device=device)]
    target = torch.as_tensor(targets, device=device)
    # Same arithmetic as HFLM: log_softmax in the logits' dtype, summed per request in that dtype.
    token_ll = F.log_softmax(picked, dim=-1).gather(1, target[:, None]).squeeze(1)
    greedy = picked.argmax(dim=-1) == target
    res, pos = [], 0
    for _, _, req in chunk:
        seg = slice(pos, pos + req.n_cont)
        res.append((float(token_ll[seg].sum()), bool(greedy[seg].all())))
        pos += req.n_cont
    return res


def _packed_length(item: LLItem) -> int:
    return item.prefix - len(item.shared) + sum(len(r.feed) - item.prefix for r in item.requests)


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
