"""Instruction data as `Example`s: JSON / JSONL files (optionally gzipped), the packaged samples, and through the
`datasets` library CSV/TSV, Parquet and Arrow files, `save_to_disk` directories and hub ids (tasks/hf_sources.py).

Three record layouts cover the data sets the method is evaluated on: GSM8K (question/answer), Dolly
(instruction/context/response/category) and Alpaca (instruction/input/output, CodeAlpaca too); any other
layout is read through a column mapping (tasks/columns.py). Every problem with a source is reported as one
`DataError` line naming the source and the record, because these files come from users and a traceback into
`json` or `pyarrow` tells them nothing.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from errors import ConfigError, DataError
from tasks import hf_sources
from tasks.columns import ColumnMap

KINDS = ("auto", "gsm8k", "dolly", "alpaca")

# Packaged samples (tasks/fixtures): name -> file. They let the default run work on a fresh clone.
SAMPLES: dict[str, str] = {
    "gsm8k-train": "gsm8k-train.jsonl",
    "gsm8k-test": "gsm8k-test.jsonl",
    "dolly": "dolly.jsonl",
    "codealpaca": "codealpaca.jsonl",
}

# Fields each kind cannot do without; the others are optional.
REQUIRED: dict[str, tuple[str, ...]] = {
    "gsm8k": ("question", "answer"),
    "dolly": ("instruction", "response"),
    "alpaca": ("instruction", "output"),
}
# Fields a converter reads when present (text joined to the prompt, or the split key).
OPTIONAL: dict[str, tuple[str, ...]] = {
    "gsm8k": (),
    "dolly": ("context", "category"),
    "alpaca": ("input",),
}

ANSWER_MARK = "####"
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
READABLE = ("JSON/JSONL (.json, .jsonl), CSV (.csv, .tsv), both optionally .gz, Parquet (.parquet), Arrow (.arrow), "
            "a `datasets` save_to_disk directory, or a hub id")
# A hub data set id, optionally with :CONFIG and :SPLIT; anything else that does not exist is a missing path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+){0,2}")


@dataclass(frozen=True)
class Example:
    """One instruction-tuning pair; `category` names the Dolly task type (used to split by category)."""

    prompt: str
    response: str
    category: str | None = None


def gsm8k_final_answer(answer: str) -> str:
    """The ground-truth number of a GSM8K answer: the text after '####', commas removed."""
    if ANSWER_MARK not in answer:
        raise DataError(f"GSM8K answer has no '{ANSWER_MARK}' line: {answer[-60:]!r}")
    return answer.rsplit(ANSWER_MARK, 1)[1].strip().replace(",", "")


def gsm8k_target(answer: str) -> str:
    """The training target: the worked solution with '#### 42' turned into 'The answer is 42.'.

    The evaluator reads the first number after "The answer is", so the model is taught to say it that way.
    """
    if ANSWER_MARK not in answer:
        raise DataError(f"no '{ANSWER_MARK}' line")
    body, final = answer.rsplit(ANSWER_MARK, 1)
    final = final.strip()
    if not final:
        raise DataError(f"nothing after '{ANSWER_MARK}'")
    return f"{body}The answer is {final}."


def _join(instruction: str, extra: str | None) -> str:
    """Instruction plus its context / input, when there is one."""
    if extra is None or not str(extra).strip():
        return instruction
    return f"{instruction}\n\n{extra}"


def _gsm8k(record: dict[str, Any]) -> Example:
    return Example(record["question"], gsm8k_target(record["answer"]))


def _dolly(record: dict[str, Any]) -> Example:
    return Example(_join(record["instruction"], record.get("context")), record["response"],
                   record.get("category"))


def _alpaca(record: dict[str, Any]) -> Example:
    return Example(_join(record["instruction"], record.get("input")), record["output"])


CONVERTERS: dict[str, Callable[[dict[str, Any]], Example]] = {
    "gsm8k": _gsm8k,
    "dolly": _dolly,
    "alpaca": _alpaca,
}


def detect_kind(record: dict[str, Any]) -> str | None:
    """The kind whose required fields the record has (GSM8K, then Dolly, then Alpaca), or None."""
    for kind, fields in REQUIRED.items():
        if all(f in record for f in fields):
            return kind
    return None


def _sample_path(source: str) -> Path:
    ref = resources.files("tasks") / "fixtures" / SAMPLES[source]
    path = Path(str(ref))
    if not path.is_file():
        raise DataError(f"packaged sample {source!r} is missing from this installation ({path})")
    return path


def resolve_source(source: str | Path) -> tuple[Path, str]:
    """The JSON/JSONL file to read and the name to use in messages; packaged sample names win over paths."""
    if isinstance(source, str) and source in SAMPLES:
        return _sample_path(source), f"sample {source!r}"
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source}: no such file (packaged samples: {', '.join(SAMPLES)})")
    if not path.is_file():
        raise DataError(f"{source}: not a file")
    return path, str(source)


def _is_json_name(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in JSON_SUFFIXES


def _looks_like_path(source: str) -> bool:
    """A spec that can only mean a local path (so, when missing, it is reported as a missing file)."""
    name = Path(source).name
    named_file = (_is_json_name(Path(name.split(":")[0]))
                  or hf_sources.data_suffix(Path(name)) in hf_sources.FILE_FORMATS)
    return (source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1 or named_file
            or _HUB_ID.fullmatch(source) is None)


def _file_records(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    if _is_json_name(path):
        return iter_records(path, name)
    fmt = hf_sources.file_format(path)
    if fmt is not None:
        return hf_sources.iter_file_rows(path, fmt, name)
    if path.suffix.lower() == ".gz":
        return iter_records(path, name)
    text = _read_text(path, name)  # no telling suffix: JSON/JSONL if it reads as such, else a clear refusal
    if text.strip() and text.lstrip()[0] not in "[{":
        raise DataError(f"{name}: unknown data format{f' {path.suffix!r}' if path.suffix else ''} "
                        f"(readable: {READABLE})")
    return iter_records(path, name)


def open_records(source: str | Path) -> tuple[str, Iterator[tuple[str, Any]]]:
    """The name to use in messages and the (location, record) pairs of any data source.

    In order: a packaged sample name; `hub:ID...`; an existing file (format from its suffix or first bytes)
    or `save_to_disk` directory (`DIR:SPLIT` picks a split); else a hub id `ID[:CONFIG][:SPLIT]`, tried
    only when the spec cannot be a local path, so a missing file never turns into a network request.
    """
    if isinstance(source, str) and source in SAMPLES:
        name = f"sample {source!r}"
        return name, iter_records(_sample_path(source), name)
    text = str(source)
    if isinstance(source, str) and source.startswith("hub:"):
        return text, hf_sources.iter_hub_rows(source[4:], text)
    path = Path(source).expanduser()
    if path.is_file():
        return text, _file_records(path, text)
    if path.is_dir():
        if not hf_sources.is_saved_dataset(path):
            raise DataError(f"{text}: a directory, but not one written by `datasets` save_to_disk "
                            f"(no {' / '.join(hf_sources.SAVED_MARKERS)}); readable: {READABLE}")
        return text, hf_sources.iter_saved_rows(path, None, text)
    if path.exists():
        raise DataError(f"{text}: not a file or directory")
    head, sep, split = text.rpartition(":")
    if sep and split and hf_sources.is_saved_dataset(Path(head).expanduser()):
        return text, hf_sources.iter_saved_rows(Path(head).expanduser(), split, text)
    if isinstance(source, Path) or _looks_like_path(text):
        raise DataError(f"{text}: no such file (packaged samples: {', '.join(SAMPLES)})")
    return text, hf_sources.iter_hub_rows(text, text, f"no such file, directory or packaged sample "
                                                      f"({', '.join(SAMPLES)})")


def _read_text(path: Path, name: str) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
        return raw.decode("utf-8-sig")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{name}: cannot read file ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def iter_records(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs; a file starting with '[' is one JSON list, anything else is JSONL."""
    text = _read_text(path, name)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}: line {exc.lineno}: invalid JSON ({exc.msg})") from exc
        for i, record in enumerate(records, 1):
            yield f"record {i}", record
        return
    for lineno, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}: line {lineno}: invalid JSON ({exc.msg})") from exc
        yield f"line {lineno}", record


def _check(record: Any, kind: str, name: str, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{name}: {where}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in REQUIRED[kind] if f not in record]
    if missing:
        raise DataError(f"{name}: {where}: missing field {', '.join(repr(f) for f in missing)} "
                        f"({kind} records need {', '.join(REQUIRED[kind])})")
    for field, value in record.items():
        if field in REQUIRED[kind] and value is None:
            raise DataError(f"{name}: {where}: field {field!r} is empty")
        if field in REQUIRED[kind] and not isinstance(value, str):
            raise DataError(f"{name}: {where}: field {field!r} must be a string, got {type(value).__name__}")
        if field in OPTIONAL[kind] and value is not None and not isinstance(value, str):
            raise DataError(f"{name}: {where}: field {field!r} must be a string or null, "
                            f"got {type(value).__name__}")


def _mapped(record: Any, columns: ColumnMap, kind: str, name: str, where: str) -> Example:
    values = columns.values(record, name, where)
    response = values["response"] or ""
    if kind == "gsm8k":
        try:
            response = gsm8k_target(response)
        except DataError as exc:
            raise DataError(f"{name}: {where}: {exc}") from exc
    return Example(_join(values["prompt"] or "", values["context"]), response, values["category"])


def _detected(record: Any, name: str, where: str, columns_flag: str = "--columns") -> str:
    if not isinstance(record, dict):
        raise DataError(f"{name}: {where}: expected a JSON object, got {type(record).__name__}")
    detected = detect_kind(record)
    if detected is None:
        raise DataError(f"{name}: {where}: cannot tell the data kind from fields "
                        f"{sorted(record)} (gsm8k: question/answer; dolly: instruction/response; "
                        "alpaca: instruction/output; any other layout: give a column mapping, "
                        f"e.g. {columns_flag} prompt=question,response=answer)")
    return detected


def load_examples(source: str | Path, kind: str = "auto", limit: int | None = None,
                  columns: ColumnMap | str | None = None, columns_flag: str = "--columns") -> list[Example]:
    """Read a data source (file, directory, packaged sample or hub id; see `open_records`) into `Example`s.

    `kind` "auto" picks the layout from the first record's fields; `limit` keeps the first records only
    (and stops reading there, so a small run over a large file stays quick). `columns` (a ColumnMap or its
    text `prompt=question,response=answer,...`) reads any other layout; with it, kind "gsm8k" still turns
    the '#### N' line into the answer sentence, and "auto" takes the columns as they are. `columns_flag` is the
    option an error about an unknown layout suggests (the owner's `--party-columns`, ...).
    """
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r} (choose from {', '.join(KINDS)})")
    if limit is not None and limit < 1:
        raise ConfigError(f"the record limit must be at least 1, got {limit}")
    mapping = ColumnMap.coerce(columns)
    if mapping is not None and kind not in ("auto", "gsm8k"):
        raise ConfigError(f"a column mapping replaces the {kind} layout: use the data kind auto (or gsm8k for "
                          "'#### N' answers) with it")
    name, records = open_records(source)
    examples: list[Example] = []
    for where, record in records:
        if mapping is not None:
            examples.append(_mapped(record, mapping, kind, name, where))
        else:
            if kind == "auto":
                kind = _detected(record, name, where, columns_flag)
            _check(record, kind, name, where)
            try:
                examples.append(CONVERTERS[kind](record))
            except DataError as exc:
                raise DataError(f"{name}: {where}: {exc}") from exc
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{name}: holds no records")
    return examples
