"""Loaders: the packaged samples, each record layout from files written here, and every error case."""

from __future__ import annotations

import gzip
import json
import socket
import time
from importlib import resources
from pathlib import Path

import pytest

from errors import ConfigError, DataError
from tasks import hf_sources
from tasks.columns import ColumnMap
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


# ------------------------------------------------------------------ other formats (the `datasets` library)
TABLE = {"question_text": ["What is 2 + 2?", "Spell 007.", "Say NA."], "gold": ["4", "007", "NA"],
         "passage": ["", "Bond.", ""], "topic": ["math", "spelling", "open_qa"]}
TABLE_COLUMNS = "prompt=question_text,response=gold,context=passage,category=topic"
TABLE_EXAMPLES = [Example("What is 2 + 2?", "4", "math"), Example("Spell 007.\n\nBond.", "007", "spelling"),
                  Example("Say NA.", "NA", "open_qa")]


def _frame(records):
    import pandas as pd

    return pd.DataFrame(records)


def test_csv_and_tsv_with_column_mapping(tmp_path):
    """Every cell is text: '007' keeps its zeros, 'NA' is an answer, only an empty cell is missing."""
    _frame(TABLE).to_csv(tmp_path / "t.csv", index=False)
    _frame(TABLE).to_csv(tmp_path / "t.tsv", index=False, sep="\t")
    _frame(TABLE).to_csv(tmp_path / "t.csv.gz", index=False)
    _frame(TABLE).to_csv(tmp_path / "t.tsv.gz", index=False, sep="\t")
    for name in ("t.csv", "t.tsv", "t.csv.gz", "t.tsv.gz"):
        assert load_examples(tmp_path / name, columns=TABLE_COLUMNS) == TABLE_EXAMPLES
    assert load_examples(str(tmp_path / "t.csv"), columns=ColumnMap("question_text", "gold"), limit=2) == [
        Example("What is 2 + 2?", "4"), Example("Spell 007.", "007")]


def test_parquet_with_column_mapping_turns_numbers_into_text(tmp_path):
    _frame({"q": ["one", "two", "half"], "a": [1, 2, 0.5]}).to_parquet(tmp_path / "n.parquet")
    got = load_examples(tmp_path / "n.parquet", columns="prompt=q,response=a")
    assert [ex.response for ex in got] == ["1", "2", "0.5"]
    _frame(TABLE).to_parquet(tmp_path / "t.parquet")
    assert load_examples(tmp_path / "t.parquet", columns=TABLE_COLUMNS) == TABLE_EXAMPLES


@pytest.mark.parametrize("records", [[GSM, GSM], DOLLY, ALPACA], ids=["gsm8k", "dolly", "alpaca"])
def test_known_layouts_read_the_same_from_jsonl_csv_and_parquet(tmp_path, records):
    want = load_examples(write_jsonl(tmp_path / "r.jsonl", records))
    _frame(records).to_csv(tmp_path / "r.csv", index=False)
    _frame(records).to_parquet(tmp_path / "r.parquet")
    assert load_examples(tmp_path / "r.csv") == want
    assert load_examples(tmp_path / "r.parquet") == want
    assert len(want) == len(records) and all(ex.prompt and ex.response for ex in want)


def test_save_to_disk_directories_and_arrow_file(tmp_path):
    import datasets

    data = datasets.Dataset.from_dict(TABLE)
    data.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": data, "test": data.select([1])}).save_to_disk(str(tmp_path / "two"))
    assert load_examples(tmp_path / "one", columns=TABLE_COLUMNS) == TABLE_EXAMPLES
    assert load_examples(str(tmp_path / "two"), columns=TABLE_COLUMNS) == TABLE_EXAMPLES  # train by default
    assert load_examples(f"{tmp_path / 'two'}:test", columns=TABLE_COLUMNS) == TABLE_EXAMPLES[1:2]
    with pytest.raises(DataError, match=r"two:valid: no split 'valid' \(splits: train, test\)"):
        load_examples(f"{tmp_path / 'two'}:valid", columns=TABLE_COLUMNS)
    with pytest.raises(DataError, match="without splits"):
        load_examples(f"{tmp_path / 'one'}:test", columns=TABLE_COLUMNS)
    [arrow] = sorted((tmp_path / "one").glob("*.arrow"))
    assert load_examples(arrow, columns=TABLE_COLUMNS) == TABLE_EXAMPLES


def test_column_mapping_on_jsonl_and_with_gsm8k_answers(tmp_path):
    rows = [{"q": "Two plus two?", "sol": "2 + 2 = 4\n#### 4", "kind": "math"}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    assert load_examples(path, columns="prompt=q,response=sol,category=kind") == [
        Example("Two plus two?", "2 + 2 = 4\n#### 4", "math")]
    assert load_examples(path, kind="gsm8k", columns="prompt=q,response=sol")[0].response == (
        "2 + 2 = 4\nThe answer is 4.")
    with pytest.raises(ConfigError, match="replaces the dolly layout"):
        load_examples(path, kind="dolly", columns="prompt=q,response=sol")


@pytest.mark.parametrize("text, message", [
    ("prompt=q", "response missing"),
    ("response=a", "prompt missing"),
    ("prompt=q,response=a,answer=b", "unknown role 'answer'"),
    ("prompt=q,response", "'response' is not ROLE=COLUMN"),
    ("prompt=q,response=", "response needs a column name"),
    ("prompt=q,prompt=r,response=a", "prompt is given twice"),
    ("prompt=q,response=q", "one column serves two roles"),
    ("", "column mapping is empty"),
])
def test_column_mapping_syntax_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        ColumnMap.parse(text)


def test_column_mapping_round_trips():
    mapping = ColumnMap.parse(" prompt = question , response=answer,category=type ")
    assert mapping == ColumnMap("question", "answer", category="type")
    assert ColumnMap.parse(mapping.spec()) == mapping


def test_missing_and_empty_mapped_columns(tmp_path):
    _frame(TABLE).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"t.csv: row 1: missing column 'question' \(the prompt; record has "
                                        r"question_text, gold, passage, topic\)"):
        load_examples(tmp_path / "t.csv", columns="prompt=question,response=gold")
    with pytest.raises(DataError, match=r"row 1: column 'passage' \(the response\) is empty"):
        load_examples(tmp_path / "t.csv", columns="prompt=gold,response=passage")
    with pytest.raises(DataError, match="cannot tell the data kind.*--columns"):
        load_examples(tmp_path / "t.csv")


@pytest.mark.parametrize("name, content", [("e.csv", b""), ("h.csv", b"q,a\n"), ("e.tsv", b"\n")])
def test_empty_tables(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=f"{name}: holds no records"):
        load_examples(tmp_path / name, columns="prompt=q,response=a")


def test_empty_parquet(tmp_path):
    _frame({"q": [], "a": []}).astype(str).to_parquet(tmp_path / "e.parquet")
    with pytest.raises(DataError, match="e.parquet: holds no records"):
        load_examples(tmp_path / "e.parquet", columns="prompt=q,response=a")


@pytest.mark.parametrize("name, content, message", [
    ("junk.parquet", b"this is not parquet", "junk.parquet: cannot read as Parquet"),
    ("junk.arrow", b"this is not arrow", "junk.arrow: cannot read as Arrow"),
    ("latin.csv", b"q,a\ncaf\xe9,1\n", "latin.csv: not UTF-8"),
    ("sheet.xlsx", b"PK\x03\x04 zipped sheets", r"sheet.xlsx: unknown data format '.xlsx' \(readable: JSON"),
    ("bad.csv", b'q,a\n"unclosed,1\n', "bad.csv: cannot read as CSV"),
])
def test_unreadable_formats(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        load_examples(tmp_path / name, columns="prompt=q,response=a")
    assert "\n" not in str(info.value)


def test_parquet_without_its_suffix_is_recognised(tmp_path):
    _frame(TABLE).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "t.parquet").rename(tmp_path / "t.data")
    assert load_examples(tmp_path / "t.data", columns=TABLE_COLUMNS) == TABLE_EXAMPLES


def test_plain_directory_is_refused(tmp_path):
    with pytest.raises(DataError, match="not one written by `datasets` save_to_disk"):
        load_examples(tmp_path)


# ------------------------------------------------------------------ hub ids (never reached in tests)
def test_made_up_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        load_examples("fedbiot-tests/no-such-data-set:train")
    text = str(info.value)
    assert text.startswith("fedbiot-tests/no-such-data-set:train: no such file, directory or packaged sample")
    assert "offline (HF_HUB_OFFLINE is set)" in text and "\n" not in text
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(("env", "models", "data_sets"), [
    ({}, False, False),
    ({"HF_HUB_OFFLINE": "1"}, True, True),
    ({"HF_HUB_OFFLINE": "On"}, True, True),
    ({"HF_HUB_OFFLINE": "0"}, False, False),
    ({"TRANSFORMERS_OFFLINE": "yes"}, True, True),
    ({"HF_DATASETS_OFFLINE": "1"}, False, True),
    ({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "0"}, True, False),
])
def test_offline_as_the_libraries_read_it(monkeypatch, env, models, data_sets):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert hf_sources.hub_offline() is models and hf_sources.hub_offline(datasets=True) is data_sets


def test_unreachable_hub_fails_fast_without_the_library_retrying(monkeypatch):
    """A closed port on 127.0.0.1 stands for a machine without network: the probe answers, no download starts."""
    import datasets
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")

    def no_download(*args, **kwargs):
        raise AssertionError("the library must not be asked to download")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"someone/data: no such file.*cannot reach 127\.0\.0\.1.*HF_HUB_OFFLINE=1"):
        load_examples("someone/data")
    assert time.monotonic() - start < hf_sources.HUB_PROBE_S + 2


@pytest.mark.parametrize("spec", ["missing.csv", "data/train.jsonl", "./train", "a/b/c", "~/x.parquet"])
def test_missing_paths_never_go_to_the_hub(monkeypatch, spec):
    def no_hub(*args, **kwargs):
        raise AssertionError(f"{spec} went to the hub")

    monkeypatch.setattr(hf_sources, "iter_hub_rows", no_hub)
    with pytest.raises(DataError, match="no such file"):
        load_examples(spec)


@pytest.mark.parametrize("spec, want", [("org/name", ("org/name", None, None)),
                                        ("org/name:test", ("org/name", None, "test")),
                                        ("gsm8k:main:train", ("gsm8k", "main", "train"))])
def test_hub_spec(spec, want):
    assert hf_sources.parse_hub_spec(spec) == want
    with pytest.raises(DataError, match="ID:CONFIG:SPLIT"):
        hf_sources.parse_hub_spec(spec + ":x:y:z")
