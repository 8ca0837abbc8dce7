"""GSM8K accuracy: 8-shot chain-of-thought prompting and numeric answer extraction.

Follows the reference evaluation (the answer is the first number after "The answer is", else the last
number; ground truth after "####", commas removed) with one fix: generation stops at the next question
marker, because models otherwise run on into new questions and answers whose numbers would be read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation

from errors import ConfigError, DataError
from tasks.generation import generate_batched
from tasks.generation import truncate_at_stop as _truncate
from tasks.prompts import format_prompts, resolve_template

# The eight chain-of-thought exemplars of Wei et al. (2022), used for GSM8K ever since.
FEW_SHOT: tuple[tuple[str, str], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
     "done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
     "have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in "
     "total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After "
     "eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many "
     "lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny "
     "20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does "
     "he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from "
     "monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How "
     "many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing "
     "2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
     "dollars left. 23 - 15 is 8. The answer is 8."),
)

# Where the model starts a new question: generation stops there and the text is cut there.
STOP_STRINGS: tuple[str, ...] = ("\n\nQ:", "\nQ:", "Question:")
TRIGGER = "The answer is"

# A number: an optional sign (a "-" directly before the digits or "$" and not after a word character
# or a closing bracket, where it is a minus or a hyphen), an optional "$", then digits with optional
# thousands commas and decimals, or a bare ".5"; never starting in the middle of another number.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])(?P<sign>-))?(?:\$\s?)?(?<![\d.])"
    r"(?P<num>\d+(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
_TRIGGER = re.compile(re.escape(TRIGGER), re.IGNORECASE)


def build_prompt(question: str, n_shots: int = 8) -> str:
    """The few-shot "Q: ... / A: ..." prompt ending with the question and "A:"."""
    if not 0 <= n_shots <= len(FEW_SHOT):
        raise ConfigError(f"n_shots must be in 0..{len(FEW_SHOT)}, got {n_shots}")
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in FEW_SHOT[:n_shots])
    return f"{shots}Q: {question.strip()}\nA:"


def truncate_at_stop(text: str, stop_strings: Sequence[str] = STOP_STRINGS) -> str:
    """`text` cut before the next question marker."""
    return _truncate(text, stop_strings)


def _canonical(sign: str | None, digits: str) -> str | None:
    """"1,234.50" -> "1234.5", "5.0" -> "5", "-0" -> "0"; None if not a number."""
    try:
        value = Decimal(digits.replace(",", ""))
    except InvalidOperation:
        return None
    if sign:
        value = -value
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUMBER.finditer(text):
        number = _canonical(m.group("sign"), m.group("num"))
        if number is not None:
            out.append(number)
    return out


def extract_answer(text: str) -> str | None:
    """The predicted number of a generation: the first number after "The answer is" (case ignored),
    else the last number in the text; both after cutting at the next question. Commas, "$" and
    trailing zeros are dropped ("$1,234.50" -> "1234.5"). None when there is no number."""
    text = truncate_at_stop(text)
    for trigger in _TRIGGER.finditer(text):
        after = _numbers(text[trigger.end():])
        if after:
            return after[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def _to_decimal(value: str | None) -> Decimal | None:
    if value is None:
        return None
    cleaned = value.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def answers_match(pred: str | None, truth: str | None) -> bool:
    """Numeric equality ("5.0" matches "5", "1,000" matches "1000"); False when either is missing or
    not a number."""
    a, b = _to_decimal(pred), _to_decimal(truth)
    if a is None or b is None or not a.is_finite() or not b.is_finite():
        return False
    return a == b


def ground_truth(answer_field: str) -> str:
    """The reference answer of a GSM8K record: the text after "####", commas removed (normalised like
    predictions when it is a number). A field without "####" is taken as the bare answer."""
    tail = answer_field.rsplit("####", 1)[-1].strip()
    if not tail:
        raise DataError(f"GSM8K answer has nothing after '####': {answer_field[-80:]!r}")
    numbers = _numbers(tail)
    if len(numbers) == 1 and _NUMBER.fullmatch(tail.rstrip(".")):
        return numbers[0]
    return tail.replace(",", "")


def _pair(item) -> tuple[str, str]:
    """(question, answer field) from a pair, a GSM8K record dict, or an Example (prompt, response)."""
    if isinstance(item, Mapping):
        if "question" in item and "answer" in item:
            return str(item["question"]), str(item["answer"])
        raise DataError("a GSM8K record needs 'question' and 'answer' fields")
    if hasattr(item, "prompt") and hasattr(item, "response"):
        return str(item.prompt), str(item.response)
    question, answer = item
    return str(question), str(answer)


def evaluate_gsm8k(
    model,
    tokenizer,
    questions_answers: Iterable,
    *,
    n_shots: int = 8,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    limit: int | None = None,
    progress: bool = True,
    template: str | None = None,
) -> dict:
    """Accuracy of greedy n-shot chain-of-thought answers.

    `template`: None = the raw n-shot "Q: / A:" text; a prompt template name ("auto", "chat", "plain") = the bare
    question in the template the adapters were trained with (zero-shot, as a fine-tuned model is used).

    `questions_answers` holds (question, answer) pairs, GSM8K records ``{"question", "answer"}`` or
    Examples; answers are GSM8K answer fields (with "####") or bare numbers. Returns a JSON-ready dict
    with accuracy, counts, settings and per-item records.
    """
    pairs = [_pair(item) for item in questions_answers]
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be at least 1, got {limit}")
        pairs = pairs[:limit]
    if not pairs:
        raise DataError("no GSM8K questions to evaluate")
    if template is None:
        prompts = [build_prompt(q, n_shots) for q, _ in pairs]
    else:
        prompts = format_prompts([q.strip() for q, _ in pairs], tokenizer, template)
        template, n_shots = resolve_template(tokenizer, template), 0
    generations = generate_batched(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, stop_strings=STOP_STRINGS, greedy=True,
                                   progress=progress, desc="gsm8k")
    records = []
    for (question, answer), generation in zip(pairs, generations, strict=True):
        truth = ground_truth(answer)
        prediction = extract_answer(generation)
        records.append({
            "question": question,
            "truth": truth,
            "prediction": prediction,
            "correct": answers_match(prediction, truth),
            "generation": generation,
        })
    n_correct = sum(r["correct"] for r in records)
    return {
        "accuracy": n_correct / len(records),
        "n": len(records),
        "n_correct": n_correct,
        "n_shots": n_shots,
        "prompt": f"{n_shots}-shot text" if template is None else f"training template ({template})",
        "max_new_tokens": max_new_tokens,
        "records": records,
    }
