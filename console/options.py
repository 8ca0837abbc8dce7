"""Command-line options declared once: each `Option` names its flag, type, default, help, argument group and
the field it sets; the argument parser, the values handed to a node's settings, the translation of a run's
saved `config.json` back into flags, the usage line and the options reference (docs/options.md) are all made
from those declarations. Also the options both nodes take: device and dtype, DP-SGD, and the terminal.

A default is not written twice: an option that sets a dataclass field takes that field's default (`bind`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class _Field:
    def __repr__(self) -> str:
        return "FIELD"


FIELD: Any = _Field()  # an option's default: that of the field its `to` path names (see `bind`)
OPTION_MORE = "[OPTION ...]"


@dataclass(frozen=True)
class Option:
    """One command-line option.

    to: the field it sets, as a dotted path in the settings dataclass of its table ("rounds", "train.lr");
        None for an option the node reads itself (`--out`, `--simulate`).
    default: FIELD (the field's default, filled in by `bind`) or a value; `shown` says it in words where the
        value alone would mislead (None meaning "every Linear", a bound left to the round).
    unset: the parser's default stays None, so that a value given, even the default one, can be told from
        none (the DP flags: a lone --dp-clip is an error); `default` is what applies when none is given.
    to_field / from_field: the flag's value -> the field's value and back, where they differ (bytes from GB).
    one_of: a required choice between the options of that name (`--simulate` or `--listen`).
    """

    flag: str
    help: str
    to: str | None = None
    default: Any = FIELD
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None
    nargs: str | None = None
    const: Any = None
    action: str = "store"  # store | store_true | store_false
    dest: str | None = None
    group: str | None = None
    one_of: str | None = None
    required: bool = False
    unset: bool = False
    shown: str | None = None
    to_field: Callable[[Any], Any] | None = None
    from_field: Callable[[Any], Any] | None = None
    target: str | None = None  # the dataclass `to` names a field of (set by `bind`)

    def __post_init__(self) -> None:
        if self.to is None and self.default is FIELD:  # an option the node reads itself: no field to take from
            if not (self.required or self.one_of):
                raise TypeError(f"{self.flag} sets no field: it needs its own default")
            object.__setattr__(self, "default", None)

    @property
    def key(self) -> str:
        """The long name with underscores: the key of a config file, and the parser's dest by default."""
        return self.flag[2:].replace("-", "_")

    @property
    def attr(self) -> str:
        """Where the parsed value is found on the argparse namespace."""
        return self.dest or self.key

    @property
    def switch(self) -> bool:
        return self.action in ("store_true", "store_false")

    def shown_default(self) -> str | None:
        """The default as --help and the options reference say it; None for an option that must be given."""
        if self.required or self.one_of:
            return None
        if self.shown is not None:
            return self.shown
        if self.switch:
            return "off"
        if self.default is None:
            return "none"
        if isinstance(self.default, list | tuple):
            return " ".join(str(v) for v in self.default)
        return str(self.default)

    def usage(self) -> str:
        """How the option is written in a usage line: `--out OUT`, `--simulate [N]`, `--resume`."""
        if self.switch:
            return self.flag
        if self.metavar:
            name = self.metavar
        elif self.choices:
            name = "{" + ",".join(str(c) for c in self.choices) + "}"
        else:
            name = self.attr.upper()
        if self.nargs == "?":
            return f"{self.flag} [{name}]"
        if self.nargs == "+":
            return f"{self.flag} {name} [{name} ...]"
        return f"{self.flag} {name}"


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field annotation names (`LoraSettings`, `DPSettings | None`), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
    return None


def _field_type(cls: type, name: str) -> Any:
    """The type of field `name` of dataclass `cls` (None for no such field), from that field's annotation alone.
    `typing.get_type_hints(cls)` would resolve every field's, and a settings module may name a heavy type for type
    checkers only (`PartyOptions.hardware`: a torch type that no option sets), which reading a section never needs."""
    owner = next((k for k in cls.__mro__ if name in vars(k).get("__annotations__", {})), None)
    if owner is None:
        return None
    alone = types.SimpleNamespace(__annotations__={name: vars(owner)["__annotations__"][name]})
    return typing.get_type_hints(alone, vars(sys.modules[owner.__module__]))[name]


def _section(cls: type, name: str) -> type:
    section = _dataclass_in(_field_type(cls, name))
    if section is None:
        raise TypeError(f"{cls.__name__}.{name} is not a dataclass section")
    return section


def field_default(cls: type, path: str) -> Any:
    """The default of the field at a dotted `path` of dataclass `cls`; MISSING for a field that has none,
    KeyError for no such field."""
    *sections, name = path.split(".")
    for part in sections:
        cls = _section(cls, part)
    found = {f.name: f for f in dataclasses.fields(cls)}
    if name not in found:
        raise KeyError(path)
    spec = found[name]
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return dataclasses.MISSING


def bind(target: type, options: Iterable[Option]) -> tuple[Option, ...]:
    """`options` whose `to` paths name fields of `target`, each FIELD default replaced by that field's default
    (None for a field that has none: the option must then be given). An option declared with its own
    default (one shared by nodes whose settings differ) must agree with the field's."""
    bound = []
    for option in options:
        changes: dict[str, Any] = {}
        if option.to is not None:
            try:
                default = field_default(target, option.to)
            except KeyError:  # a shared option this node turns into something else (--device: its Hardware)
                if option.default is FIELD:
                    raise
                default = dataclasses.MISSING
            else:
                changes["target"] = target.__name__
            default = None if default is dataclasses.MISSING else default
            if option.from_field is not None and default is not None:
                default = option.from_field(default)
            if option.default is FIELD:
                changes["default"] = default
            elif "target" in changes and default is not None and option.default != default:
                raise TypeError(f"{option.flag}: default {option.default!r}, but {target.__name__}.{option.to} "
                                f"defaults to {default!r}")
        bound.append(dataclasses.replace(option, **changes))
    return tuple(bound)


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """Add each option to `parser`, in its argument group, with its default said in its help line."""
    groups: dict[str | None, Any] = {None: parser}
    choices: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for option in options:
        if option.default is FIELD:
            raise TypeError(f"{option.flag}: its default comes from a field; bind the table first")
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        where = groups[option.group]
        if option.one_of is not None:
            if option.one_of not in choices:
                choices[option.one_of] = where.add_mutually_exclusive_group(required=True)
            where = choices[option.one_of]
        shown = option.shown_default()
        text = option.help if shown is None else f"{option.help} (default: {shown})"
        kwargs: dict[str, Any] = {"help": text.replace("%", "%%"), "action": option.action,
                                  "default": None if option.unset else option.default}
        if option.dest is not None:
            kwargs["dest"] = option.dest
        if not option.switch:
            kwargs.update(type=option.type, choices=option.choices, metavar=option.metavar, nargs=option.nargs)
            if option.nargs == "?":
                kwargs["const"] = option.const
        if option.required:
            kwargs["required"] = True
        where.add_argument(option.flag, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


def values_from_args(args: argparse.Namespace, options: Iterable[Option]) -> dict[str, Any]:
    """The field values the parsed options set, nested by their `to` paths: {"rounds": 3, "train": {"lr": ..}}.
    An `unset` option that was not given is left out (its field keeps its default)."""
    values: dict[str, Any] = {}
    for option in options:
        if option.to is None:
            continue
        value = getattr(args, option.attr)
        if option.unset and value is None:
            continue
        if option.to_field is not None and value is not None:
            value = option.to_field(value)
        *sections, name = option.to.split(".")
        place = values
        for part in sections:
            place = place.setdefault(part, {})
        place[name] = value
    return values


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """`cls(**values)`, each nested table of values becoming the dataclass its field names."""
    kwargs = {}
    for name, value in values.items():
        section = _dataclass_in(_field_type(cls, name)) if isinstance(value, dict) else None
        kwargs[name] = value if section is None else build(section, value)
    return cls(**kwargs)


def flags_from_config(data: Mapping[str, Any], options: Sequence[Option], target: type) -> dict[str, Any]:
    """A nested table as `target` is saved (a run's config.json) as flat option values by long name, so the
    file given back to `--config` repeats that run. Top-level keys named like their option pass unchanged
    (a flat TOML file passes whole); a field whose option has another name or form is renamed and converted
    (`share_weights = false` -> `no-share-weights = true`); a section's fields (`train.lr`) become the
    options that set them.

    A section field no option sets must hold its default (anything else could not be repeated by flags and
    would be silently lost): otherwise a ConfigError naming the field.
    """
    from errors import ConfigError  # noqa: PLC0415

    by_path = {o.to: o for o in options if o.to is not None}
    sections = {o.to.split(".")[0] for o in by_path.values() if "." in o.to}
    flat = {k: v for k, v in data.items() if not (k in sections and (isinstance(v, dict) or v is None))}

    def put(where: str, option: Option, value: Any) -> None:
        if option.from_field is not None and value is not None:
            value = option.from_field(value)
        if option.switch:  # a switch is given, or not: given when the field holds what giving it sets
            if value is not (option.action == "store_true"):
                return
            value = True
        if value is None:
            return
        name = option.flag[2:]
        if name in flat or option.key in flat:
            raise ConfigError(f"config keys {where} and {name} set the same option")
        flat[name] = value

    for key in [k for k in flat if k in by_path]:
        option = by_path[key]
        if option.key != key:
            put(key, option, flat.pop(key))
        elif option.from_field is not None and flat[key] is not None:  # named like its option, another form
            flat[key] = option.from_field(flat[key])
    for section in [k for k in data if k in sections and isinstance(data[k], dict)]:
        values = data[section]
        for name, value in values.items():
            path = f"{section}.{name}"
            if path in by_path:
                put(path, by_path[path], value)
                continue
            try:
                default = field_default(target, path)
            except KeyError:
                raise ConfigError(f"config key {path} is unknown") from None
            if _normal(value) != _normal(default):
                raise ConfigError(f"config key {path} = {value!r} has no command-line flag; only its default "
                                  f"{default!r} can be given")
    return flat


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def usage_line(prog: str, options: Sequence[Option], spelled: Sequence[str] = ()) -> str:
    """`prog [-h] (--simulate [N] | --listen ENDPOINT) --out OUT [--json] [OPTION ...]`: the choices and
    required options, the optional ones named in `spelled`, then the rest as [OPTION ...] (all of them
    when they are few)."""
    parts = [prog, "[-h]"]
    done: set[str] = set()
    for option in options:
        if option.one_of is not None and option.one_of not in done:
            done.add(option.one_of)
            parts.append("(" + " | ".join(o.usage() for o in options if o.one_of == option.one_of) + ")")
        elif option.required:
            parts.append(option.usage())
    rest = [o for o in options if not (o.required or o.one_of)]
    few = len(rest) <= 2
    parts += [f"[{o.usage()}]" for o in rest if few or o.flag in spelled]
    if not few:
        parts.append(OPTION_MORE)
    return " ".join(parts)


@dataclass(frozen=True)
class Command:
    """A command line (`owner`, `owner plan`, `party keygen`): what it does and its options, from which come
    its parser, its usage line and its section of docs/options.md.

    table: its options, or a function that returns them (binding a table imports its settings, which the
    light commands, `keygen`, do not need). spelled: optional options its usage line names. subcommands:
    commands whose usage lines its --help shows too.
    """

    name: str
    description: str
    table: Sequence[Option] | Callable[[], Sequence[Option]]
    spelled: tuple[str, ...] = ()
    subcommands: tuple[Command, ...] = ()

    def options(self) -> tuple[Option, ...]:
        return tuple(self.table() if callable(self.table) else self.table)

    def usage(self) -> str:
        return usage_line(self.name, self.options(), self.spelled)

    def parser(self) -> argparse.ArgumentParser:
        """Its argument parser: usage errors are one `error:` line; the usage names the subcommands too."""
        from console.terminal import OneLineErrors  # noqa: PLC0415

        usage = "\n       ".join([self.usage(), *(c.usage() for c in self.subcommands)])
        parser = OneLineErrors(prog=self.name, description=self.description, usage=usage.replace("%", "%%"))
        add_options(parser, self.options())
        return parser


def references(commands: Sequence[Command]) -> str:
    """The commands' sections of docs/options.md: each one's usage and a table per argument group; options
    an earlier command listed are named by their group only."""
    listed: dict[Option, str] = {}
    sections = []
    for command in commands:
        options = command.options()
        lines = [f"## {command.name}", "", command.description, "", "```", command.usage(), "```", ""]
        earlier = [o for o in options if o in listed]
        if earlier:
            groups = ", ".join(dict.fromkeys(f"*{o.group or 'options'}*" for o in earlier))
            lines += [f"It also takes the options of `{listed[earlier[0]]}` in these groups: {groups}.", ""]
        groups_of: dict[str, list[Option]] = {}
        for option in options:
            if option not in listed:
                groups_of.setdefault(option.group or "options", []).append(option)
                listed[option] = command.name
        for group, members in groups_of.items():
            lines += [f"### {group}", "", "| option | default | sets | |", "|---|---|---|---|"]
            lines += [_row(o, options) for o in members]
            lines.append("")
        sections.append("\n".join(lines))
    return "\n".join(sections)


def _row(option: Option, options: Sequence[Option]) -> str:
    if option.one_of is not None:
        default = "required: one of " + ", ".join(f"`{o.flag}`" for o in options if o.one_of == option.one_of)
    else:
        shown = option.shown_default()
        default = "required" if shown is None else _cell(shown)
    sets = f"`{option.target}.{option.to}`" if option.target is not None else ""
    return f"| `{option.usage()}` | {default} | {sets} | {_cell(option.help)} |"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# ------------------------------------------------------------------------------ options both nodes take

HARDWARE = "hardware"
DP_GROUP = "differential privacy (DP-SGD on the adapter LoRA; the owner's apply to --simulate's parties)"


@functools.cache
def hardware_options() -> tuple[Option, ...]:
    """--device, --dtype, --quantize: where the frozen weights live and in which precision."""
    from learning.devices import DEVICES, DTYPE_NAMES  # noqa: PLC0415

    return (
        Option("--device", to="device", default="auto", group=HARDWARE,
               help=f"{DEVICES} (auto: a CUDA GPU when present)"),
        Option("--dtype", to="dtype", default="auto", choices=("auto", *DTYPE_NAMES), group=HARDWARE,
               help="frozen weights' precision; LoRA and optimizer state stay float32 (auto: bfloat16 on a GPU "
                    "or CPU that computes it natively, else float32; float32 with DP)"),
        Option("--quantize", to="quantize", choices=("int8", "nf4"), group=HARDWARE, shown="none: --dtype",
               help="hold the frozen compressed model in 8 or 4 bits (bitsandbytes; pip install "
                    "'fedbiot[quantize]'): less memory, the adapter LoRA still trains in float32 (the owner's: "
                    "--simulate's parties)"),
    )


def hardware_from_args(args: argparse.Namespace, dp: bool = False):
    """The resolved Hardware (DP-SGD keeps float32: `learning.devices.dp_dtype`)."""
    from learning.hardware import resolve_hardware  # noqa: PLC0415

    return resolve_hardware(args.device, args.dtype, dp=dp)


@functools.cache
def dp_options() -> tuple[Option, ...]:
    """The --dp-* flags (each sets a field of learning.settings.DPSettings); `dp_from_args` builds the settings."""
    from learning.settings import ACCOUNTANTS  # noqa: PLC0415

    return (
        Option("--dp-noise", to="dp.noise_multiplier", type=float, metavar="SIGMA", unset=True, group=DP_GROUP,
               shown="none: no DP", help="noise multiplier: turns DP on (give this or --dp-epsilon)"),
        Option("--dp-epsilon", to="dp.target_epsilon", type=float, metavar="EPS", unset=True, group=DP_GROUP,
               shown="none: no DP",
               help="target epsilon over the whole run: turns DP on, the noise multiplier is derived from it"),
        Option("--dp-delta", to="dp.delta", type=float, metavar="DELTA", unset=True, group=DP_GROUP,
               shown="min(1e-5, N^-1.1) for a party with N examples", help="the delta of (epsilon, delta)-DP"),
        Option("--dp-clip", to="dp.max_grad_norm", type=float, metavar="C", unset=True, group=DP_GROUP,
               help="per-sample clipping norm"),
        Option("--dp-accountant", to="dp.accountant", choices=ACCOUNTANTS, unset=True, group=DP_GROUP,
               help="privacy accountant"),
    )


def dp_from_args(args: argparse.Namespace):
    """DPSettings from the --dp-* flags, or None when DP is off (a lone --dp-delta/--dp-clip is an error)."""
    from errors import ConfigError  # noqa: PLC0415
    from learning.settings import DPSettings  # noqa: PLC0415

    given = values_from_args(args, dp_options()).get("dp", {})
    if "noise_multiplier" not in given and "target_epsilon" not in given:
        if given:
            flags = [o.flag for o in dp_options() if o.to.split(".")[1] in given]
            raise ConfigError(f"{', '.join(flags)} given without --dp-noise or --dp-epsilon")
        return None
    return DPSettings(**given)


def training_options() -> tuple[Option, ...]:
    """--device, --dtype, --quantize and the --dp-* flags: how a party holds its model and trains (the
    owner's apply to --simulate's parties)."""
    return (*hardware_options(), *dp_options())


@functools.cache
def terminal_options() -> tuple[Option, ...]:
    """--config, --progress and --verbose: how a node is configured and what it prints."""
    from console.progress import MODES  # noqa: PLC0415

    return (
        Option("--config", type=Path, metavar="FILE", default=None,
               help="TOML (or a run's config.json) of option values by long name; flags override it"),
        Option("--progress", choices=MODES, default="auto",
               help="progress display: bar (with rate and ETA), plain lines (for logs) or none; auto = bar on a "
                    "terminal, plain otherwise"),
        Option("--verbose", action="store_true", default=False,
               help="let libraries print their own progress bars and warnings too"),
    )
