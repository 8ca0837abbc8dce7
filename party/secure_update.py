"""How a party's adapter update enters masked secure aggregation, agreed by both sides.

Parties mask their adapter *delta* (trained state minus the state the owner sent), flattened in sorted
tensor-name order; deltas are small, so the fixed-point ring spends its precision on them. The owner
builds the same `SecAggConfig` from the parties' data sizes and announces it in ROUND_START.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from party.lora import flatten_state, state_delta
from secure_agg import SecAggConfig

CLIP = 1.0  # per-element bound on a party's delta (LoRA moves ~lr per step; 1.0 never binds in practice)
FRAC_BITS = 22  # fixed-point resolution 2^-22 ~ 2.4e-7


def secagg_config(n_examples: Sequence[int], seed: int, graph: str = "complete") -> SecAggConfig:
    """Settings for a round whose parties hold these data sizes (max_weight = next power of two)."""
    max_weight = 1 << max(1, int(max(n_examples)) - 1).bit_length()
    return SecAggConfig(clip=CLIP, frac_bits=FRAC_BITS, max_weight=max_weight, graph=graph, rounding_seed=seed)


def update_vector(trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The vector a party masks: its adapter delta in sorted-name order."""
    return flatten_state(state_delta(trained, received), sorted(received))
