"""Prompt templates and label masking: exactly the response and its end token carry labels."""

from __future__ import annotations

import logging

import pytest

from errors import ConfigError, DataError
from tasks.datasets import Example, load_examples
from tasks.prompts import (
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    TEMPLATES,
    end_token_id,
    format_prompt,
    format_prompts,
    tokenize_examples,
)
from tests.tiny_models import byte_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

EXAMPLES = [
    Example("What is 2 + 2?", "2 + 2 = 4.\nThe answer is 4."),
    Example("Name a colour.", "Blue"),
    Example("Translate 'chat' to English.", "Cat — a small feline."),  # non-ASCII bytes in the response
]


def chatml_tokenizer():
    """Byte tokenizer with a ChatML template whose end-of-turn token is a special token other than eos."""
    tok = byte_tokenizer()
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    return tok


def split_labels(item):
    """(prompt ids, labelled ids), checking the labels are a mask over a suffix of input_ids."""
    first = next(i for i, label in enumerate(item.labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in item.labels[:first])
    assert item.labels[first:] == item.input_ids[first:]
    assert len(item.labels) == len(item.input_ids)
    return item.input_ids[:first], item.labels[first:]


def test_template_names():
    assert set(TEMPLATES) == {"auto", "plain", "chat"}


def test_format_prompt_plain_and_auto():
    tok = byte_tokenizer()
    expected = "### Instruction:\nHi there\n\n### Response:\n"
    assert format_prompt("Hi there", tok, "plain") == expected == PLAIN_TEMPLATE.format(prompt="Hi there")
    assert format_prompt("Hi there", tok) == expected  # no chat template -> plain


def test_format_prompt_chat_and_auto():
    tok = byte_tokenizer(chat_template=True)
    assert format_prompt("Hi", tok, "chat") == "<s>user\nHi</s>\n<s>assistant\n"
    assert format_prompt("Hi", tok) == format_prompt("Hi", tok, "chat")
    assert format_prompt("Hi", tok, "plain").startswith("### Instruction:")
    assert format_prompts(["Hi", "Yo"], tok) == [format_prompt("Hi", tok), format_prompt("Yo", tok)]


def test_template_errors():
    with pytest.raises(ConfigError, match="unknown prompt template"):
        format_prompt("x", byte_tokenizer(), "alpaca")
    with pytest.raises(ConfigError, match="no chat template"):
        format_prompt("x", byte_tokenizer(), "chat")


def test_plain_labels_cover_response_and_eos():
    tok = byte_tokenizer()
    items = tokenize_examples(EXAMPLES, tok, max_length=512, template="plain")
    assert len(items) == len(EXAMPLES)
    for ex, item in zip(EXAMPLES, items, strict=True):
        prompt_ids, labelled = split_labels(item)
        assert tok.decode(prompt_ids) == format_prompt(ex.prompt, tok, "plain")
        assert labelled[-1] == tok.eos_token_id
        assert tok.decode(labelled) == ex.response + "</s>"


def test_chat_labels_cover_response_and_end_of_turn():
    tok = byte_tokenizer(chat_template=True)
    items = tokenize_examples(EXAMPLES, tok, max_length=512)
    for ex, item in zip(EXAMPLES, items, strict=True):
        prompt_ids, labelled = split_labels(item)
        assert tok.decode(prompt_ids) == f"<s>user\n{ex.prompt}</s>\n<s>assistant\n"
        assert prompt_ids[0] == tok.bos_token_id and prompt_ids[1] != tok.bos_token_id  # no doubled BOS
        assert tok.decode(labelled) == ex.response + "</s>"


def test_chat_end_token_is_the_templates_end_of_turn():
    tok = chatml_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tok.eos_token_id
    assert end_token_id(tok) == im_end
    assert end_token_id(tok, "plain") == tok.eos_token_id
    for ex, item in zip(EXAMPLES, tokenize_examples(EXAMPLES, tok, 512), strict=True):
        prompt_ids, labelled = split_labels(item)
        assert tok.decode(prompt_ids) == f"<|im_start|>user\n{ex.prompt}<|im_end|>\n<|im_start|>assistant\n"
        assert labelled[-1] == im_end
        assert tok.decode(labelled) == ex.response + "<|im_end|>"


def test_end_of_turn_that_is_not_a_special_token_falls_back_to_eos():
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    assert end_token_id(tok) == tok.eos_token_id
    _, labelled = split_labels(tokenize_examples(EXAMPLES[:1], tok, 512)[0])
    assert tok.decode(labelled) == EXAMPLES[0].response + "</s>"


def test_truncation_from_the_right():
    tok = byte_tokenizer()
    ex = Example("Q", "x" * 100)
    prompt_len = len(format_prompt("Q", tok, "plain").encode())
    [item] = tokenize_examples([ex], tok, max_length=prompt_len + 10, template="plain")
    assert len(item.input_ids) == prompt_len + 10
    _, labelled = split_labels(item)
    assert tok.decode(labelled) == "x" * 10  # response cut, end token gone with it


def test_examples_without_response_room_are_dropped(caplog):
    tok = byte_tokenizer()
    long_prompt = Example("p" * 300, "short")
    with caplog.at_level(logging.WARNING, logger="tasks.prompts"):
        items = tokenize_examples([long_prompt, EXAMPLES[1]], tok, max_length=100)
    assert len(items) == 1
    assert tok.decode(split_labels(items[0])[1]) == "Blue</s>"
    assert "dropped 1 of 2" in caplog.text
    with pytest.raises(DataError, match="no response token"):
        tokenize_examples([long_prompt], tok, max_length=100)


def test_a_drop_names_the_data_and_what_remains_for_its_use(caplog):
    tok = byte_tokenizer()
    data = [Example("p" * 300, "short")] * 13 + list(EXAMPLES[:3])
    with caplog.at_level(logging.WARNING, logger="tasks.prompts"):
        items = tokenize_examples(data, tok, max_length=100, what="--public-data dolly", use="alignment")
        tokenize_examples(data, tok, max_length=100, answer_line=True, warn=False)  # the same items: said once
    assert len(items) == 3 and len(caplog.records) == 1
    assert caplog.records[0].getMessage() == (
        "--public-data dolly: dropped 13 of 16 examples whose prompt leaves no response token within "
        "max_length=100; only 3 remain for alignment (raise --max-length to keep more)")
    with pytest.raises(DataError, match="^--eval-data x: all 1 examples"):
        tokenize_examples(data[:1], tok, max_length=100, what="--eval-data x")


def test_bad_arguments():
    tok = byte_tokenizer()
    with pytest.raises(DataError):
        tokenize_examples([], tok)
    with pytest.raises(ConfigError):
        tokenize_examples(EXAMPLES, tok, max_length=1)


def test_packaged_sample_tokenises_within_length():
    tok = byte_tokenizer(chat_template=True)
    examples = load_examples("dolly", limit=60)
    items = tokenize_examples(examples, tok, max_length=256)
    assert 0 < len(items) <= len(examples)
    assert all(len(it.input_ids) <= 256 for it in items)
    assert all(any(label != IGNORE_INDEX for label in it.labels[1:]) for it in items)


def labelled_text(tok, item):
    return tok.decode([label for label in item.labels if label != IGNORE_INDEX])


def test_answer_line_labels_only_the_last_line_and_match_the_plain_items():
    tok = byte_tokenizer()
    examples = [*EXAMPLES, Example("Sum?", "1 + 1 = 2.\n\nThe answer is 2.\n")]  # blank line, trailing newline
    full = tokenize_examples(examples, tok, max_length=512, template="plain")
    answer = tokenize_examples(examples, tok, max_length=512, template="plain", answer_line=True)
    assert [a.input_ids for a in answer] == [f.input_ids for f in full]  # the same items, in the same order
    assert [labelled_text(tok, a) for a in answer] == ["The answer is 4.", "Blue", "Cat — a small feline.",
                                                       "The answer is 2.\n"]
    for a, f in zip(answer, full, strict=True):  # a subset of the response's labels, never the end token
        kept = [i for i, label in enumerate(a.labels) if label != IGNORE_INDEX]
        assert all(f.labels[i] == a.labels[i] for i in kept) and f.input_ids[kept[-1] + 1] == tok.eos_token_id
    # cut off by max_length: the item stays (aligned with the plain list) with no answer label
    room = len(tok(format_prompt(EXAMPLES[0].prompt, tok, "plain"))["input_ids"]) + 4  # the worked line's start only
    short = tokenize_examples(EXAMPLES[:1], tok, max_length=room, template="plain", answer_line=True)
    assert len(short) == 1 and all(label == IGNORE_INDEX for label in short[0].labels)


def test_answer_line_with_a_token_across_the_newline():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    text = PLAIN_TEMPLATE.format(prompt="4") + "4.\nThe answer is 4."
    vocab = {ch: i for i, ch in enumerate(sorted(set(text) | {"<pad>", "</s>"}))}
    vocab[".\n"], vocab[".\nT"] = len(vocab), len(vocab) + 1  # a token across the end of the worked line
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[(".", "\n"),
                                                                                              (".\n", "T")])),
                                  pad_token="<pad>", eos_token="</s>")
    assert ".\nT" in tok.convert_ids_to_tokens(tok("4.\nThe")["input_ids"])
    (item,) = tokenize_examples([Example("4", "4.\nThe answer is 4.")], tok, max_length=64, template="plain",
                                answer_line=True)
    assert labelled_text(tok, item).replace(" ", "") == ".\nTheansweris4."  # the straddling token counts
