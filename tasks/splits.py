"""Split a data set over parties: i.i.d. (GSM8K in the paper) or one party per category (Dolly).

Seeds are derived from (seed, purpose) with a hash, never from global random state, so the owner's
simulation and a networked party that splits the same file get the same parts.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from errors import ConfigError, DataError
from tasks.datasets import Example


def derived_rng(*parts: object) -> random.Random:
    """A private generator seeded from a tuple of labels."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def split_iid(examples: Sequence[Example], n_parts: int, seed: int) -> list[list[Example]]:
    """A seeded shuffle cut into `n_parts` parts whose sizes differ by at most one."""
    if n_parts < 1:
        raise ConfigError(f"cannot split data into {n_parts} parts: need at least 1")
    if n_parts > len(examples):
        raise ConfigError(f"cannot split {len(examples)} examples into {n_parts} non-empty parts")
    order = list(range(len(examples)))
    derived_rng(seed, "split-iid").shuffle(order)
    base, extra = divmod(len(examples), n_parts)
    parts: list[list[Example]] = []
    start = 0
    for i in range(n_parts):
        size = base + (1 if i < extra else 0)
        parts.append([examples[j] for j in order[start:start + size]])
        start += size
    return parts


def split_by_category(examples: Sequence[Example], seed: int = 0) -> dict[str, list[Example]]:
    """One part per category, keyed by category name in sorted order, each part shuffled (seeded)."""
    groups: dict[str, list[Example]] = {}
    for i, example in enumerate(examples, 1):
        if not example.category:
            raise DataError(f"example {i} has no category, so the data cannot be split by category "
                            "(use the i.i.d. split)")
        groups.setdefault(example.category, []).append(example)
    out: dict[str, list[Example]] = {}
    for name in sorted(groups):
        part = groups[name]
        derived_rng(seed, "split-category", name).shuffle(part)
        out[name] = part
    return out
