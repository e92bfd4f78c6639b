"""A model whose forward pass gives NaN/Inf fails scoring instead of getting a score."""

from __future__ import annotations

import copy

import pytest
import torch

from objectives import Suite, TaskSpec
from objectives.errors import NonFiniteOutput


@pytest.fixture(scope="module")
def broken(model):
    """The tiny model with a NaN in its final norm: every logit is NaN, argmax still picks a choice."""
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.model.norm.weight[0] = float("nan")
    return bad


@pytest.mark.parametrize("task", ["tiny_mc", "tiny_gen"])
def test_nan_logits_raise_on_the_first_batch(tokenizer, task_dir, model, broken, task):
    suite = Suite.build([TaskSpec(task, search_items=8)], tokenizer, [task_dir], max_length=512)
    assert len(list(suite.run(model, batch_size=4))) == 8  # the healthy model scores
    with pytest.raises(NonFiniteOutput, match="NaN/Inf"):
        next(iter(suite.run(broken, batch_size=4)))
