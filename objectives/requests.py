"""Tokenise lm-eval requests once per study, exactly as lm-eval's HF backend (HFLM) does.

The rules mirrored here (lm_eval/api/model.py TemplateLM and lm_eval/models/huggingface.py HFLM):
- loglikelihood: trailing whitespace of the context moves to the continuation; the continuation
  tokens are what encoding context+continuation adds after encoding the context alone; an empty
  context becomes the prefix token (BOS, else EOS); the model reads (context + continuation)
  left-truncated to max_length + 1 tokens, minus the last token.
- tok_encode: the tokenizer's default special tokens, except none when the text already starts
  with the prefix token's text.
- generate_until: the context is encoded as in tok_batch_encode and left-truncated to
  max_length - max_gen_toks; `until` gains the EOS text; max_gen_toks defaults to 256.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from objectives.errors import TaskInputError

DEFAULT_MAX_GEN_TOKS = 256  # HFLM.max_gen_toks
# Generation options that do not change greedy decoding; any other option would need HF generate.
_GREEDY_NEUTRAL = {
    "until",
    "max_gen_toks",
    "max_new_tokens",
    "max_tokens",
    "max_completion_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
}


@dataclass(frozen=True)
class LLRequest:
    """A loglikelihood request: the model reads tokens[:-1] and scores the last n_cont tokens."""

    tokens: tuple[int, ...]
    n_cont: int

    @property
    def feed(self) -> tuple[int, ...]:
        """The tokens given to the model."""
        return self.tokens[:-1]

    @property
    def scored_from(self) -> int:
        """First position of the feed whose next-token logits are scored."""
        return len(self.tokens) - 1 - self.n_cont


@dataclass(frozen=True)
class GenRequest:
    """A greedy generation request: context tokens, stop strings and the token budget."""

    context: tuple[int, ...]
    until: tuple[str, ...]
    max_gen_toks: int


class Tokenisation:
    """HFLM's tokenisation for one tokenizer and max_length (add_bos_token and prefix_token_id unset)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if tokenizer is None:
            raise TaskInputError("a tokenizer is needed to build requests; the model folder must include one")
        if max_length < 2:
            raise TaskInputError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix_token_id: int | None = bos if bos is not None else eos
        self._prefix_text = (
            tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None
        )
        self.eos_text = tokenizer.decode(eos, skip_special_tokens=False) if eos is not None else None

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """HFLM.tok_encode."""
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if (
            add_special_tokens is None
            and self._prefix_text is not None
            and text.startswith(self._prefix_text)
        ):
            kwargs = {"add_special_tokens": False}
        return self.tokenizer.encode(text, **kwargs)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens of a loglikelihood request (TemplateLM.loglikelihood)."""
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            if not cont:
                raise TaskInputError("a loglikelihood request has an empty context and an empty continuation")
            if self.prefix_token_id is None:
                raise TaskInputError(
                    "an empty-context request needs a BOS or EOS token; the tokenizer has neither"
                )
            if self.prefix_token_id != cont[0]:
                return [self.prefix_token_id], cont
            return cont[:1], cont[1:]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, context: str, continuation: str) -> LLRequest:
        """Tokenised and truncated loglikelihood request (HFLM._loglikelihood_tokens)."""
        ctx, cont = self.encode_pair(context, continuation)
        if not ctx or not cont:
            raise TaskInputError(f"a loglikelihood request tokenises to an empty part: {continuation[:40]!r}")
        if len(cont) > self.max_length:
            raise TaskInputError(
                f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}; raise max_length"
            )
        tokens = (ctx + cont)[-(self.max_length + 1) :]
        return LLRequest(tokens=tuple(tokens), n_cont=len(cont))

    def generation(self, context: str, gen_kwargs: dict[str, Any], task: str = "") -> GenRequest:
        """Tokenised, truncated greedy generation request (HFLM.generate_until)."""
        unsupported = sorted(set(gen_kwargs) - _GREEDY_NEUTRAL)
        if unsupported:
            raise TaskInputError(
                f"task '{task}': generation option(s) {unsupported} are not supported (greedy only)"
            )
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        do_sample = gen_kwargs.get("do_sample")
        if do_sample or (do_sample is None and temperature > 0.0):
            raise TaskInputError(
                f"task '{task}' samples during generation; only greedy generation is supported"
            )
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if self.eos_text is not None and self.eos_text not in until:
            until.append(self.eos_text)
        max_gen_toks = DEFAULT_MAX_GEN_TOKS
        for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
            if gen_kwargs.get(key) is not None:
                max_gen_toks = int(gen_kwargs[key])
                break
        max_ctx = self.max_length - max_gen_toks
        if max_ctx <= 0:
            raise TaskInputError(
                f"task '{task}': max_gen_toks {max_gen_toks} leaves no room for a prompt "
                f"in max_length {self.max_length}"
            )
        # tok_batch_encode: no special tokens when the text starts with the BOS text, else the default.
        bos = getattr(self.tokenizer, "bos_token", None)
        kwargs = {"add_special_tokens": False} if bos and context.startswith(bos) else {}
        ids = self.tokenizer(context, **kwargs)["input_ids"][-max_ctx:]
        if not ids:
            raise TaskInputError(f"task '{task}': a generation prompt tokenises to nothing")
        return GenRequest(context=tuple(ids), until=tuple(until), max_gen_toks=max_gen_toks)


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix shared by all sequences."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def item_prefix(requests: Sequence[LLRequest]) -> int:
    """Tokens all requests of an item read before any scored position: computed once per item."""
    return min(common_prefix([r.feed for r in requests]), min(r.scored_from for r in requests))


def postprocess(text: str, until: Sequence[str]) -> str:
    """Cut a generation at the first stop string (lm-eval's postprocess_generated_text)."""
    for term in until:
        if term:
            text = text.split(term)[0]
    return text
