"""`tokenizer_source` / `tokenizer:`: the tokenizer a merge writes, and each model's rows lined up with it.

mergekit-yaml builds the output tokenizer (the base's, stripped of tokens past its embedding, for
`base`; a named model's as it is; for `union`, the base's with every other model's tokens added),
then rebuilds every vocabulary-indexed tensor (embeddings, lm_head weight and bias) of every model
with one row per output token: the model's own row of that token, or, where the model lacks it, a
default (the token's row in the only model that has it, the base's row, the average of the models
that have it, zeros, or what `tokenizer.tokens` names), and pads to `pad_to_multiple_of` with the
mean row. merge-search does the same (`OutputVocabulary.align`). When every token sits at the same
id in every model and the ids are 0..n-1, that rebuild is the first n rows of each input, bit for
bit (phi-2's 51,200 rows for 50,295 tokens are cut to the tokenizer): those are views, no copy.

One difference, on purpose: mergekit adds a `union`'s new tokens in the order of Python's hash of
the models and of the tokenizers' vocabulary maps, which changes from run to run; merge-search adds
them in a fixed order (the base first, then the models in the config's order, each model's tokens
by id), so two runs give one tokenizer. Each token's row is mergekit's either way.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_core.errors import MergeInputError
from merge_core.refs import resolve

# Tensors indexed by token id (mergekit's `vocabulary_axis: 0`), when their first dim is the vocabulary.
# The names of mergekit's architecture files that carry `vocabulary_axis: 0`.
VOCABULARY_PATTERN = re.compile(r"(embed_tokens|tok_embeddings|word_embeddings|(^|\.)wte\.|(^|\.)embed\.|"
                                r"(^|\.)lm_head\.|embed_out|embed_in|(^|\.)output\.|output_layer\.|"
                                r"(^|\.)shared\.weight|backbone\.embeddings\.|vocab_projector\.|cls\.predictions\.)")


@dataclass(frozen=True)
class TokenSource:
    """Where a token's default row comes from: `zero`, `model` (its row of the token), `model_token`
    (its row of another token, by id or by text) or `average` (the models that have it); `force`
    uses it even for models that have the token."""

    kind: str
    model: int | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False


def vocab_rows(config: dict) -> int | None:
    """The embedding rows a config.json gives: `vocab_size`, or where a vision-language model keeps it
    (Mistral3, Gemma3, Qwen-VL under transformers 5), `text_config.vocab_size`."""
    text = config.get("text_config")
    if isinstance(text, dict) and text.get("vocab_size") is not None:  # what transformers 5 reads when both are set
        return text["vocab_size"]
    return config.get("vocab_size")


def set_vocab_rows(config: dict, rows: int) -> None:
    """Write `rows` everywhere the config keeps its vocabulary size (the top level when it keeps none)."""
    text = config.get("text_config")
    in_text = isinstance(text, dict) and text.get("vocab_size") is not None
    if in_text:
        config["text_config"] = dict(text, vocab_size=rows)
    if not in_text or config.get("vocab_size") is not None:
        config["vocab_size"] = rows


def indexes_vocabulary(name: str, shape: tuple[int, ...], model_rows: int | None) -> bool:
    """Whether the non-layer tensor `name` of `shape`, in a model of `model_rows` embedding rows, is
    indexed by token id (cut to `rows` or rebuilt by `align`)."""
    return len(shape) >= 1 and shape[0] == model_rows and VOCABULARY_PATTERN.search(name) is not None


class TruncatedVocabulary:
    """mergekit-yaml --unsafe-truncate-embeddings: without a tokenizer source, every token-indexed
    tensor is cut to the fewest rows any model has (the ids they share, taken on trust to mean the
    same tokens), and the reference model's tokenizer is written as it is."""

    aligned = False
    tokenizer = None
    indexes = staticmethod(indexes_vocabulary)

    def __init__(self, rows: int):
        self.rows = self.padded = self.size = rows


class OutputVocabulary:
    """The output tokenizer, where each model holds every output token, and the rows a merge reads.

    `rows` (not None): every model holds token i at row i; its inputs are cut to the first `rows`
    rows (views). `aligned`: the rows move or some are missing; `align` rebuilds a tensor's inputs.
    `size` is the tokenizer's length, `padded` the rows the merged tensors get (`pad_to_multiple_of`).
    """

    def __init__(self, source: str, models: list[str], weights: list, reference, allow_pickle: bool = False,
                 tokens: dict | None = None, pad_to_multiple_of: int | None = None, named=None):
        """`named`: the model `source` names when it is held in memory (an earlier chain stage's output)."""
        self.label = "tokenizer" if tokens or pad_to_multiple_of else f"tokenizer_source: {source}"
        base = next(i for i, w in enumerate(weights) if w is reference)
        base_tokenizer = model_tokenizer(reference, vocab_rows(reference.config), self.label, required=True)
        own = [base_tokenizer if i == base else model_tokenizer(w) for i, w in enumerate(weights)]
        base_vocab = base_tokenizer.get_vocab()  # before `tokens` are added to it (source: base)
        # a model whose tokenizer does not load shares the base's (mergekit's assumption)
        self.model_vocabs = [t.get_vocab() if t is not None and i != base else base_vocab
                             for i, t in enumerate(own)]
        self.unloaded = {i for i, t in enumerate(own) if t is None}
        if source == "base":
            out = base_tokenizer  # `tokens` are added to it; the base's own vocabulary was taken above
        elif source == "union":
            others = [(t, _rows(w, t)) for i, (t, w) in enumerate(zip(own, weights, strict=True))
                      if i != base and t is not None]
            out = union_tokenizer(base_tokenizer, others)
        elif named is not None:  # mergekit-multi: that stage's written tokenizer
            out = model_tokenizer(named, None, self.label, required=True)
        else:
            out = load_tokenizer(resolve(source, allow_pickle), None, self.label)
        for token in tokens or {}:
            if token not in out.get_vocab():
                out.add_tokens(token)
        self.tokenizer = out
        vocab = out.get_vocab()
        self.size = len(vocab)
        if max(vocab.values(), default=-1) >= self.size:
            raise MergeInputError(f"{self.label}: the tokenizer's {self.size} token ids are not 0..{self.size - 1} "
                                  "(mergekit fails on such a tokenizer too); name a tokenizer whose ids have no gaps")
        multiple = pad_to_multiple_of or 1
        self.padded = -(-self.size // multiple) * multiple
        self.ids = vocab
        self.token_of = {i: t for t, i in vocab.items()}
        self.positions = [self._positions(m, w, v, vocab)
                          for m, w, v in zip(models, weights, self.model_vocabs, strict=True)]
        if source == "base":
            # mergekit adds `tokens` to the base's own tokenizer object, so the base holds each added token
            # at its new id: that row of the base where the base has it (a padding row). Past its rows
            # mergekit fails (KeyError); the base then lacks the token here.
            rows = vocab_rows(reference.config) or len(base_vocab)
            for token in tokens or {}:
                if token not in base_vocab and vocab[token] < rows:
                    self.positions[base][vocab[token]] = vocab[token]
        self.sources = {tok: _token_source(tok, cfg, models) for tok, cfg in (tokens or {}).items()}
        self.forced = [vocab[t] for t, s in self.sources.items() if s.force]
        for token, source in self.sources.items():
            self._check_source(token, vocab[token], source)
        identity = torch.arange(self.size)
        self.aligned = bool(self.sources) or self.padded != self.size or not all(
            torch.equal(p, identity) for p in self.positions)
        rows = {vocab_rows(w.config) for w in weights}
        self.rows = self.size if not self.aligned and rows - {None, self.size} else None

    def _positions(self, model: str, weights, model_vocab: dict, vocab: dict) -> torch.Tensor:
        """For each output token id, the model's row of that token (-1: the model lacks it)."""
        rows = vocab_rows(weights.config) or len(model_vocab)
        positions = torch.full((len(vocab),), -1, dtype=torch.long)
        for token, new_id in vocab.items():
            old_id = model_vocab.get(token)
            if old_id is None:
                continue
            if old_id >= rows:
                raise MergeInputError(
                    f"{self.label}: token {token!r} sits at id {old_id} in {model}'s tokenizer, past its {rows} "
                    "embedding rows (mergekit fails on this too); give the model a tokenizer that matches its "
                    "embeddings, or name another tokenizer source")
            positions[new_id] = old_id
        return positions

    def _check_source(self, token: str, token_id: int, source: TokenSource) -> None:
        """A `tokenizer.tokens` source that cannot give the token's row fails now, not half way through a merge."""
        needed = source.force or any(p[token_id] < 0 for p in self.positions)
        where = f"tokenizer.tokens.{token}"
        if source.kind == "none" and needed:
            raise MergeInputError(f"{where}: no source, and some models lack the token (or force is set); give it "
                                  "a source: a model, {kind: zero} or {kind: model_token, model: M, token: T}")
        if source.kind == "model" and needed and self.positions[source.model][token_id] < 0:
            raise MergeInputError(f"{where}: the model it names lacks the token (mergekit fails on this too); name "
                                  "a model that has it, or use {kind: model_token, ...} or {kind: zero}")
        if source.kind == "model_token" and needed and source.token is not None and source.model in self.unloaded:
            raise MergeInputError(f"{where}: model_token {source.token!r} is given by text, but that model's "
                                  "tokenizer does not load; give its row as token_id instead")
        if source.kind == "model_token" and needed and source.token is not None and source.token not in \
                self.model_vocabs[source.model]:
            raise MergeInputError(f"{where}: model_token {source.token!r} is not in that model's tokenizer")

    def check_rows(self, name: str, inputs: list[tuple[int, int]]) -> None:
        """Before merging: every row `align` will take for one token-indexed tensor exists.

        `inputs` are the tensor's (model index, rows). A `tokenizer.tokens` source is read where
        one of these models lacks its token, or always with `force`; it must name one of them (a
        slice may leave a model out) and, by id, a row that model's tensor has.
        """
        models = [model for model, _ in inputs]
        for token, source in self.sources.items():
            token_id = self.ids[token]
            needed = source.force or any(self.positions[m][token_id] < 0 for m in models)
            if source.kind not in ("model", "model_token") or not needed:
                continue
            where = f"{self.label}: token {token!r}"
            if source.model not in models:
                raise MergeInputError(f"{where} takes its row from a model that {name} is not merged from; name "
                                      "one of that tensor's models")
            if source.kind != "model_token":
                continue
            row_id = self._row_id(source)
            rows = inputs[models.index(source.model)][1]
            if not 0 <= row_id < rows:
                raise MergeInputError(f"{where}: model_token id {row_id} is outside that model's {rows} rows of "
                                      f"{name}")

    indexes = staticmethod(indexes_vocabulary)

    # --- rebuilding one tensor's inputs (mergekit's PermutedVocabulary) ---------------------------
    @torch.no_grad()
    def align(self, tensors: list[torch.Tensor], model_ids: list[int], base: int | None) -> list[torch.Tensor]:
        """Each model's tensor with one row per output token (then the padding rows), in one dtype.

        `model_ids` are the tensors' models (indexes into the plan's models), `base` the slice's base
        model (None without one): the base's row is the default of a token some models lack.
        """
        positions = [self.positions[m].to(tensors[0].device) for m in model_ids]
        present = torch.stack([p >= 0 for p in positions])
        keep = present.clone()
        keep[:, self.forced] = False
        defaults = self._defaults(tensors, model_ids, positions, present, base)
        aligned = []
        for tensor, position, kept in zip(tensors, positions, keep, strict=True):
            new = tensor.new_zeros((self.padded, *tensor.shape[1:]))
            ids = kept.nonzero().view(-1)
            new[ids] = tensor[position[ids]]
            for token_id, row in defaults.items():
                if not kept[token_id]:
                    new[token_id] = row
            if self.padded > self.size:  # mergekit pads with the mean row of the vocabulary
                new[self.size:] = torch.mean(new[: self.size], dim=0)
            aligned.append(new)
        return aligned

    def _defaults(self, tensors, model_ids, positions, present, base) -> dict[int, torch.Tensor]:
        """The default row of every token some of the models lack, or that a `force` source replaces."""
        needed = present.sum(dim=0) < len(model_ids)
        needed[self.forced] = True
        defaults = {}
        for token_id in needed.nonzero().view(-1).tolist():
            source = self.sources.get(self.token_of[token_id])
            source = source or _assigned_source(present[:, token_id], model_ids, base)
            defaults[token_id] = self._default(source, token_id, tensors, model_ids, positions, present)
        return defaults

    def _default(self, source: TokenSource, token_id, tensors, model_ids, positions, present):
        if source.kind == "zero":
            return tensors[0].new_zeros(tensors[0].shape[1:])
        if source.kind == "average":  # mergekit's order: from zero, model by model, then one division
            row = torch.zeros(tensors[0].shape[1:], dtype=tensors[0].dtype, device=tensors[0].device)
            count = 0
            for tensor, position, has in zip(tensors, positions, present[:, token_id], strict=True):
                if has:
                    row = row + tensor[position[token_id]]
                    count += 1
            row /= count
            return row
        # a source reading elsewhere, or a row that does not exist, was refused by _check_source and check_rows
        k = model_ids.index(source.model)
        if source.kind == "model":
            return tensors[k][positions[k][token_id]]
        return tensors[k][self._row_id(source)]

    def _row_id(self, source: TokenSource) -> int:
        """The row a `model_token` source names: its `token_id`, or its token's id in that model."""
        return source.token_id if source.token_id is not None else self.model_vocabs[source.model][source.token]


def _assigned_source(has: torch.Tensor, model_ids: list[int], base: int | None) -> TokenSource:
    """mergekit's default for a token some models lack: the one model that has it, zeros if none does,
    the base's row if the base has it, else the average of the models that have it."""
    count = int(has.sum())
    if count == 1:
        return TokenSource("model", model_ids[int(has.nonzero()[0])])
    if count == 0:
        return TokenSource("zero")
    if base is not None and base in model_ids and has[model_ids.index(base)]:
        return TokenSource("model", base)
    return TokenSource("average")


def _token_source(token: str, cfg, models: list[str]) -> TokenSource:
    """A `tokenizer.tokens` entry as a TokenSource (model names as indexes into `models`)."""

    def index(model: str) -> int:
        if model not in models:
            raise MergeInputError(f"tokenizer.tokens.{token}: {model} is not one of the merge's models; "
                                  f"name one of {', '.join(models)}")
        return models.index(model)

    source = cfg.source
    if source is None:
        return TokenSource("none", force=cfg.force)
    if isinstance(source, str):
        return TokenSource("model", index(source), force=cfg.force)
    if source.kind == "zero":
        return TokenSource("zero", force=cfg.force)
    return TokenSource("model_token", index(source.model), source.token_id, source.token, cfg.force)


def _rows(weights, tokenizer) -> int:
    return vocab_rows(weights.config) or tokenizer.vocab_size


def model_tokenizer(weights, vocab_size: int | None = None, label: str = "tokenizer", required: bool = False):
    """A model's tokenizer (an earlier chain stage's output tokenizer where it has one); None where it
    does not load, unless `required` (mergekit takes such a model to share the base's tokenizer)."""
    own = getattr(weights, "tokenizer", None)
    if own is not None:
        return own
    try:
        if not hasattr(weights, "folder"):
            raise MergeInputError(f"{label}: the model has no tokenizer")
        return load_tokenizer(weights.folder, vocab_size, label)
    except MergeInputError:
        if required:
            raise
        return None


def union_tokenizer(base, others: list[tuple]):
    """mergekit's `union`: the base's tokenizer, then every other model's tokens it lacks, the added
    (special) ones last with the settings the first model that has them gives them.

    `others` are (tokenizer, embedding rows) pairs; tokens past a model's rows are left out.
    """
    import transformers

    plain: dict[str, None] = {}
    added: dict = {}
    for tokenizer, rows in [(base, _rows_of(base)), *others]:
        for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if token_id < rows:
                plain.setdefault(token)
        for token_id, info in sorted(tokenizer.added_tokens_decoder.items()):
            if token_id < rows:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as folder:  # a copy: the base's own tokenizer stays as it is
        base.save_pretrained(folder)
        out = transformers.AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=remote_code_trusted())
    base_vocab = base.get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def _rows_of(tokenizer) -> int:
    return len(tokenizer.get_vocab())  # the base's tokenizer is stripped to its rows already


REMOTE_CODE_ENV = "MERGE_SEARCH_TRUST_REMOTE_CODE"


def trust_remote_code() -> None:
    """Let tokenizers run their repository's code (`--trust-remote-code`), in this process and its workers."""
    os.environ[REMOTE_CODE_ENV] = "1"


def remote_code_trusted() -> bool:
    return os.environ.get(REMOTE_CODE_ENV) == "1"


def load_tokenizer(folder: Path, vocab_size: int | None = None, label: str = "tokenizer"):
    """The tokenizer of `folder` as mergekit saves it; tokens with an id >= `vocab_size` removed.

    mergekit loads `tokenizer_source: base` this way (its `get_stripped_tokenizer`), and any
    donor tokenizer it cannot copy as files; `vocab_size` None keeps every token (a model named
    as tokenizer_source).
    """
    import transformers
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a refused load's warnings would come before its one line
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True,
                                                               trust_remote_code=remote_code_trusted())
    except Exception as exc:  # a missing or broken tokenizer is the user's to fix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "trust_remote_code" in str(exc):
            first = ("it runs its repository's code: allow that with --trust-remote-code, or in a study with "
                     "merge: {trust_remote_code: true}")
        raise MergeInputError(f"{label}: cannot load the tokenizer of {folder} ({first})") from None
    finally:
        hf_logging.set_verbosity(level)
    unused = [tok for tok, i in tokenizer.get_vocab().items() if vocab_size is not None and i >= vocab_size]
    if unused:
        tokenizer = _strip_tokens(tokenizer, vocab_size, unused, label)
    return tokenizer


def _strip_tokens(tokenizer, vocab_size: int, unused: list[str], label: str):
    """mergekit's get_stripped_tokenizer: drop tokens past the embedding (fast BPE tokenizers only)."""
    import tokenizers

    data = json.loads(tokenizer._tokenizer.to_str()) if tokenizer.is_fast else None
    if data is None or data["model"]["type"] != "BPE":
        raise MergeInputError(f"{label}: the tokenizer has {len(unused)} tokens past vocab_size {vocab_size} "
                              "and is not a fast BPE tokenizer, which mergekit cannot strip either; name a "
                              "model's folder as tokenizer_source, or remove tokenizer_source")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < vocab_size]
    gone = set(unused)
    for tok in unused:
        data["model"]["vocab"].pop(tok, None)
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if not gone.intersection(m.split(" ") if isinstance(m, str) else m)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer
