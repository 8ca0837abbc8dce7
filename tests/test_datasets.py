"""Loaders: the packaged samples, each record layout from files written here, and every error case."""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

import pytest

from errors import ConfigError, DataError
from tasks.datasets import SAMPLES, Example, gsm8k_final_answer, load_examples

GSM = {"question": "Tom has 3 apples and buys 1,077 more. How many?",
       "answer": "3 + 1077 = <<3+1077=1080>>1080\n#### 1,080"}
DOLLY = [
    {"instruction": "Who wrote Hamlet?", "context": "", "response": "Shakespeare.", "category": "open_qa"},
    {"instruction": "Summarise.", "context": "A long text.", "response": "Short.",
     "category": "summarization"},
]
ALPACA = [
    {"instruction": "Reverse a list in Python.", "input": "", "output": "xs[::-1]"},
    {"instruction": "Sum the numbers.", "input": "[1, 2]", "output": "sum([1, 2])"},
]


def write_jsonl(path: Path, records: list, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


# ------------------------------------------------------------------ packaged samples
def test_gsm8k_samples_load_with_answer_sentence():
    train, test = load_examples("gsm8k-train"), load_examples("gsm8k-test")
    assert (len(train), len(test)) == (400, 200)
    for ex in train + test:
        assert "####" not in ex.response
        last = ex.response.rsplit("\n", 1)[-1]
        assert last.startswith("The answer is ") and last.endswith(".")
        assert ex.category is None and ex.prompt


def test_dolly_sample_has_all_categories():
    examples = load_examples("dolly")
    assert len(examples) == 400
    categories = {ex.category for ex in examples}
    assert len(categories) == 8 and "creative_writing" in categories
    assert all(len(ex.prompt) + len(ex.response) < 1200 + len("\n\n") for ex in examples)


def test_codealpaca_sample_loads_as_alpaca():
    examples = load_examples("codealpaca")
    assert len(examples) == 200
    assert all(ex.response.strip() and ex.category is None for ex in examples)


def test_fixtures_are_small_and_licensed():
    folder = resources.files("tasks") / "fixtures"
    total = sum(Path(str(folder / name)).stat().st_size for name in SAMPLES.values())
    assert total < 1_500_000
    for dataset in ("gsm8k", "dolly", "codealpaca"):
        assert (folder / f"LICENSE-{dataset}.txt").is_file()
        assert (folder / f"SOURCE-{dataset}.txt").read_text(encoding="utf-8").strip()


def test_limit_keeps_first_records():
    assert load_examples("dolly", limit=5) == load_examples("dolly")[:5]


# ------------------------------------------------------------------ record layouts
def test_gsm8k_hashes_become_answer_sentence(tmp_path):
    [ex] = load_examples(write_jsonl(tmp_path / "g.jsonl", [GSM]))
    assert ex == Example(GSM["question"], "3 + 1077 = <<3+1077=1080>>1080\nThe answer is 1,080.")
    assert gsm8k_final_answer(GSM["answer"]) == "1080"


def test_gsm8k_final_answer_needs_marker():
    with pytest.raises(DataError, match="####"):
        gsm8k_final_answer("no final line")


def test_dolly_prompt_includes_nonempty_context(tmp_path):
    first, second = load_examples(write_jsonl(tmp_path / "d.jsonl", DOLLY), kind="dolly")
    assert first == Example("Who wrote Hamlet?", "Shakespeare.", "open_qa")
    assert second.prompt == "Summarise.\n\nA long text." and second.category == "summarization"


def test_alpaca_json_list_and_gzip(tmp_path):
    plain = tmp_path / "a.json"
    plain.write_text(json.dumps(ALPACA, indent=2), encoding="utf-8")
    packed = tmp_path / "a.json.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as fh:
        json.dump(ALPACA, fh)
    for path in (plain, packed):
        first, second = load_examples(path)
        assert first == Example("Reverse a list in Python.", "xs[::-1]")
        assert second.prompt == "Sum the numbers.\n\n[1, 2]"


def test_gzipped_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl.gz", [GSM, GSM], opener=gzip.open)
    assert len(load_examples(str(path), kind="gsm8k")) == 2


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(DOLLY[0]) + "\n\n" + json.dumps(DOLLY[1]) + "\n", encoding="utf-8")
    assert [ex.category for ex in load_examples(path)] == ["open_qa", "summarization"]


# ------------------------------------------------------------------ errors
def test_missing_file_names_path(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl")


def test_bad_json_line_is_numbered(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GSM) + "\n" + json.dumps(GSM) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: line 3: invalid JSON"):
        load_examples(path)


def test_bad_json_list_reports_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json: line 3: invalid JSON"):
        load_examples(path)


def test_missing_field_names_record(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [GSM, {"question": "only a question"}])
    with pytest.raises(DataError, match=r"g.jsonl: line 2: missing field 'answer'"):
        load_examples(path)


def test_explicit_kind_checks_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOLLY)
    with pytest.raises(DataError, match=r"line 1: missing field 'question', 'answer'"):
        load_examples(path, kind="gsm8k")


def test_gsm8k_answer_without_marker(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(DataError, match=r"line 1: no '####' line"):
        load_examples(path)


def test_wrong_field_type(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": 3}])
    with pytest.raises(DataError, match="field 'output' must be a string"):
        load_examples(path)


@pytest.mark.parametrize("field, value", [("category", ["open_qa"]), ("category", 3), ("context", {"a": 1})])
def test_wrong_optional_field_type(tmp_path, field, value):
    """A list category would otherwise crash the by-category split far from the file."""
    path = write_jsonl(tmp_path / "d.jsonl", [DOLLY[0], {**DOLLY[1], field: value}])
    with pytest.raises(DataError, match=f"line 2: field '{field}' must be a string or null"):
        load_examples(path)
    assert load_examples(write_jsonl(tmp_path / "ok.jsonl", [{**DOLLY[0], "context": None}]))[0].prompt


def test_non_object_record(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([ALPACA[0], "text"]), encoding="utf-8")
    with pytest.raises(DataError, match="record 2: expected a JSON object"):
        load_examples(path)


def test_undetectable_kind(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="cannot tell the data kind"):
        load_examples(path)


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl: holds no records"):
        load_examples(path)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read file"):
        load_examples(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples(path)


def test_unknown_kind_and_bad_limit():
    with pytest.raises(DataError, match="unknown data kind 'csv'"):
        load_examples("dolly", kind="csv")
    with pytest.raises(ConfigError):
        load_examples("dolly", limit=0)


def test_hub_source_is_a_clear_error():
    with pytest.raises(DataError, match="hub"):
        load_examples("hub:openai/gsm8k:main:train")
