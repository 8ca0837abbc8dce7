"""Batches: padding to the batch's own longest item, seeded per round, length-grouped."""

from __future__ import annotations

import pytest
import torch

from errors import ConfigError, DataError
from tasks.batching import collate, eval_batches, padding_fraction, round_batches
from tasks.prompts import IGNORE_INDEX, TokenizedExample

PAD = 0


def item(uid: int, length: int, prompt: int = 1) -> TokenizedExample:
    """An item whose first token is its unique id + 1 (never the pad id), so batches can be traced back."""
    ids = [uid + 1] + [7] * (length - 1)
    return TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:])


def varied(n: int = 60) -> list[TokenizedExample]:
    gen = torch.Generator().manual_seed(123)
    return [item(i, int(torch.randint(2, 120, (1,), generator=gen))) for i in range(n)]


def uids(batch: dict[str, torch.Tensor]) -> list[int]:
    return (batch["input_ids"][:, 0] - 1).tolist()


def test_collate_pads_to_batch_max():
    data = [item(0, 3), item(1, 5, prompt=2), item(2, 40)]
    batch = collate(data[:2], PAD)  # the 40-token item is not in this batch
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"][0].tolist() == [1, 7, 7, PAD, PAD]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 7, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 7, 7]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError):
        collate([], PAD)


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_round_batches_deterministic_per_seed_and_round():
    data = varied()
    first = round_batches(data, 3, steps=4, batch_size=5, seed=11, pad_id=PAD)
    assert_same(first, round_batches(data, 3, steps=4, batch_size=5, seed=11, pad_id=PAD))
    assert [uids(b) for b in first] != [uids(b) for b in round_batches(data, 4, 4, 5, 11, PAD)]
    assert [uids(b) for b in first] != [uids(b) for b in round_batches(data, 3, 4, 5, 12, PAD)]
    assert len(first) == 4 and all(b["input_ids"].shape[0] == 5 for b in first)


def test_round_batches_draw_without_replacement_within_an_epoch():
    data = varied(20)
    batches = round_batches(data, 0, steps=4, batch_size=5, seed=0, pad_id=PAD)
    assert sorted(u for b in batches for u in uids(b)) == list(range(20))
    batches = round_batches(data, 0, steps=6, batch_size=5, seed=0, pad_id=PAD)  # 1.5 epochs
    counts = torch.bincount(torch.tensor([u for b in batches for u in uids(b)]), minlength=20)
    assert counts.min() >= 1 and counts.max() <= 2


def test_round_batches_with_data_smaller_than_batch():
    data = [item(0, 4), item(1, 9), item(2, 6)]
    batches = round_batches(data, 1, steps=2, batch_size=8, seed=5, pad_id=PAD)
    assert [b["input_ids"].shape[0] for b in batches] == [8, 8]
    assert set(u for b in batches for u in uids(b)) == {0, 1, 2}


def test_round_batches_cut_padding():
    data = varied(80)
    steps, batch_size = 8, 10
    grouped = padding_fraction(round_batches(data, 0, steps, batch_size, seed=1, pad_id=PAD))
    # the same amount of data batched in random order, as a plain sampler would
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(1)).tolist()
    plain = [collate([data[i] for i in perm[k:k + batch_size]], PAD) for k in range(0, steps * batch_size,
                                                                                       batch_size)]
    assert grouped < padding_fraction(plain) / 2


def test_round_batches_shuffle_batch_order():
    data = varied(80)
    widths = [b["input_ids"].shape[1] for b in round_batches(data, 2, 8, 10, seed=3, pad_id=PAD)]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


def test_round_batches_errors():
    with pytest.raises(ConfigError):
        round_batches(varied(5), 0, steps=0, batch_size=2, seed=0, pad_id=PAD)
    with pytest.raises(ConfigError):
        round_batches(varied(5), 0, steps=2, batch_size=0, seed=0, pad_id=PAD)
    with pytest.raises(DataError):
        round_batches([], 0, steps=1, batch_size=2, seed=0, pad_id=PAD)


def test_eval_batches_cover_everything_once_sorted():
    data = varied(23)
    batches = list(eval_batches(data, 4, PAD))
    assert [b["input_ids"].shape[0] for b in batches] == [4] * 5 + [3]
    assert sorted(u for b in batches for u in uids(b)) == list(range(23))
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths, reverse=True)
    assert_same(batches, list(eval_batches(data, 4, PAD)))


def test_padding_fraction():
    batch = collate([item(0, 2), item(1, 4)], PAD)  # 8 positions, 2 padded
    assert padding_fraction([batch]) == pytest.approx(2 / 8)
    assert padding_fraction([batch, collate([item(2, 4)], PAD)]) == pytest.approx(2 / 12)
    assert padding_fraction([]) == 0.0
