"""Our tokenisation equals HFLM's, and the engine's responses equal lm-eval's per request."""

from __future__ import annotations

import random

import pytest

from objectives.engine import Engine, GenItem, LLItem
from objectives.requests import Tokenisation, common_prefix, item_prefix, postprocess

from .conftest import _corpus, build_data, build_tokenizer

PAIRS = [
    ("The cat likes to eat", " fish."),
    ("The cat likes to eat ", "fish."),  # trailing space moves to the continuation
    ("Question: What is 3 plus 4?\nAnswer:", " 3 plus 4 is 7."),
    ("Q: What?\nA:  \n", "It eats moss."),  # trailing newline and spaces
    ("", "The dog likes bones."),  # empty context: prefix token
    ("<s>The owl", " eats mice."),  # text already starting with BOS
    ("At night the hungry emu wants", " some bugs."),
]
CONTEXTS = ["Question: What is 1 plus 2?\nAnswer:", "<s>Question: x", "short", "The cat likes to eat " * 30]


def no_bos_tokenizer():
    """A GPT-2-like tokenizer: BOS = EOS, no special tokens added by encode."""
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer(_corpus(build_data(), random.Random(1)))
    raw = base.backend_tokenizer
    raw.post_processor = None
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="</s>", eos_token="</s>")


@pytest.fixture(params=["bos", "no_bos"])
def hflm_and_tok(request, model, model_dir):
    """An HFLM around the fixture model with a tokenizer of each flavour; our Tokenisation of the same."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir) if request.param == "bos" else no_bos_tokenizer()
    lm = HFLM(pretrained=model, tokenizer=tok, max_length=48, batch_size=1)
    return lm, Tokenisation(lm.tokenizer, max_length=48)


def test_loglikelihood_tokens_match_hflm(hflm_and_tok):
    lm, tok = hflm_and_tok
    seen = []
    lm._loglikelihood_tokens = lambda reqs, **_: seen.extend(reqs) or [(0.0, True)] * len(reqs)

    class Req:  # lm-eval reads only `.args`
        def __init__(self, args):
            self.args = args

    lm.loglikelihood([Req(p) for p in PAIRS], disable_tqdm=True)
    for (context, continuation), (_, ctx_enc, cont_enc) in zip(PAIRS, seen, strict=True):
        assert tok.encode_pair(context, continuation) == (ctx_enc, cont_enc)
        req = tok.loglikelihood(context, continuation)
        # HFLM feeds (ctx + cont)[-(max_length + 1):][:-1] and scores the last len(cont) positions
        assert list(req.feed) == (ctx_enc + cont_enc)[-(lm.max_length + 1) :][:-1]
        assert list(req.tokens[-req.n_cont :]) == cont_enc


def test_generation_context_matches_hflm(hflm_and_tok):
    lm, tok = hflm_and_tok
    for context in CONTEXTS:
        req = tok.generation(context, {"until": ["\n\n"], "max_gen_toks": 16}, "t")
        ids, _ = lm.tok_batch_encode([context], left_truncate_len=lm.max_length - 16)
        assert list(req.context) == ids[0].tolist()
        assert req.until == ("\n\n", lm.tok_decode(lm.eot_token_id, skip_special_tokens=False))
        assert req.max_gen_toks == 16


def test_prefix_helpers():
    assert common_prefix([(1, 2, 3), (1, 2, 4), (1, 2)]) == 2
    assert common_prefix([]) == 0
    tok_reqs = [
        type("R", (), {"feed": (5, 6, 7, 8), "scored_from": 2})(),
        type("R", (), {"feed": (5, 6, 7, 9), "scored_from": 3})(),
    ]
    assert item_prefix(tok_reqs) == 2  # never past the first scored position
    assert postprocess("a b\n\nQuestion: c", ["Question:", "\n\n"]) == "a b"


def test_engine_matches_lm_eval_responses(model, tokenizer, model_dir, task_dir):
    """Per request: log-likelihoods within float32 noise, the same greedy flags and generated texts."""
    from .test_parity import simple_evaluate

    ref = simple_evaluate(
        model_dir, task_dir, ["tiny_mc", "tiny_wino", "tiny_gen"], limit=8, log_samples=True
    )
    tok = Tokenisation(tokenizer, 512)
    engine = Engine(model, tokenizer, batch_size=3)
    for task in ("tiny_mc", "tiny_wino"):
        samples = ref["samples"][task]
        items = []
        for s in samples:
            reqs = tuple(tok.loglikelihood(c, x) for c, x in s["arguments"])
            items.append(LLItem(task, (), item_prefix(reqs), reqs))
        for s, got in zip(samples, engine.loglikelihood(items), strict=True):
            want = [r[0] for r in s["resps"]]
            assert [g[1] for g in got] == [bool(w[1]) for w in want]
            assert [g[0] for g in got] == pytest.approx([float(w[0]) for w in want], abs=1e-4)
    samples = [s for s in ref["samples"]["tiny_gen"] if s["filter"] == "strict-match"]
    items = [
        GenItem("gen", (), tok.generation(c, dict(k), "tiny_gen"))
        for c, k in (s["arguments"][0] for s in samples)
    ]
    assert engine.generate(items) == [s["resps"][0][0] for s in samples]
    assert engine.forward_calls > 0 and engine.forward_seconds > 0
