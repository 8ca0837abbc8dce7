"""Batches with dynamic padding and seeded, stateless sampling.

A party's batches for a round depend only on (seed, round), so a restarted party or a networked run
trains on exactly the batches of the in-process run. Items of similar length are batched together
because padding is wasted compute on a CPU-bound step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence

import torch

from errors import ConfigError, DataError
from tasks.prompts import IGNORE_INDEX, TokenizedExample


def collate(items: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels, right-padded to the longest item of this batch."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    width = max(len(it.input_ids) for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        input_ids[row, :n] = torch.tensor(it.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(it.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def round_generator(seed: int, round_idx: int) -> torch.Generator:
    """The generator of one round's draws, seeded from (seed, round) only."""
    digest = hashlib.sha256(f"{seed}/batches/{round_idx}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def draw_indices(n: int, count: int, generator: torch.Generator) -> list[int]:
    """`count` indices into range(n) from consecutive seeded permutations (no repeat within an epoch)."""
    drawn: list[int] = []
    while len(drawn) < count:
        drawn.extend(torch.randperm(n, generator=generator).tolist())
    return drawn[:count]


def round_batches(data: Sequence[TokenizedExample], round_idx: int, steps: int, batch_size: int, seed: int,
                  pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The `steps` batches of `batch_size` items a party trains on in round `round_idx`.

    The drawn items are sorted by length and cut into batches (less padding), then the batch order is
    shuffled with the same generator so training does not run from short to long items.
    """
    groups = round_batch_indices([len(it.input_ids) for it in data], round_idx, steps, batch_size, seed)
    return [collate([data[i] for i in group], pad_id) for group in groups]


def round_batch_indices(lengths: Sequence[int], round_idx: int, steps: int, batch_size: int,
                        seed: int) -> list[list[int]]:
    """The item indices of each of `round_batches`' batches, in order (for per-item caches of the owner)."""
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps and batch size must be at least 1, got {steps} and {batch_size}")
    if not lengths:
        raise DataError("no training examples to draw batches from")
    gen = round_generator(seed, round_idx)
    drawn = draw_indices(len(lengths), steps * batch_size, gen)
    drawn.sort(key=lambda i: lengths[i])  # stable: ties keep their drawn order
    groups = [drawn[k * batch_size:(k + 1) * batch_size] for k in range(steps)]
    order = torch.randperm(steps, generator=gen).tolist()
    return [groups[k] for k in order]


def poisson_indices(n: int, round_idx: int, steps: int, sample_rate: float, seed: int) -> list[list[int]]:
    """For each of `steps` steps, the items drawn independently with probability `sample_rate`.

    Poisson sampling is what DP-SGD's privacy accountant assumes (a fixed-size batch would void its
    amplification-by-subsampling bound). Each step has its own generator seeded from (seed, round, step),
    so a restarted party redraws exactly the same items; an empty draw is a valid step.
    """
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if not 0.0 < sample_rate <= 1.0:
        raise ConfigError(f"the sampling rate must be in (0, 1], got {sample_rate}")
    if n < 1:
        raise DataError("no training examples to draw batches from")
    drawn = []
    for step in range(steps):
        digest = hashlib.sha256(f"{seed}/poisson/{round_idx}/{step}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        drawn.append(torch.nonzero(torch.rand(n, generator=gen) < sample_rate).flatten().tolist())
    return drawn


def poisson_round_batches(data: Sequence[TokenizedExample], round_idx: int, steps: int, sample_rate: float,
                          seed: int, pad_id: int) -> list[dict[str, torch.Tensor] | None]:
    """The `steps` Poisson-sampled batches of one round; None stands for a step that drew no item."""
    return [collate([data[i] for i in idx], pad_id) if idx else None
            for idx in poisson_indices(len(data), round_idx, steps, sample_rate, seed)]


def eval_batches(data: Sequence[TokenizedExample], batch_size: int, pad_id: int
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Every item exactly once, longest first (the peak memory shows up in the first batch)."""
    for group in eval_groups(data, batch_size):
        yield collate([data[i] for i in group], pad_id)


def eval_groups(data: Sequence[TokenizedExample], batch_size: int) -> list[list[int]]:
    """The item indices of `eval_batches`' batches, in order (to collate other labels of the same items)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(data)), key=lambda i: -len(data[i].input_ids))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def padding_fraction(batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Share of positions that are padding over all batches (0.0 for no batches)."""
    padded = total = 0
    for batch in batches:
        mask = batch["attention_mask"]
        padded += int((mask == 0).sum())
        total += mask.numel()
    return padded / total if total else 0.0
