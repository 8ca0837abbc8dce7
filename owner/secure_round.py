"""FedAvg through masked secure aggregation, in process: the owner learns only sum n_m * delta_m and sum n_m.

Runs the full message flow of `secure_agg` (wire round-trips included) with the settings the networked run
announces, so the two runs encode the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

from learning.lora import apply_delta, unflatten_state
from learning.secure_update import secagg_config, update_vector
from learning.training import PartyUpdate
from secure_agg import aggregate_in_process


def secure_fedavg(updates: Sequence[PartyUpdate], sent_adapter: dict, config, round_idx: int
                  ) -> tuple[dict, dict]:
    """Aggregate with masking; returns (new adapter state, cost record)."""
    weights = [u.n_examples for u in updates]
    vectors = [update_vector(u.adapter_state, sent_adapter) for u in updates]
    result = aggregate_in_process(vectors, weights, secagg_config(weights, config.seed, config.secagg_graph),
                                  round_id=round_idx, seed=config.seed)
    mean = unflatten_state(result.weighted_sum / result.total_weight, sent_adapter, sorted(sent_adapter))
    info = {
        "bytes_up": int(sum(result.party_sent)),
        "secagg": {"ring_bits": result.ring_bits, "party_cpu_s": max(result.party_cpu_s),
                   "owner_cpu_s": result.server_cpu_s, "owner_bytes_sent": result.server_sent},
    }
    return apply_delta(sent_adapter, mean), info
