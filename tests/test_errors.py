"""How errors are shown: a library's error quoted by its first line, ours printed by the CLIs as one line."""

from __future__ import annotations

from console.terminal import run_cli
from errors import ConfigError, first_line, one_line


def test_first_line_of_a_message_or_the_type_name():
    assert first_line(OSError("  no such file\n  details below\n")) == "no such file"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(KeyError()) == "KeyError"


def test_one_line_joins_every_line():
    assert one_line(ConfigError("bad value\n\n  see the docs  \n")) == "bad value | see the docs"
    assert one_line(ConfigError()) == "ConfigError"


def test_the_cli_prints_a_fedbiot_error_as_one_line(capsys):
    def body(argv):
        raise ConfigError("first\nsecond")

    assert run_cli(body, []) == 2
    assert capsys.readouterr().err == "error: first | second\n"
