"""The data options of both nodes: column mappings reach the loader, are saved in config.json, fail early."""

from __future__ import annotations

import pytest

from errors import ConfigError
from owner.cli import main as owner_main
from owner.config import RunConfig
from owner.session import OwnerData
from owner.simulate import party_splits
from party.cli import main as party_main
from tasks.datasets import Example

ROWS = "q,a,topic\n" + "".join(f"Question {i}?,Answer {i},{'ab'[i % 2]}\n" for i in range(6))


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "own.csv"
    path.write_text(ROWS, encoding="utf-8")
    return str(path)


def test_party_columns_reach_the_simulated_parties(table):
    config = RunConfig(party_data=table, party_columns="prompt=q,response=a,category=topic", parties=2,
                       split="category")
    parts = party_splits(config)
    assert sorted(len(p) for p in parts) == [3, 3]
    assert {ex.category for ex in parts[0]} in ({"a"}, {"b"})
    assert Example("Question 1?", "Answer 1", "b") in parts[0] + parts[1]


def test_owner_data_uses_public_and_eval_columns(table):
    config = RunConfig(public_data=table, public_columns="prompt=q,response=a", public_limit=4,
                       eval_data=table, eval_columns="prompt=a,response=q", eval_items=2)
    data = OwnerData.load(config)
    assert data.public == [Example(f"Question {i}?", f"Answer {i}") for i in range(4)]
    assert data.evaluation == [Example(f"Answer {i}", f"Question {i}?") for i in range(2)]


def test_columns_are_saved_in_config_json(tmp_path):
    config = RunConfig(party_columns="prompt=q,response=a", eval_columns="prompt=x,response=y,context=z")
    config.save(tmp_path / "config.json")
    again = RunConfig.load(tmp_path / "config.json")
    assert (again.party_columns, again.public_columns, again.eval_columns) == (
        "prompt=q,response=a", None, "prompt=x,response=y,context=z")


def test_bad_mapping_fails_in_the_config():
    with pytest.raises(ConfigError, match="--public-columns: column mapping: response missing"):
        RunConfig(public_columns="prompt=q")


def test_owner_cli_bad_columns_is_one_error_line(tmp_path, capsys):
    code = owner_main(["--simulate", "2", "--out", str(tmp_path / "run"), "--eval-columns", "prompt=q,answer=a"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --eval-columns: column mapping: unknown role 'answer' " \
                                "(roles: prompt, response, context, category)\n"
    assert not (tmp_path / "run").exists()


def test_party_cli_bad_columns_fails_before_connecting(tmp_path, capsys):
    code = party_main(["--connect", "tcp://127.0.0.1:9", "--data", "dolly", "--columns", "prompt=q",
                       "--key", str(tmp_path / "none.key_secret"), "--owner-key", str(tmp_path / "owner.key")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: column mapping: response missing") and err.count("\n") == 1
