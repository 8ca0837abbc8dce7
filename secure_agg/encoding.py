"""Floats to the ring Z_{2^k} and back: clipping, stochastic fixed-point rounding, FedAvg weighting.

A party encodes round(n_m * clip(x) * 2^f) element-wise and appends its weight n_m and the number of
elements it clipped, so the masked sum carries sum n_m x_m, sum n_m and the round's clipped count: the owner
divides once and learns how often the clip bound bit in total, never per party. Values are held as uint64
(two's complement); adding uint64 arrays wraps mod 2^64, which is also correct mod 2^k for k <= 64, so
masks are added in 64 bits and cut to k bits only when packed for the wire (k/8 bytes per element,
little-endian).
"""

from __future__ import annotations

import numpy as np

from secure_agg.config import RoundParams, SecAggConfig
from secure_agg.errors import SecAggError


def rounding_rng(config: SecAggConfig, round_id: int, party: int) -> np.random.Generator:
    """The stochastic-rounding stream of one party in one round (purpose-tagged, never global state)."""
    return np.random.default_rng([config.rounding_seed, 0x5EC466, round_id, party])


def encode(vector: np.ndarray, weight: int, config: SecAggConfig, params: RoundParams,
           rng: np.random.Generator) -> np.ndarray:
    """Ring elements (uint64, length len(vector) + 2) of weight * clip(vector), then the weight, then the
    number of clipped elements (capped at the per-party bound, so the sum cannot overflow)."""
    x = np.asarray(vector)
    if x.ndim != 1 or x.dtype.kind != "f":
        raise SecAggError(f"the input must be a 1-D float vector, got dtype {x.dtype} and shape {x.shape}")
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer):
        raise SecAggError(f"the weight must be an int (a data size), got {weight!r}")
    weight = int(weight)
    if not 1 <= weight <= config.max_weight:
        raise SecAggError(f"weight {weight} is outside [1, max_weight={config.max_weight}]: the ring was "
                          "sized for max_weight, so a larger weight could overflow the sum")
    if not np.isfinite(x).all():
        raise SecAggError("the input vector holds NaN or infinite values")
    scaled = x.astype(np.float64)
    clipped = int(np.count_nonzero(np.abs(scaled) > config.clip))
    np.clip(scaled, -config.clip, config.clip, out=scaled)
    scaled *= weight * 2.0 ** config.frac_bits
    scaled += rng.random(scaled.size)
    levels = np.floor(scaled, out=scaled).astype(np.int64)
    if levels.size and int(np.abs(levels).max()) > params.level_bound:
        raise SecAggError("an encoded element exceeds the ring's per-party bound")  # guards the sizing maths
    out = np.empty(levels.size + 2, dtype=np.uint64)
    out[:-2] = levels.view(np.uint64)
    out[-2] = weight
    out[-1] = min(clipped, params.level_bound)
    return out


def decode(total: np.ndarray, config: SecAggConfig, params: RoundParams) -> tuple[np.ndarray, int, int]:
    """(sum of weight * x as float64, sum of weights, clipped elements) from the unmasked ring sum (uint64,
    any high bits)."""
    shift = np.uint64(64 - params.ring_bits)
    signed = ((total << shift).view(np.int64) >> shift.astype(np.int64))
    weight, clipped = int(signed[-2]), int(signed[-1])
    if not 1 <= weight <= params.n_parties * config.max_weight:
        raise SecAggError(f"the unmasked total weight {weight} is impossible: the masks did not cancel")
    if not 0 <= clipped <= params.n_parties * params.level_bound:
        raise SecAggError(f"the unmasked clip count {clipped} is impossible: the masks did not cancel")
    return signed[:-2].astype(np.float64) / 2.0 ** config.frac_bits, weight, clipped


def pack(words: np.ndarray, ring_bytes: int) -> np.ndarray:
    """Keep the low `ring_bytes` bytes of each uint64: the wire form of ring elements."""
    as_bytes = np.ascontiguousarray(words, dtype="<u8").view(np.uint8).reshape(-1, 8)
    return np.ascontiguousarray(as_bytes[:, :ring_bytes]).reshape(-1)


def unpack(packed: np.ndarray, ring_bytes: int) -> np.ndarray:
    rows = packed.reshape(-1, ring_bytes)
    full = np.zeros((rows.shape[0], 8), dtype=np.uint8)
    full[:, :ring_bytes] = rows
    return full.view("<u8").reshape(-1).astype(np.uint64, copy=False)
