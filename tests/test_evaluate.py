"""Held-out NLL (owner/evaluate.py): the answer-line NLL counts exactly the answer line's tokens, from the same
forward pass as the response NLL."""

from __future__ import annotations

import pytest
import torch

from owner.evaluate import mean_response_nll, response_and_answer_nll
from tasks.datasets import Example
from tasks.prompts import IGNORE_INDEX, tokenize_examples
from tests.tiny_models import byte_tokenizer, tiny_model

EXAMPLES = [Example(f"What is {i} + {i}?", f"{i} + {i} = {2 * i}.\nThe answer is {2 * i}.") for i in range(5)]


def per_token_nll(model, item):
    """The NLL of each labelled token of one item, by hand (no batching, no padding)."""
    logits = model(input_ids=torch.tensor([item.input_ids])).logits[0, :-1].float()
    targets = torch.tensor(item.labels[1:])
    keep = targets != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none")


def test_answer_nll_is_the_mean_over_the_answer_line_tokens_only():
    model, tok = tiny_model("llama", n_layers=2), byte_tokenizer()
    full = tokenize_examples(EXAMPLES, tok, max_length=128, template="plain")
    answers = tokenize_examples(EXAMPLES, tok, max_length=128, template="plain", answer_line=True)
    nll, answer_nll = response_and_answer_nll(model, full, answers, tok.pad_token_id, batch_size=2)
    with torch.no_grad():
        every = torch.cat([per_token_nll(model, item) for item in full])
        answer = torch.cat([per_token_nll(model, item) for item in answers])
    assert nll == pytest.approx(float(every.mean()), rel=1e-5)
    assert answer_nll == pytest.approx(float(answer.mean()), rel=1e-5)
    assert len(answer) == sum(len(f"The answer is {2 * i}.") for i in range(5))  # one byte = one token
    assert answer_nll != pytest.approx(nll, rel=1e-3)
    assert mean_response_nll(model, full, tok.pad_token_id, batch_size=3) == pytest.approx(nll, rel=1e-6)
    assert response_and_answer_nll(model, full, None, tok.pad_token_id)[1] is None
    with pytest.raises(ValueError):
        response_and_answer_nll(model, full, answers[:2], tok.pad_token_id)
