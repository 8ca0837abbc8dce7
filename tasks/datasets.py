"""Instruction data from JSON / JSONL files (optionally gzipped) or the packaged samples, as `Example`s.

Three record layouts cover the data sets the method is evaluated on: GSM8K (question/answer), Dolly
(instruction/context/response/category) and Alpaca (instruction/input/output, CodeAlpaca too). Every
problem with a file is reported as one `DataError` line naming the file and the record, because these
files come from users and a traceback into `json` tells them nothing.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from errors import ConfigError, DataError

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


def resolve_source(source: str | Path) -> tuple[Path, str]:
    """The file to read and the name to use in messages; packaged sample names win over relative paths."""
    if isinstance(source, str) and source in SAMPLES:
        ref = resources.files("tasks") / "fixtures" / SAMPLES[source]
        path = Path(str(ref))
        if not path.is_file():
            raise DataError(f"packaged sample {source!r} is missing from this installation ({path})")
        return path, f"sample {source!r}"
    if isinstance(source, str) and source.startswith("hub:"):
        raise DataError(f"{source}: loading data sets from the Hugging Face hub is not supported; download "
                        "the JSON/JSONL file and pass its path")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source}: no such file (packaged samples: {', '.join(SAMPLES)})")
    if not path.is_file():
        raise DataError(f"{source}: not a file")
    return path, str(source)


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
        if field in REQUIRED[kind] and not isinstance(value, str):
            raise DataError(f"{name}: {where}: field {field!r} must be a string, got {type(value).__name__}")
        if field in OPTIONAL[kind] and value is not None and not isinstance(value, str):
            raise DataError(f"{name}: {where}: field {field!r} must be a string or null, "
                            f"got {type(value).__name__}")


def load_examples(source: str | Path, kind: str = "auto", limit: int | None = None) -> list[Example]:
    """Read a data file (or a packaged sample) into `Example`s.

    `kind` "auto" picks the layout from the first record's fields; `limit` keeps the first records only
    (and stops reading there, so a small run over a large file stays quick).
    """
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r} (choose from {', '.join(KINDS)})")
    if limit is not None and limit < 1:
        raise ConfigError(f"the record limit must be at least 1, got {limit}")
    path, name = resolve_source(source)
    examples: list[Example] = []
    for where, record in iter_records(path, name):
        if kind == "auto":
            if not isinstance(record, dict):
                raise DataError(f"{name}: {where}: expected a JSON object, got {type(record).__name__}")
            detected = detect_kind(record)
            if detected is None:
                raise DataError(f"{name}: {where}: cannot tell the data kind from fields "
                                f"{sorted(record)} (gsm8k: question/answer; dolly: instruction/response; "
                                "alpaca: instruction/output)")
            kind = detected
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
