"""What a party says on its terminal: a mistyped address, a swapped key file or an owner that cannot be reached
is one `error:` line with the fix, at once or when the connect timeout ends, and while it waits it says for what,
where, and for how long; a round's end is told in words."""

from __future__ import annotations

import json
import socket

import pytest

import party.link
from owner import cli as owner_cli
from party import cli as party_cli
from party.rounds import round_end_text
from protocol.keys import generate_keypair


@pytest.fixture()
def keys(tmp_path):
    return {name: generate_keypair(tmp_path / "keys", name) for name in ("owner", "alice")}


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("main, argv, words", [
    (party_cli.main, ["--connect", "127.0.0.1:5999"], "an address is tcp://HOST:PORT, e.g. tcp://owner.example.org:5555:"
                                                      " did you mean tcp://127.0.0.1:5999?"),
    (party_cli.main, ["--connect", "tcp://owner:99999"], "the port must be a number from 1 to 65535"),
    (party_cli.main, ["--connect", "tcp://127.0.0.1:5999", "--connect-timeout", "0"],
     "--connect-timeout must be a positive number of seconds"),
    (owner_cli.main, ["--listen", "0.0.0.0:5555", "--parties", "3", "--allow", "allow", "--out", "o"],
     "did you mean tcp://0.0.0.0:5555?"),
])
def test_a_mistyped_address_is_one_line_with_the_fix(tmp_path, monkeypatch, capsys, keys, main, argv, words):
    monkeypatch.chdir(tmp_path)
    key = keys["owner"][1] if main is owner_cli.main else keys["alice"][1]
    common = ["--key", str(key)] + ([] if main is owner_cli.main else
                                    ["--owner-key", str(keys["owner"][0]), "--data", "d.jsonl"])
    assert main([*argv, *common]) == 2
    assert words in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]


def test_the_owners_secret_key_as_owner_key_is_refused(tmp_path, capsys, keys):
    argv = ["--connect", f"tcp://127.0.0.1:{closed_port()}", "--data", str(tmp_path / "none.jsonl"),
            "--key", str(keys["alice"][1]), "--owner-key", str(keys["owner"][1])]
    assert party_cli.main(argv) == 2
    line = error_line(capsys)
    assert "--owner-key" in line and "is a secret key file: pass the public one (owner.key)" in line


def test_a_mistyped_flag_names_the_one_meant(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert owner_cli.main(["--simulate", "2", "--out", "o", "--local-stpes", "4"]) == 2
    assert "unrecognized arguments: --local-stpes 4 (did you mean --local-steps?)" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("main", [owner_cli.main, party_cli.main])
def test_an_invalid_choice_is_one_line_not_a_usage_block(tmp_path, monkeypatch, capsys, main):
    monkeypatch.chdir(tmp_path)
    argv = (["--simulate", "2", "--out", "o"] if main is owner_cli.main else
            ["--connect", "tcp://h:5555", "--data", "d", "--key", "k", "--owner-key", "o"])
    assert main([*argv, "--dtype", "float8"]) == 2
    assert "argument --dtype: invalid choice: 'float8' (choose from" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_owner_is_said_while_waiting_then_one_error_line(tmp_path, monkeypatch, capsys, keys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(4)))
    monkeypatch.setattr(party.link, "CONNECT_LINE_S", 0.5)
    endpoint = f"tcp://127.0.0.1:{closed_port()}"
    argv = ["--connect", endpoint, "--data", str(data), "--key", str(keys["alice"][1]),
            "--owner-key", str(keys["owner"][0]), "--work", str(tmp_path / "work"), "--connect-timeout", "2"]
    assert party_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    waiting = [line for line in err if f"no connection to {endpoint} yet after" in line]
    assert len(waiting) >= 2 and "is the owner running there" in waiting[0] and "gives up in" in waiting[0]
    assert err[-1] == (f"error: no connection to the owner at {endpoint} after 2 s (--connect-timeout): check the "
                       "address and port, that `owner --listen` runs there, and that a firewall lets this machine "
                       "reach that port")


def test_a_round_end_is_told_in_words():
    assert round_end_text({"participants": ["a", "b", "c"]}) == "3 parties took part (a, b, c)"
    assert round_end_text({"participants": ["a"]}) == "1 party took part (a)"
    assert round_end_text({"aborted": "too few shares"}) == "aborted: too few shares"
    assert round_end_text({"aborted": True}) == "aborted"
