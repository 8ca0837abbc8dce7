"""Party splits: seeded, disjoint, complete; one party per category."""

from __future__ import annotations

import pytest

from errors import ConfigError, DataError
from tasks.datasets import Example, load_examples
from tasks.splits import split_by_category, split_iid

DATA = [Example(f"prompt {i}", f"response {i}", "abc"[i % 3]) for i in range(23)]


def test_iid_is_complete_disjoint_and_balanced():
    parts = split_iid(DATA, 4, seed=7)
    assert len(parts) == 4
    assert sorted(len(p) for p in parts) == [5, 6, 6, 6]
    flat = [ex for p in parts for ex in p]
    assert sorted(flat, key=DATA.index) == DATA  # every example exactly once


def test_iid_is_seeded():
    assert split_iid(DATA, 3, seed=1) == split_iid(DATA, 3, seed=1)
    assert split_iid(DATA, 3, seed=1) != split_iid(DATA, 3, seed=2)
    assert split_iid(DATA, 3, seed=1)[0] != DATA[:8]  # shuffled, not cut in file order


def test_iid_single_part_and_one_per_part():
    [only] = split_iid(DATA, 1, seed=0)
    assert sorted(only, key=DATA.index) == DATA
    assert all(len(p) == 1 for p in split_iid(DATA[:5], 5, seed=0))


@pytest.mark.parametrize("n_parts", [0, -1, 24])
def test_iid_rejects_empty_parts(n_parts):
    with pytest.raises(ConfigError):
        split_iid(DATA, n_parts, seed=0)


def test_by_category_groups_and_sorts():
    groups = split_by_category(DATA, seed=3)
    assert list(groups) == ["a", "b", "c"]
    for name, part in groups.items():
        assert {ex.category for ex in part} == {name}
        assert sorted(part, key=DATA.index) == [ex for ex in DATA if ex.category == name]
    assert groups == split_by_category(DATA, seed=3)
    assert groups != split_by_category(DATA, seed=4)  # order inside a category follows the seed


def test_by_category_on_dolly_sample():
    groups = split_by_category(load_examples("dolly"))
    assert len(groups) == 8 and list(groups) == sorted(groups)
    assert sum(len(p) for p in groups.values()) == 400


def test_by_category_needs_categories():
    data = [*DATA[:2], Example("no", "category")]
    with pytest.raises(DataError, match="example 3 has no category"):
        split_by_category(data)
