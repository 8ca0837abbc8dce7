"""Field kinds of message headers and strict JSON handling.

Headers are parsed by a JSON reader that refuses what Python's `json` would otherwise let through
(duplicate keys, NaN/Infinity, floats that overflow to inf, deep nesting), so every value that reaches a
schema check is plain, finite JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.errors import ProtocolError

MAX_JSON_DEPTH = 16


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} overflows")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def parse_json(data: bytes | bytearray | memoryview, what: str) -> Any:
    """Parse UTF-8 JSON strictly; any failure is a ProtocolError naming `what`."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        value = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_float=_finite_float, parse_constant=_no_constant
        )
    except RecursionError:
        raise ProtocolError(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError; so are the hooks' and int()'s errors
        raise ProtocolError(f"{what} is not valid JSON: {str(exc)[:120]}") from None
    check_json_value(value, what)
    return value


def dump_json(value: Any, what: str) -> bytes:
    """Compact UTF-8 JSON; refuses non-JSON types, non-finite floats and unencodable strings."""
    check_json_value(value, what)
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise ProtocolError(f"{what} cannot be written as JSON: {str(exc)[:120]}") from None


def check_json_value(value: Any, what: str, depth: int = 0) -> None:
    """Accept only dict (str keys), list, str, int, finite float, bool, None; depth <= MAX_JSON_DEPTH."""
    if depth > MAX_JSON_DEPTH:
        raise ProtocolError(f"{what} is nested deeper than {MAX_JSON_DEPTH}")
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError(f"{what} holds a non-finite number")
        return
    if isinstance(value, str):
        _check_encodable(value, what)
        return
    if isinstance(value, list):
        for item in value:
            check_json_value(item, what, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError(f"{what} has a non-string key {key!r}")
            _check_encodable(key, what)
            check_json_value(item, what, depth + 1)
        return
    raise ProtocolError(f"{what} holds a {type(value).__name__}, which is not a JSON type")


def _check_encodable(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"{what} holds a string with a lone surrogate") from None


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


# ---------------------------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Int:
    """An integer in [lo, hi]; JSON booleans are not integers here."""

    lo: int
    hi: int

    def check(self, name: str, value: Any) -> Any:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"field {name!r} must be an integer, got {_json_type(value)}")
        if not self.lo <= value <= self.hi:
            raise ProtocolError(f"field {name!r} = {value} is outside [{self.lo}, {self.hi}]")
        return value

    def describe(self) -> str:
        return f"int [{self.lo}, {_short_int(self.hi)}]"


@dataclass(frozen=True)
class Float:
    """A finite number in (lo, hi] (lo exclusive so a deadline of 0 is refused); ints are accepted."""

    lo: float
    hi: float

    def check(self, name: str, value: Any) -> Any:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ProtocolError(f"field {name!r} must be a number, got {_json_type(value)}")
        value = float(value)
        if not (math.isfinite(value) and self.lo < value <= self.hi):
            raise ProtocolError(f"field {name!r} = {value} is outside ({self.lo}, {self.hi}]")
        return value

    def describe(self) -> str:
        return f"number ({self.lo:g}, {self.hi:g}]"


@dataclass(frozen=True)
class Str:
    """A string without control characters, at most `max_len` characters, optionally matching `pattern`."""

    max_len: int
    min_len: int = 0
    pattern: str | None = None
    label: str = ""

    def check(self, name: str, value: Any) -> Any:
        if not isinstance(value, str):
            raise ProtocolError(f"field {name!r} must be a string, got {_json_type(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise ProtocolError(f"field {name!r} has length {len(value)}, outside [{self.min_len}, {self.max_len}]")
        if _has_control(value):
            raise ProtocolError(f"field {name!r} contains control characters")
        if self.pattern is not None and re.fullmatch(self.pattern, value) is None:
            raise ProtocolError(f"field {name!r} is not {self.label or 'well formed'}: {value[:40]!r}")
        return value

    def describe(self) -> str:
        return f"{self.label or 'str'} (<= {self.max_len} chars)"


@dataclass(frozen=True)
class StrList:
    """A list of at most `max_items` distinct strings, each checked by `item`."""

    max_items: int
    item: Str

    def check(self, name: str, value: Any) -> Any:
        if not isinstance(value, list):
            raise ProtocolError(f"field {name!r} must be a list, got {_json_type(value)}")
        if len(value) > self.max_items:
            raise ProtocolError(f"field {name!r} has {len(value)} items, more than {self.max_items}")
        for item in value:
            self.item.check(f"{name}[]", item)
        if len(set(value)) != len(value):
            raise ProtocolError(f"field {name!r} repeats an item")
        return list(value)

    def describe(self) -> str:
        return f"list of {self.item.describe()}, <= {self.max_items}"


@dataclass(frozen=True)
class Obj:
    """An opaque JSON object whose compact encoding is at most `max_bytes` bytes."""

    max_bytes: int

    def check(self, name: str, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ProtocolError(f"field {name!r} must be a JSON object, got {_json_type(value)}")
        size = len(dump_json(value, f"field {name!r}"))
        if size > self.max_bytes:
            raise ProtocolError(f"field {name!r} takes {size} bytes, more than {self.max_bytes}")
        return value

    def describe(self) -> str:
        return f"object (<= {self.max_bytes // 1024} KiB)"


Kind = Int | Float | Str | StrList | Obj


@dataclass(frozen=True)
class Field:
    """One header field: its kind, whether it must be present, and the value decode fills in otherwise."""

    name: str
    kind: Kind
    required: bool = True
    default: Any = None
    doc: str = ""


CrossCheck = Callable[[dict[str, Any]], None]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short_int(value: int) -> str:
    for power in (63, 40, 31, 30):
        if value == 2**power - 1:
            return f"2^{power}-1"
        if value == 2**power:
            return f"2^{power}"
    return str(value)
