"""How a party's adapter update enters masked secure aggregation, agreed by both sides.

Parties mask their adapter *delta* (trained state minus the state the owner sent), flattened in sorted
tensor-name order; deltas are small, so the fixed-point ring spends its precision on them. The owner
builds the same `SecAggConfig` from the parties' data sizes and announces it in ROUND_START.

The ring is kept at 32 bits whenever the round allows it, so a masked element costs exactly what a float32
does and the uplink stays within a few hundred bytes of the plain update: the fractional bits are the most
(at most 22) for which n_parties * max_weight * clip * 2^f still fits a signed 32-bit sum (21 for three
parties of a few hundred examples). The mean's rounding error is at most 2^-f / (mean weight), unbiased;
a round that would need fewer than 16 bits (n_parties * max_weight >= 2^15) keeps 16 and a wider ring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from learning.lora import flatten_state, state_delta
from secure_agg import SecAggConfig, round_params
from secure_agg.config import MAX_PARTIES

CLIP = 1.0  # per-element bound on a party's delta (LoRA moves ~lr per step; 1.0 never binds in practice)
FRAC_BITS = 22  # the finest fixed-point resolution used, 2^-22 ~ 2.4e-7
MIN_FRAC_BITS = 16  # never coarser than 2^-16: beyond this the ring grows instead
TARGET_RING_BITS = 32  # the size of a float32


def frac_bits_for(n_parties: int, max_weight: int, clip: float = CLIP) -> int:
    """The most fractional bits in [MIN_FRAC_BITS, FRAC_BITS] whose round fits a 32-bit ring."""
    if not 2 <= n_parties <= MAX_PARTIES:  # no secure round possible; round_params reports it later
        return FRAC_BITS
    for bits in range(FRAC_BITS, MIN_FRAC_BITS, -1):
        # The ring depends on the party count, not on c: size it with c = 0, so a round the default collusion
        # bound makes impossible (two parties) is reported by whoever runs it, not here.
        config = SecAggConfig(clip=clip, frac_bits=bits, max_weight=max_weight, collusion=0)
        if round_params(config, n_parties).ring_bits <= TARGET_RING_BITS:
            return bits
    return MIN_FRAC_BITS


def secagg_config(n_examples: Sequence[int], seed: int, graph: str = "complete") -> SecAggConfig:
    """Settings for a round whose parties hold these data sizes (max_weight = next power of two)."""
    max_weight = 1 << max(1, int(max(n_examples)) - 1).bit_length()
    frac_bits = frac_bits_for(len(n_examples), max_weight)
    return SecAggConfig(clip=CLIP, frac_bits=frac_bits, max_weight=max_weight, graph=graph,
                        rounding_seed=seed)


def update_vector(trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The vector a party masks: its adapter delta in sorted-name order."""
    return flatten_state(state_delta(trained, received), sorted(received))
