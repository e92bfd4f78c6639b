"""`tokenizer_source`: the tokenizer a merge writes, and how many embedding rows it keeps.

mergekit-yaml loads the output tokenizer (the base's without tokens past its embedding for
`base`, a named model's as it is), then rebuilds every vocabulary-indexed tensor (embeddings,
lm_head weight and bias) with one row per token of it, taken from each model's row of that token,
and merges those. When every token sits at the same id in every model and the ids are 0..n-1,
that rebuild is the first n rows of each input, bit for bit: a padded vocabulary such as phi-2's
(50,295 tokens, 51,200 rows) is cut to the tokenizer. merge-search does exactly that cut; a
tokenizer that would move, add or average rows is refused in one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from merge_core.errors import MergeInputError
from merge_core.refs import resolve

# Tensors indexed by token id (mergekit's `vocabulary_axis: 0`), when their first dim is the vocabulary.
VOCABULARY_PATTERN = re.compile(r"(embed_tokens|word_embeddings|(^|\.)wte\.|(^|\.)embed\.|(^|\.)lm_head\.|"
                                r"embed_out|(^|\.)output\.)")


class OutputVocabulary:
    """The tokenizer `tokenizer_source` names, checked against every model; `rows` to keep (None: all)."""

    def __init__(self, source: str, models: list[str], weights: list, reference, allow_pickle: bool = False):
        self.label = f"tokenizer_source: {source}"
        folder = reference.folder if source == "base" else resolve(source, allow_pickle)
        strip_past = reference.config.get("vocab_size") if source == "base" else None
        self.tokenizer = load_tokenizer(folder, strip_past, self.label)
        vocab = self.tokenizer.get_vocab()
        self.size = len(vocab)
        if sorted(vocab.values()) != list(range(self.size)):
            raise MergeInputError(f"{self.label}: its token ids are not 0..{self.size - 1}; mergekit would "
                                  "rebuild the embeddings for it, which merge-search does not do; remove "
                                  "tokenizer_source to keep the models' vocabulary")
        for model, w in zip(models, weights, strict=True):
            # the source's own model has every token at its id (stripping only drops ids past its rows)
            own = vocab if Path(getattr(w, "folder", "")) == Path(folder) else _own_vocab(w, vocab)
            self._check_same_ids(model, w, vocab, own)
        rows = {w.config.get("vocab_size") for w in weights}
        self.rows = self.size if rows - {None, self.size} else None

    def _check_same_ids(self, model: str, weights, vocab: dict, own: dict) -> None:
        rows = weights.config.get("vocab_size")
        moved = [t for t, i in vocab.items() if own.get(t) != i]
        if moved or (rows is not None and rows < self.size):
            what = (f"{len(moved)} of its tokens ({moved[0]!r}...) sit at other ids in {model}" if moved
                    else f"it has {self.size} tokens but {model} has only {rows} embedding rows")
            raise MergeInputError(f"{self.label}: {what}; mergekit would rebuild the embeddings for it, which "
                                  "merge-search does not do; remove tokenizer_source to keep the models' vocabulary")

    def cuts(self, name: str, shape: tuple[int, ...], model_rows: int | None) -> bool:
        """Whether the non-layer tensor `name` of `shape`, in a model of `model_rows` embedding rows, is
        cut to the tokenizer's rows."""
        return (self.rows is not None and len(shape) >= 1 and shape[0] == model_rows
                and VOCABULARY_PATTERN.search(name) is not None)


def _own_vocab(weights, vocab: dict) -> dict:
    """A model's own token ids; the output's when its tokenizer does not load or it has no folder
    (mergekit too takes such a model to share the base's)."""
    if not hasattr(weights, "folder"):
        return vocab
    try:
        return load_tokenizer(weights.folder).get_vocab()
    except MergeInputError:
        return vocab


def load_tokenizer(folder: Path, vocab_size: int | None = None, label: str = "tokenizer"):
    """The tokenizer of `folder` as mergekit saves it; tokens with an id >= `vocab_size` removed.

    mergekit loads `tokenizer_source: base` this way (its `get_stripped_tokenizer`), and any
    donor tokenizer it cannot copy as files; `vocab_size` None keeps every token (a model named
    as tokenizer_source).
    """
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as exc:  # a missing or broken tokenizer is the user's to fix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MergeInputError(f"{label}: cannot load the tokenizer of {folder} ({first})") from None
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
