"""FedAvg of LoRA states (paper Eq. 11): p_m = |D_m| / sum |D|, plain or through masked secure aggregation.

The owner aggregates *deltas* from the state it sent (identical to averaging states, since the weights sum
to one); deltas are small, so the secure-aggregation fixed-point ring spends its precision where it matters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from errors import ConfigError
from learning.lora import apply_delta, unflatten_state
from learning.secure_update import CLIP, update_vector
from learning.training import PartyUpdate
from secure_agg import SecAggConfig, ServerResult, aggregate_in_process


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


def plain_fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[int],
                 sent: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """A plain round's FedAvg, clipped as a masked round is; returns the new state and the round's aggregate
    figures (`aggregate_figures` of a masked round)."""
    states, clipped = clip_updates(states, sent)
    return fedavg(states, weights), {"clipped_fraction": clipped, "examples": int(sum(weights))}


def aggregate_figures(result: ServerResult) -> dict:
    """What a masked round lets the owner record: the clipped fraction and the examples in the sum."""
    return {"clipped_fraction": result.clipped_fraction, "examples": int(result.total_weight)}


def secure_mean(result: ServerResult, sent: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FedAvg out of masked aggregation: the state the owner sent plus the weighted mean of the deltas
    (`ServerResult.mean()`), the only thing the owner learns."""
    return apply_delta(sent, unflatten_state(result.mean(), sent, sorted(sent)))


def secure_fedavg(updates: Sequence[PartyUpdate], sent: Mapping[str, torch.Tensor], config: SecAggConfig,
                  round_idx: int, seed: int) -> tuple[dict[str, torch.Tensor], ServerResult]:
    """FedAvg through the full in-process message flow of `secure_agg` (wire round-trips included), with the
    settings the networked run announces, so the two runs encode the same numbers."""
    vectors = [update_vector(u.adapter_state, sent) for u in updates]
    result = aggregate_in_process(vectors, [u.n_examples for u in updates], config, round_id=round_idx, seed=seed)
    return secure_mean(result, sent), result


def clip_updates(states: Sequence[Mapping[str, torch.Tensor]], sent: Mapping[str, torch.Tensor],
                 clip: float = CLIP) -> tuple[list[dict[str, torch.Tensor]], float]:
    """Bound each element of every update's delta from `sent` to [-clip, clip], as masked aggregation does,
    so plain and secure rounds combine the same numbers; returns the states and the fraction clipped.
    Elements within the bound are returned bit for bit."""
    out, clipped, total = [], 0, 0
    for state in states:
        check_same_layout([state], sent)
        fixed = {}
        for name, value in state.items():
            base = sent[name].to(value.dtype)
            delta = value - base
            over = delta.abs() > clip
            clipped += int(over.sum())
            total += delta.numel()
            fixed[name] = torch.where(over, base + delta.clamp(-clip, clip), value) if over.any() else value
        out.append(fixed)
    return out, clipped / max(total, 1)
