"""GSM8K prompt, answer extraction and scoring."""

from __future__ import annotations

import json
import re

import pytest

from errors import ConfigError, DataError
from tasks.gsm8k import (
    FEW_SHOT,
    STOP_STRINGS,
    answers_match,
    build_prompt,
    evaluate_gsm8k,
    extract_answer,
    ground_truth,
    truncate_at_stop,
)
from tests.tiny_models import byte_tokenizer, tiny_model


def test_eight_exemplars_each_ending_with_its_answer():
    assert len(FEW_SHOT) == 8
    for question, answer in FEW_SHOT:
        assert question.endswith("?")
        stated = re.fullmatch(r".*The answer is (\d+)\.", answer, re.DOTALL).group(1)
        assert extract_answer(answer) == stated


def test_prompt_format():
    prompt = build_prompt("  How many legs do 3 cats have? ", n_shots=8)
    assert prompt.startswith("Q: There are 15 trees in the grove.")
    assert prompt.endswith("\n\nQ: How many legs do 3 cats have?\nA:")
    assert prompt.count("Q: ") == 9 and prompt.count("\nA: ") == 8
    assert build_prompt("What is 1+1?", n_shots=0) == "Q: What is 1+1?\nA:"
    two = build_prompt("What is 1+1?", n_shots=2)
    assert two.count("The answer is") == 2 and "parking lot" in two and "Leah" not in two
    with pytest.raises(ConfigError):
        build_prompt("x", n_shots=9)


def test_no_exemplar_trips_the_stop_strings():
    """The few-shot block must not look like "the next question" inside an answer."""
    for _, answer in FEW_SHOT:
        assert truncate_at_stop(" " + answer) == " " + answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" Natalia sold 48/2 = 24 clips in May. 48 + 24 = 72. The answer is 72.", "72"),
        (" The answer is 1,234.", "1234"),
        (" It costs $1,234.50 in total. The answer is $1,234.50.", "1234.5"),
        (" The temperature fell 12 degrees to -7. The answer is -7.", "-7"),
        (" He lost money: the answer is -$15.", "-15"),
        (" Each costs 0.25, so 4 * 0.25 = 1.00. The answer is 1.00.", "1"),
        (" The answer is 5.0", "5"),
        (" Half of 7 is 3.5. The answer is 3.5 pounds.", "3.5"),
        (" The answer is .75", "0.75"),
        (" 10 - 3 = 7", "7"),  # a minus between numbers is not a sign
        (" 1,000,000 / 4 = 250,000 dollars each.", "250000"),  # no trigger: the last number
        (" She has 23 - 15 = 8 dollars left", "8"),
        (" THE ANSWER IS 12 and later 13", "12"),  # first number after the trigger, case ignored
        (" The answer is 6.\n\nQ: Tom has 40 apples and eats 2. A: 40 - 2 = 38. The answer is 38.", "6"),
        (" So she has 8 left.\nQ: A farmer has 120 cows. How many legs?", "8"),  # run-on, no trigger
        (" 5 + 4 = 9 apples. Question: what about 11 pears?", "9"),
        (" The answer is: unclear. Perhaps 17 or 18", "17"),  # the first number after the trigger
        (" I do not know.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_truncate_at_stop_uses_the_question_markers():
    assert set(STOP_STRINGS) >= {"\n\nQ:", "\nQ:"}
    assert truncate_at_stop("A: 4 + 4 = 8.\n\nQ: next one") == "A: 4 + 4 = 8."
    assert truncate_at_stop("no marker here") == "no marker here"


@pytest.mark.parametrize(
    ("pred", "truth", "same"),
    [("5", "5", True), ("5.0", "5", True), ("5.50", "5.5", True), ("1,000", "1000", True),
     ("-3", "-3", True), ("-3", "3", False), ("0.5", ".5", True), ("7", "8", False),
     (None, "5", False), ("five", "5", False), ("5", None, False)],
)
def test_answers_match(pred, truth, same):
    assert answers_match(pred, truth) is same


def test_ground_truth():
    field = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
             "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72")
    assert ground_truth(field) == "72"
    assert ground_truth("Lots of steps\n#### 1,600") == "1600"
    assert ground_truth("#### -5") == "-5"
    assert ground_truth("18") == "18"  # already a bare answer
    with pytest.raises(DataError):
        ground_truth("no answer ####   ")


def test_evaluate_gsm8k_records_are_consistent():
    model, tok = tiny_model("llama", n_layers=2), byte_tokenizer()
    data = [
        {"question": "Ann has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"},
        ("Bob has 1,000 coins and spends 1. How many are left?", "#### 999"),
        ("Unused question", "#### 1"),
    ]
    result = evaluate_gsm8k(model, tok, data, n_shots=1, batch_size=2, max_new_tokens=6, limit=2,
                            progress=False)
    assert result["n"] == 2 and len(result["records"]) == 2
    assert [r["truth"] for r in result["records"]] == ["5", "999"]
    for record in result["records"]:
        assert record["prediction"] == extract_answer(record["generation"])
        assert record["correct"] == answers_match(record["prediction"], record["truth"])
    assert result["n_correct"] == sum(r["correct"] for r in result["records"])
    assert result["accuracy"] == result["n_correct"] / 2
    json.dumps(result)  # results are written as JSON
    with pytest.raises(DataError):
        evaluate_gsm8k(model, tok, [], progress=False)
