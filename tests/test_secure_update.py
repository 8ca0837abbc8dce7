"""Secure-update settings: the ring stays at 32 bits when it can, precision holds, and big rounds widen it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learning.secure_update import FRAC_BITS, MIN_FRAC_BITS, frac_bits_for, secagg_config, update_vector
from secure_agg import aggregate_in_process, round_params
from secure_agg.encoding import pack


@pytest.mark.parametrize("sizes", [[134, 133, 133], [40] * 10, [4] * 100, [1, 1, 1], [1000, 3, 7, 900, 12]])
def test_everyday_rounds_use_a_32_bit_ring(sizes):
    config = secagg_config(sizes, seed=0)
    params = round_params(config, len(sizes))
    assert params.ring_bits == 32
    assert MIN_FRAC_BITS <= config.frac_bits <= FRAC_BITS
    # no bit wasted: one more fractional bit would not fit (unless already at the finest resolution)
    if config.frac_bits < FRAC_BITS:
        finer = round_params(type(config)(**{**config.to_dict(), "frac_bits": config.frac_bits + 1}), len(sizes))
        assert finer.ring_bits > 32
    masked = pack(np.zeros(1000, dtype=np.uint64), params.ring_bytes)
    assert masked.nbytes == 4 * 1000  # one masked element costs what a float32 does


def test_large_rounds_keep_precision_and_widen_the_ring():
    n, max_weight = 100, 1 << 12
    assert frac_bits_for(n, max_weight) == MIN_FRAC_BITS
    config = secagg_config([max_weight] * n, seed=0)
    assert config.frac_bits == MIN_FRAC_BITS and round_params(config, n).ring_bits > 32


def test_masked_mean_of_deltas_is_exact_to_the_fixed_point_resolution():
    rng = np.random.default_rng(0)
    sizes = [134, 133, 133]
    received = {"a": torch.zeros(64, 32), "b": torch.zeros(16)}
    trained = [{k: v + torch.from_numpy(rng.normal(0, 2e-3, v.shape)).float() for k, v in received.items()}
               for _ in sizes]
    vectors = [update_vector(t, received) for t in trained]
    config = secagg_config(sizes, seed=5)
    result = aggregate_in_process(vectors, sizes, config, round_id=0, seed=5)
    expected = sum(w * v for w, v in zip(sizes, vectors, strict=True)) / sum(sizes)
    mean = result.weighted_sum / result.total_weight
    assert result.ring_bits == 32
    assert np.abs(mean - expected).max() <= len(sizes) * 2.0 ** -config.frac_bits / sum(sizes) * 1.01
