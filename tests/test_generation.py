"""Batched generation: order, padding, stop strings, seeded sampling, progress bar."""

from __future__ import annotations

import pytest
import torch

from errors import ConfigError
from tasks.generation import StopOnStrings, generate_batched, truncate_at_stop
from tests.tiny_models import byte_tokenizer, tiny_model

# Prompts of different lengths, so that batches need left padding.
PROMPTS = ["Q: What is 2+2?\nA:", "Hello", "The quick brown fox jumps over", "x", "Numbers: 1, 2, 3,"]


@pytest.fixture(scope="module")
def model():
    # Untied embeddings give varied (not copy-the-last-byte) random continuations.
    return tiny_model("qwen2", n_layers=2, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_truncate_at_stop_cuts_at_the_earliest_stop():
    text = "The answer is 6.\nQ: next\n\nQ: later"
    assert truncate_at_stop(text, ["\n\nQ:", "\nQ:"]) == "The answer is 6."
    assert truncate_at_stop(text, ["later", "next"]) == "The answer is 6.\nQ: "
    assert truncate_at_stop(text, ["absent"]) == text
    assert truncate_at_stop(text, []) == text
    assert truncate_at_stop(text, [""]) == text


def test_stop_criterion_marks_only_rows_whose_new_text_holds_a_stop(tokenizer):
    prompt_len = 3
    rows = ["abcxyz\nQ:", "abcxyz..."]
    ids = torch.tensor([tokenizer(r)["input_ids"] for r in rows])
    done = StopOnStrings(tokenizer, prompt_len, ["\nQ:"])(ids, None)
    assert done.dtype == torch.bool and done.tolist() == [True, False]
    # A stop string inside the prompt part does not count.
    assert StopOnStrings(tokenizer, 9, ["abc"])(ids, None).tolist() == [False, False]


def test_outputs_keep_prompt_order_and_batching_does_not_change_greedy_text(model, tokenizer):
    batched = generate_batched(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, progress=False)
    single = [generate_batched(model, tokenizer, [p], max_new_tokens=12, batch_size=1, progress=False)[0]
              for p in PROMPTS]
    assert len(batched) == len(PROMPTS)
    assert batched == single
    assert len(set(batched)) > 1  # the prompts really lead to different continuations


def test_generation_stops_at_a_stop_string_the_model_produces(model, tokenizer):
    prompt = PROMPTS[0]
    free = generate_batched(model, tokenizer, [prompt], max_new_tokens=40, batch_size=1, progress=False)[0]
    # A two-character stop string taken from the model's own output, late enough to leave a prefix.
    candidates = [free[i:i + 2] for i in range(3, 20) if "\ufffd" not in free[i:i + 2]]
    stop = next(c for c in candidates if free.find(c) >= 3)
    expected = free[:free.find(stop)]

    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        stopped = generate_batched(model, tokenizer, [prompt], max_new_tokens=40, batch_size=1,
                                   stop_strings=[stop], progress=False)[0]
    finally:
        handle.remove()
    assert stopped == expected and len(stopped) >= 3
    assert len(calls) < 40  # generation ended early instead of being cut afterwards only


def test_each_sequence_stops_on_its_own_and_others_continue(model, tokenizer):
    free = generate_batched(model, tokenizer, PROMPTS[:2], max_new_tokens=16, batch_size=2, progress=False)
    stop = free[0][2:4]
    out = generate_batched(model, tokenizer, PROMPTS[:2], max_new_tokens=16, batch_size=2,
                           stop_strings=[stop], progress=False)
    assert out[0] == truncate_at_stop(free[0], [stop])
    assert out[1] == truncate_at_stop(free[1], [stop])


def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(model, tokenizer):
    state = torch.get_rng_state()
    a = generate_batched(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=2, greedy=False,
                         temperature=1.0, seed=7, progress=False)
    b = generate_batched(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=2, greedy=False,
                         temperature=1.0, seed=7, progress=False)
    c = generate_batched(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=2, greedy=False,
                         temperature=1.0, seed=8, progress=False)
    assert a == b and a != c
    assert torch.equal(torch.get_rng_state(), state)


def test_progress_bar_goes_to_stderr_only_when_asked(model, tokenizer, capsys):
    generate_batched(model, tokenizer, PROMPTS[:2], max_new_tokens=2, batch_size=2, desc="tiny-gen")
    captured = capsys.readouterr()
    assert "tiny-gen" in captured.err and captured.out == ""
    generate_batched(model, tokenizer, PROMPTS[:2], max_new_tokens=2, batch_size=2, progress=False,
                     desc="tiny-gen")
    assert "tiny-gen" not in capsys.readouterr().err


def test_tokenizer_without_pad_token_pads_with_eos(model):
    tok = byte_tokenizer()
    expected = generate_batched(model, tok, PROMPTS, max_new_tokens=6, batch_size=3, progress=False)
    tok.pad_token = None
    assert tok.pad_token_id is None
    assert generate_batched(model, tok, PROMPTS, max_new_tokens=6, batch_size=3, progress=False) == expected


def test_bad_arguments(model, tokenizer):
    assert generate_batched(model, tokenizer, [], max_new_tokens=4, batch_size=2) == []
    with pytest.raises(ConfigError):
        generate_batched(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=0)
    with pytest.raises(ConfigError):
        generate_batched(model, tokenizer, PROMPTS, max_new_tokens=0, batch_size=2)
    with pytest.raises(ConfigError):
        generate_batched(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=2, greedy=False,
                         temperature=0.0)
