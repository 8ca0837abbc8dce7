"""Secure aggregation end to end: the unmasked sum, dropouts at every stage, aborts, overflow, uniformity."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from errors import ConfigError, FedbiotError
from secure_agg import (
    STAGES,
    SecAggConfig,
    SecAggError,
    SecAggParty,
    SecAggServer,
    Stage,
    aggregate_in_process,
    round_params,
)
from secure_agg.encoding import encode, rounding_rng, unpack

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def plain_levels(vectors, weights, config, round_id, seed, members):
    """Sum of the parties' own encodings (no masks): what the unmasked result must equal exactly."""
    config = dataclasses.replace(config, rounding_seed=seed)
    params = round_params(config, len(vectors))
    total = np.zeros(len(vectors[0]) + 2, dtype=np.int64)
    for m in members:
        words = encode(np.asarray(vectors[m]), weights[m], config, params, rounding_rng(config, round_id, m))
        total += words.view(np.int64)
    return total[:-2] / 2.0 ** config.frac_bits, int(total[-2])


@st.composite
def rounds(draw):
    n = draw(st.integers(3, 20))
    length = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    clip = draw(st.sampled_from([0.5, 1.0, 4.0]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    vectors = [rng.uniform(-1.5 * clip, 1.5 * clip, length).astype(dtype) for _ in range(n)]
    max_weight = draw(st.sampled_from([1, 100, 1 << 16]))
    weights = [int(w) for w in rng.integers(1, max_weight + 1, n)]
    stages = [draw(st.sets(st.integers(0, n - 1), max_size=max(0, n // 3))) for _ in range(5)]
    graph = draw(st.sampled_from(["complete", "sparse"]))
    config = SecAggConfig(clip=clip, max_weight=max_weight, graph=graph,
                          degree=draw(st.sampled_from([None, 2, 4])))
    return vectors, weights, config, seed, stages


@PROPERTY
@given(rounds())
def test_unmasked_sum_equals_plain_weighted_sum(case):
    """Any dropout pattern: either the exact sum over the parties that sent inputs, or a clean abort."""
    vectors, weights, config, seed, (before_adv, before_share, after_share, before_sign, before_unmask) = case
    n = len(vectors)
    t = round_params(config, n).min_survivors
    # What the protocol must do, stage by stage, on the complete graph (the sparse graph may also abort when
    # the alive parties' graph could be split by the colluders).
    u1 = set(range(n)) - before_adv
    u2 = u1 - before_share
    u3 = u2 - after_share
    signers = u3 - before_sign
    u4 = signers - before_unmask
    complete_ok = min(len(u1), len(u2), len(u3), len(signers), len(u4)) >= t
    try:
        drops = {Stage.ADVERTISE: before_adv, Stage.SHARE_KEYS: before_share, Stage.MASKED_INPUT: after_share,
                 Stage.CONSISTENCY: before_sign, Stage.UNMASK: before_unmask}
        result = aggregate_in_process(vectors, weights, config, round_id=7, seed=seed, drops=drops)
    except SecAggError as exc:
        event(f"aborted ({config.graph})")
        assert "aborted" in str(exc)
        assert config.graph == "sparse" or not complete_ok
        return
    assert complete_ok
    any_drop = bool(before_adv | before_share | after_share | before_sign | before_unmask)
    event(f"completed ({config.graph}, {'with' if any_drop else 'no'} dropouts)")
    included = result.included
    assert set(included) == u3 and set(result.dropped) == u2 - u3  # nobody is pruned: all or nothing
    assert len(included) >= t
    clip = config.clip
    assert result.clipped == sum(int(np.count_nonzero(np.abs(vectors[m]) > clip)) for m in included)
    expected_sum, expected_weight = plain_levels(vectors, weights, config, 7, seed, included)
    np.testing.assert_array_equal(result.weighted_sum, expected_sum)
    assert result.total_weight == expected_weight == sum(weights[m] for m in included)
    # Against the float weighted sum: only the stochastic rounding (< 1 level per party) differs.
    exact = sum(weights[m] * np.clip(vectors[m].astype(np.float64), -config.clip, config.clip)
                for m in included)
    assert np.abs(result.weighted_sum - exact).max() <= len(included) * 2.0 ** -config.frac_bits + 1e-9
    np.testing.assert_allclose(result.mean(), exact / expected_weight, atol=2.0 ** -config.frac_bits)


def test_no_dropout_sparse_graph_many_parties_matches_average():
    rng = np.random.default_rng(1)
    n, length = 40, 300
    vectors = [rng.normal(0, 0.2, length) for _ in range(n)]
    weights = [int(w) for w in rng.integers(1, 500, n)]
    result = aggregate_in_process(vectors, weights, SecAggConfig(graph="sparse"), round_id=0, seed=3,
                                  drops={Stage.MASKED_INPUT: {5, 17}, Stage.UNMASK: {9}})
    kept = [m for m in range(n) if m not in (5, 17)]
    assert result.included == kept and result.dropped == [5, 17]
    expected = np.average(np.stack([vectors[m] for m in kept]), axis=0, weights=[weights[m] for m in kept])
    np.testing.assert_allclose(result.mean(), expected, atol=1e-5)
    assert result.total_weight == sum(weights[m] for m in kept)


@pytest.mark.parametrize("stage", STAGES)
def test_below_threshold_aborts_at_every_stage(stage):
    vectors = [np.full(8, 0.25) for _ in range(7)]  # n = 7, c = 2, t = 5 > (7 + 2) / 2: losing 3 leaves 4
    assert round_params(SecAggConfig(), 7).min_survivors == 5
    with pytest.raises(SecAggError, match="aborted.*below the threshold 5.*nothing was unmasked"):
        aggregate_in_process(vectors, [1] * 7, SecAggConfig(), round_id=1, seed=0, drops={stage: {0, 2, 4}})
    # One fewer dropout and the same round completes.
    result = aggregate_in_process(vectors, [1] * 7, SecAggConfig(), round_id=1, seed=0, drops={stage: {0, 2}})
    assert len(result.included) == (7 if stage in (Stage.CONSISTENCY, Stage.UNMASK) else 5)


def test_aborted_server_unmasks_nothing_and_refuses_to_go_on():
    config = SecAggConfig()
    server = SecAggServer(config, 5, 4, round_id=0, session="s")
    parties = [SecAggParty(config, u, 5, 0, "s") for u in range(5)]
    for u in range(2):
        server.receive_advertise(parties[u].advertise())
    with pytest.raises(SecAggError, match="only 2 parties advertised keys"):
        server.close_advertise()
    assert server.stage == "aborted"
    with pytest.raises(SecAggError):
        server.finish()
    with pytest.raises(SecAggError):
        server.receive_advertise(parties[3].advertise())


def test_sum_at_the_ring_bounds_does_not_overflow():
    """Every party at max weight and at +clip (or -clip): the ring was sized for exactly this."""
    config = SecAggConfig(clip=2.0, frac_bits=20, max_weight=1000)
    n = 9
    for sign in (1.0, -1.0):
        vectors = [np.full(5, sign * 3.0) for _ in range(n)]  # clipped to +-2
        result = aggregate_in_process(vectors, [1000] * n, config, round_id=0, seed=0)
        np.testing.assert_array_equal(result.weighted_sum, np.full(5, sign * 2.0 * 1000 * n))
        assert result.total_weight == 1000 * n


def test_ring_size_follows_party_count_and_overflow_is_refused():
    config = SecAggConfig(clip=1.0, frac_bits=16, max_weight=1 << 16)
    assert round_params(config, 3).ring_bits == 40
    assert round_params(config, 127).ring_bits == 40
    assert round_params(config, 128).ring_bits == 48
    for n in (3, 10, 1000):
        p = round_params(config, n)
        assert n * p.level_bound < 2 ** (p.ring_bits - 1) and p.ring_bits % 8 == 0
    with pytest.raises(SecAggError, match="overflow a 64-bit ring"):
        round_params(SecAggConfig(clip=8.0, frac_bits=40, max_weight=1 << 20), 10)
    with pytest.raises(SecAggError, match="at least|between 2"):
        round_params(config, 1)
    small = SecAggConfig(max_weight=10)
    with pytest.raises(SecAggError, match="weight 11 is outside"):
        aggregate_in_process([np.zeros(3)] * 3, [5, 11, 5], small, round_id=0, seed=0)
    with pytest.raises(SecAggError, match="NaN"):
        aggregate_in_process([np.zeros(3), np.array([0.0, np.nan, 0.0]), np.zeros(3)], [1, 1, 1], small,
                             round_id=0, seed=0)


def test_config_validation_and_threshold_rules():
    with pytest.raises(ConfigError):
        SecAggConfig(clip=0)
    with pytest.raises(ConfigError):
        SecAggConfig(graph="ring")
    with pytest.raises(ConfigError):
        SecAggConfig(threshold=0.5)
    assert issubclass(SecAggError, FedbiotError)
    sparse = SecAggConfig(graph="sparse", degree=6, threshold=0.6, rounding_seed=4)
    assert SecAggConfig.from_dict(json.loads(json.dumps(sparse.to_dict()))) == sparse
    with pytest.raises(ConfigError, match="unknown"):
        SecAggConfig.from_dict({"clip": 1.0, "bits": 3})
    assert SecAggConfig().threshold_for(10) == 6
    assert SecAggConfig().threshold_for(10, collusion=3) == 7  # t > (n + c) / 2
    assert SecAggConfig().threshold_for(5, collusion=1) == 4
    assert SecAggConfig(threshold=0.8).threshold_for(10) == 8
    assert SecAggConfig(threshold=0.55).threshold_for(4) == 3  # never below (n + c) / 2
    assert SecAggConfig(threshold=7).threshold_for(10) == 7
    with pytest.raises(SecAggError, match="does not exceed"):
        SecAggConfig(threshold=5).threshold_for(10)
    with pytest.raises(SecAggError, match="does not exceed"):
        SecAggConfig(threshold=6).threshold_for(10, collusion=2)
    with pytest.raises(SecAggError, match="exceeds"):
        SecAggConfig(threshold=12).threshold_for(10)
    with pytest.raises(ConfigError, match="collusion"):
        SecAggConfig(collusion=-1)
    # The default collusion bound: fewer than a third, at least one; on the sparse graph also below half the
    # degree, but never below the parties' default floor (5% of the parties), which raises the degree.
    assert [round_params(SecAggConfig(), n).collusion for n in (3, 4, 7, 10, 100)] == [1, 1, 2, 3, 33]
    with pytest.raises(SecAggError, match="fewer than 2 honest"):
        round_params(SecAggConfig(), 2)
    sparse100 = round_params(SecAggConfig(graph="sparse"), 100)
    assert (sparse100.degree, sparse100.collusion, sparse100.min_survivors) == (14, 6, 54)
    sparse200 = round_params(SecAggConfig(graph="sparse"), 200)
    assert (sparse200.degree, sparse200.collusion) == (22, 10)
    assert round_params(SecAggConfig(graph="sparse", collusion=10), 100).degree == 22  # at least 2c + 2
    with pytest.raises(SecAggError, match="fewer than 2 honest"):
        round_params(SecAggConfig(collusion=3), 4)


def chi_square_limit(dof: int, z: float = 4.75) -> float:
    """Wilson-Hilferty upper quantile of chi-square (z = 4.75: p about 1e-6)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square(values: np.ndarray, bins: int) -> float:
    counts = np.bincount(values, minlength=bins)
    expected = values.size / bins
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_single_masked_vector_looks_uniform():
    """Zero input, so any structure would show; the unmasked encoding of the same input fails the test."""
    n, length = 3, 40_000
    config = SecAggConfig()
    params = round_params(config, n)
    server = SecAggServer(config, n, length, round_id=0, session="uniform")
    parties = [SecAggParty(config, u, n, 0, "uniform") for u in range(n)]
    for p in parties:
        server.receive_advertise(p.advertise())
    rosters = server.close_advertise()
    for p in parties:
        server.receive_shares(p.share_keys(rosters[p.party_id]))
    relays = server.close_shares()
    masked = parties[0].contribute(np.zeros(length), 7).masked_input(relays[0])
    words = unpack(masked.masked, params.ring_bytes)[:-1]
    limit = chi_square_limit(255)
    top = (words >> np.uint64(params.ring_bits - 8)).astype(np.int64)
    low = (words & np.uint64(255)).astype(np.int64)
    assert chi_square(top, 256) < limit and chi_square(low, 256) < limit
    # Negative control: the same statistic on the plain encoding is far beyond the limit.
    plain = encode(np.zeros(length), 7, config, params, rounding_rng(config, 0, 0))[:-1]
    assert chi_square((plain & np.uint64(255)).astype(np.int64), 256) > 100 * limit


def test_costs_are_accounted():
    length = 1000
    result = aggregate_in_process([np.zeros(length)] * 4, [1] * 4, SecAggConfig(), round_id=0, seed=0)
    masked_bytes = (length + 2) * result.ring_bits // 8
    assert all(s > masked_bytes for s in result.party_sent)
    assert sum(result.party_sent) == result.server_received
    assert sum(result.party_received) == result.server_sent
    assert result.server_cpu_s > 0 and all(c > 0 for c in result.party_cpu_s)


def test_cost_benchmark_writes_table(tmp_path, capsys):
    from benchmarks.secure_agg_cost import main

    assert main(["--out", str(tmp_path), "--params", "500", "--parties", "4", "6"]) == 0
    table = (tmp_path / "secure_agg_cost.md").read_text()
    rows = json.loads((tmp_path / "secure_agg_cost.json").read_text())["rows"]
    assert {(r["parties"], r["dropped"]) for r in rows} == {(4, 0), (4, 1), (6, 0), (6, 1)}
    assert all(r["expansion"] > 1 and r["max_abs_error_of_mean"] < 1e-4 for r in rows)
    assert table.count("\n| 6 |") == 4 and "sparse" in table
    assert "party CPU" in capsys.readouterr().out


@pytest.mark.parametrize("graph", ["complete", "sparse"])
def test_dropout_at_the_consistency_check_keeps_the_input_in_the_sum(graph):
    """A party that sends its input but no signature is no signer; its self mask is rebuilt from shares."""
    rng = np.random.default_rng(5)
    n = 12
    vectors = [rng.uniform(-1, 1, 20) for _ in range(n)]
    weights = [int(w) for w in rng.integers(1, 9, n)]
    config = SecAggConfig(graph=graph, degree=6)
    result = aggregate_in_process(vectors, weights, config, round_id=3, seed=2,
                                  drops={Stage.MASKED_INPUT: {0}, Stage.CONSISTENCY: {4, 9}, Stage.UNMASK: {7}})
    assert result.included == [u for u in range(n) if u != 0] and result.dropped == [0]
    expected_sum, expected_weight = plain_levels(vectors, weights, config, 3, 2, result.included)
    np.testing.assert_array_equal(result.weighted_sum, expected_sum)
    assert result.total_weight == expected_weight


def test_the_documented_default_floors_are_the_derived_ones():
    """The table of defaults in docs/privacy.md and secure_agg/README.md is what round_params derives, and every
    row leaves at least two honest inputs in any sum (the party's default floor holds at every n)."""
    from pathlib import Path

    from secure_agg import PartyPolicy

    root = Path(__file__).resolve().parents[1]
    for n in (3, 5, 10, 50, 100):
        p = round_params(SecAggConfig(), n)
        PartyPolicy().check(p, 0)  # a default party accepts the default round
        assert p.min_honest >= 2
        row = f"| {n} | {p.collusion} | {p.min_survivors} | {n - p.min_survivors} | {p.min_honest} |"
        for readme in ("docs/privacy.md", "secure_agg/README.md"):
            assert row in (root / readme).read_text(), (readme, row)
