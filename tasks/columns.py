"""Column mapping for data in a layout the loader does not recognise: which column is the prompt, which the response.

Written on the command line as `prompt=question,response=answer[,context=passage][,category=topic]`; the
optional context is joined to the prompt as in Dolly, the optional category feeds the by-category split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from errors import ConfigError, DataError

ROLES = ("prompt", "response", "context", "category")
REQUIRED_ROLES = ("prompt", "response")
SYNTAX = "prompt=COLUMN,response=COLUMN[,context=COLUMN][,category=COLUMN]"


@dataclass(frozen=True)
class ColumnMap:
    """The source columns that hold each part of an `Example`; context and category are optional."""

    prompt: str
    response: str
    context: str | None = None
    category: str | None = None

    def __post_init__(self) -> None:
        for role in ROLES:
            column = getattr(self, role)
            if column is None:
                continue
            if not isinstance(column, str) or not column.strip():
                raise ConfigError(f"column mapping: {role} needs a column name")
        named = [c for c in (self.prompt, self.response, self.context, self.category) if c is not None]
        if len(set(named)) != len(named):
            raise ConfigError(f"column mapping: one column serves two roles ({self.spec()})")

    @classmethod
    def parse(cls, text: str) -> ColumnMap:
        """`prompt=question,response=answer,...` -> ColumnMap; every mistake is one ConfigError line."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"column mapping is empty (expected {SYNTAX})")
        roles: dict[str, str] = {}
        for part in text.split(","):
            role, sep, column = part.partition("=")
            role, column = role.strip(), column.strip()
            if not sep:
                raise ConfigError(f"column mapping: {part.strip()!r} is not ROLE=COLUMN (expected {SYNTAX})")
            if role not in ROLES:
                raise ConfigError(f"column mapping: unknown role {role!r} (roles: {', '.join(ROLES)})")
            if role in roles:
                raise ConfigError(f"column mapping: {role} is given twice")
            if not column:
                raise ConfigError(f"column mapping: {role} needs a column name")
            roles[role] = column
        missing = [r for r in REQUIRED_ROLES if r not in roles]
        if missing:
            raise ConfigError(f"column mapping: {' and '.join(missing)} missing (expected {SYNTAX})")
        return cls(**roles)

    @classmethod
    def coerce(cls, value: ColumnMap | str | None) -> ColumnMap | None:
        """A ColumnMap from itself, its text form, or None (no mapping)."""
        if value is None or isinstance(value, ColumnMap):
            return value
        return cls.parse(value)

    def spec(self) -> str:
        """The text form `parse` reads back (what config.json stores)."""
        return ",".join(f"{role}={getattr(self, role)}" for role in ROLES if getattr(self, role) is not None)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(getattr(self, role) for role in ROLES if getattr(self, role) is not None)

    def values(self, record: Any, name: str, where: str) -> dict[str, str | None]:
        """{role: text} of one record; numbers become text, a required role may not be empty."""
        if not isinstance(record, dict):
            raise DataError(f"{name}: {where}: expected a record with columns, got {type(record).__name__}")
        out: dict[str, str | None] = {}
        for role in ROLES:
            column = getattr(self, role)
            if column is None:
                out[role] = None
                continue
            if column not in record:
                raise DataError(f"{name}: {where}: missing column {column!r} (the {role}; record has "
                                f"{', '.join(map(str, record)) or 'no columns'})")
            text = _as_text(record[column], name, where, column)
            if role in REQUIRED_ROLES and (text is None or not text.strip()):
                raise DataError(f"{name}: {where}: column {column!r} (the {role}) is empty")
            out[role] = text
        return out


def _as_text(value: Any, name: str, where: str, column: str) -> str | None:
    """Strings pass, whole and decimal numbers become text (Parquet and CSV type them), missing is None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise DataError(f"{name}: {where}: column {column!r} must be text, got a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    raise DataError(f"{name}: {where}: column {column!r} must be text, got {type(value).__name__}")
