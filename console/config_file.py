"""`--config FILE`: a TOML or JSON file of option values, so a run's dozens of flags live in one file.

Keys are the flags' long names, with dashes or underscores (`local-steps = 8`, `local_steps = 8`). The file
sets the parser's defaults, so a flag on the command line overrides it. An unknown key, a value of the
wrong type, or a value outside an option's choices is a ConfigError naming the key. Paths in the file are
used as given (relative to the current directory), exactly as on the command line.

A CLI whose runs write a nested config (the owner's `config.json`) passes `translate`, which turns that
structure back into flag names, so the file a run wrote can be given back.
"""

from __future__ import annotations

import argparse
import difflib
import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from errors import ConfigError

Translate = Callable[[dict[str, Any]], dict[str, Any]]


def load_config_file(path: Path) -> dict[str, Any]:
    """The file's top-level table: TOML for `.toml`, JSON otherwise (the run's `config.json`)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise ConfigError(f"config file {path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of options, not {type(data).__name__}")
    return data


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every option the file may set, by long name with underscores: {"local_steps": <--local-steps>}."""
    found: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction) or not action.option_strings:
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                found[option[2:].replace("-", "_")] = action
    found.pop("config", None)  # a config file does not name another one
    return found


def _convert(key: str, action: argparse.Action, value: Any) -> Any:
    """The value the flag would have stored, or a ConfigError saying what the key needs."""
    flag = "--" + key.replace("_", "-")
    if isinstance(action, argparse._StoreConstAction):  # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} ({flag}) takes true or false, not {value!r}")
        if isinstance(action.const, bool):
            return value if action.const else not value
        return action.const if value else action.default
    if not isinstance(action, argparse._StoreAction) or action.nargs not in (None, "?", "+"):
        raise ConfigError(f"config key {key!r} ({flag}) cannot be set from a config file")
    if value is None:
        if action.default is None:
            return None
        raise ConfigError(f"config key {key!r} ({flag}) needs a value, not null")
    if action.nargs == "+":  # a flag of one or more values: a non-empty list
        if not isinstance(value, list) or not value:
            raise ConfigError(f"config key {key!r} ({flag}) takes a non-empty list, not {value!r}")
        return [_convert_one(key, flag, action, item) for item in value]
    return _convert_one(key, flag, action, value)


def _convert_one(key: str, flag: str, action: argparse.Action, value: Any) -> Any:
    kind = action.type
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        want = "a number"
        value = float(value) if ok else value
    elif kind is None or kind is str or kind is Path:
        ok = isinstance(value, str)
        want = "a string"
        value = Path(value) if ok and kind is Path else value
    else:
        ok, want = isinstance(value, str), "a string"
        if ok:
            try:
                value = kind(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise ConfigError(f"config key {key!r} ({flag}): {exc}") from None
    if not ok:
        raise ConfigError(f"config key {key!r} ({flag}) takes {want}, not {value!r}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise ConfigError(f"config key {key!r} ({flag}) must be one of {choices}, not {value!r}")
    return value


def config_values(parser: argparse.ArgumentParser, data: Mapping[str, Any], source: str = "config file"
                  ) -> dict[str, tuple[argparse.Action, Any]]:
    """{dest: (action, value)} from a flat table of option values; unknown keys and bad values raise."""
    actions = option_actions(parser)
    out: dict[str, tuple[argparse.Action, Any]] = {}
    seen: dict[str, str] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        action = actions.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.6)
            meant = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {raw_key!r} (no option --{key.replace('_', '-')}){meant}")
        if isinstance(value, dict):
            raise ConfigError(f"{source}: key {raw_key!r} holds a table; options are top-level keys")
        if action.dest in seen:
            raise ConfigError(f"{source}: keys {seen[action.dest]!r} and {raw_key!r} set the same option")
        seen[action.dest] = str(raw_key)
        out[action.dest] = (action, _convert(key, action, value))
    return out


def _exclusive_groups(parser: argparse.ArgumentParser) -> list[argparse._MutuallyExclusiveGroup]:
    return list(parser._mutually_exclusive_groups)


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                      translate: Translate | None = None) -> argparse.Namespace:
    """Parse `argv`, taking defaults from the file named by `--config` (if any); flags override the file.

    The parser must already define `--config` (`console.options.terminal_options`). Options the file sets stop being
    required on the command line; of mutually exclusive options, one given on the command line replaces
    the one the file chose (`--listen` on the command line beats `simulate = 3` in the file).
    """
    from console.terminal import OneLineErrors  # noqa: PLC0415

    pre = OneLineErrors(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return parser.parse_args(argv)
    data = load_config_file(known.config)
    if translate is not None:
        data = translate(data)
    values = config_values(parser, data, f"config file {known.config}")
    original = {dest: action.default for dest, (action, _) in values.items()}
    for group in _exclusive_groups(parser):
        chosen = [a for a in group._group_actions if a.dest in values]
        if len(chosen) > 1:
            names = " and ".join(a.option_strings[0] for a in chosen)
            raise ConfigError(f"config file {known.config}: {names} cannot be used together")
        if chosen:
            group.required = False
    for action, _ in values.values():
        action.required = False
    parser.set_defaults(**{dest: value for dest, (_, value) in values.items()})
    args = parser.parse_args(argv)
    for group in _exclusive_groups(parser):
        from_file = [a for a in group._group_actions if a.dest in values]
        from_cli = [a for a in group._group_actions if a.dest not in values
                    and getattr(args, a.dest) != a.default]
        if from_file and from_cli:  # the command line chose another member: drop the file's choice
            for a in from_file:
                setattr(args, a.dest, original[a.dest])
    return args
