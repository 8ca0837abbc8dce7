"""FedAvg of LoRA states (paper Eq. 11): p_m = |D_m| / sum |D|.

The owner aggregates *deltas* from the state it sent (identical to averaging states, since the weights sum
to one); deltas are small, so the secure-aggregation fixed-point ring spends its precision where it matters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from errors import ConfigError


def check_same_layout(states: Sequence[Mapping[str, torch.Tensor]], reference: Mapping[str, torch.Tensor]) -> None:
    for i, state in enumerate(states):
        if state.keys() != reference.keys():
            missing = sorted(set(reference) - set(state))[:3]
            extra = sorted(set(state) - set(reference))[:3]
            raise ConfigError(f"update {i} has the wrong tensor names (missing {missing}, unexpected {extra})")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(reference[name].shape):
                raise ConfigError(f"update {i}: {name} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(reference[name].shape)}")


def fedavg_weights(n_examples: Sequence[int]) -> list[float]:
    if not n_examples or any(n <= 0 for n in n_examples):
        raise ConfigError(f"FedAvg needs positive data sizes, got {list(n_examples)}")
    total = float(sum(n_examples))
    return [n / total for n in n_examples]


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], n_examples: Sequence[int]) -> dict[str, torch.Tensor]:
    """Weighted average of LoRA states, accumulated in float64."""
    weights = fedavg_weights(n_examples)
    check_same_layout(states, states[0])
    return {
        name: sum(w * s[name].double() for w, s in zip(weights, states, strict=True)).float().contiguous()
        for name in states[0]
    }
