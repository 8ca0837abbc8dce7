"""The owner keeps only well-formed numbers from what a party reports about its round: a party's statistics
feed metrics.jsonl, summary.json and the weighted train loss, so a malformed one must never crash the owner."""

from __future__ import annotations

import math

import pytest

from owner.records import clean_stats


def test_numbers_and_short_strings_are_kept():
    raw = {"loss_mean": 2.5, "steps": 8, "accountant": "rdp", "epsilon": 1.5, "delta": 1e-5,
           "accountant_history": [[0.5, 0.03, 8], [0.5, 0.03, 8]]}
    assert clean_stats(raw) == (raw, [])


@pytest.mark.parametrize("value", ["x" * 65, None, True, math.nan, math.inf, [1, 2], {"a": 1}])
def test_malformed_values_are_dropped_and_named(value):
    clean, dropped = clean_stats({"loss_mean": value, "steps": 3})
    assert clean == {"steps": 3} and dropped == ["loss_mean"]


def test_malformed_accountant_history_and_lone_epsilon_are_dropped():
    clean, dropped = clean_stats({"epsilon": 2.0, "accountant_history": [[1, "a", 3]]})
    assert clean == {} and dropped == ["accountant_history", "epsilon (no delta)"]
    assert clean_stats({"accountant_history": [[1.0, 0.1, 2]] * 10_001})[0] == {}


@pytest.mark.parametrize("raw", [None, [1, 2], "loss", 3])
def test_a_non_object_is_dropped_whole(raw):
    assert clean_stats(raw) == ({}, [type(raw).__name__])
