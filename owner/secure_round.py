"""FedAvg through masked secure aggregation: the owner learns only sum n_m * delta_m and sum n_m.

Parties mask their adapter *deltas* (new state minus the state the owner sent), which are small; the ring
spends its precision on them. The same settings serve the in-process run and the networked run, so both
encode the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from owner.aggregation import apply_delta, delta, flatten, unflatten
from party.training import PartyUpdate
from secure_agg import SecAggConfig, aggregate_in_process

CLIP = 1.0  # per-element bound on a party's delta (LoRA moves ~lr per step; 1.0 never binds in practice)
FRAC_BITS = 22  # fixed-point resolution 2^-22 ~ 2.4e-7


def secagg_config(n_examples: Sequence[int], seed: int, graph: str = "complete") -> SecAggConfig:
    """Settings for a round whose parties hold these data sizes (max_weight = next power of two)."""
    max_weight = 1 << max(1, int(max(n_examples)) - 1).bit_length()
    return SecAggConfig(clip=CLIP, frac_bits=FRAC_BITS, max_weight=max_weight, graph=graph,
                        rounding_seed=seed)


def flat_delta(update_state: dict, sent: dict, names: Sequence[str]) -> np.ndarray:
    return flatten(delta(update_state, sent), names)


def secure_fedavg(updates: Sequence[PartyUpdate], sent_adapter: dict, config, round_idx: int
                  ) -> tuple[dict, dict]:
    """Aggregate in process with the full message flow; returns (new adapter state, cost record)."""
    names = sorted(sent_adapter)
    weights = [u.n_examples for u in updates]
    vectors = [flat_delta(u.adapter_state, sent_adapter, names) for u in updates]
    result = aggregate_in_process(vectors, weights, secagg_config(weights, config.seed),
                                  round_id=round_idx, seed=config.seed)
    mean = unflatten(result.weighted_sum / result.total_weight, sent_adapter, names)
    info = {
        "bytes_up": int(sum(result.party_sent)),
        "secagg": {"ring_bits": result.ring_bits, "party_cpu_s": max(result.party_cpu_s),
                   "owner_cpu_s": result.server_cpu_s, "owner_bytes_sent": result.server_sent},
    }
    return apply_delta(sent_adapter, mean), info
