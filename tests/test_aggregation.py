"""FedAvg weighting and the flat-vector view used by secure aggregation."""

from __future__ import annotations

import pytest
import torch

from errors import ConfigError
from learning.lora import apply_delta, flatten_state, state_delta, unflatten_state
from owner.aggregation import fedavg, fedavg_weights


def states():
    g = torch.Generator().manual_seed(0)
    return [{"a.lora_A.weight": torch.randn(2, 3, generator=g), "a.lora_B.weight": torch.randn(4, 2, generator=g)}
            for _ in range(3)]


def test_fedavg_weights_by_data_size():
    s = states()
    out = fedavg(s, [10, 30, 60])
    expected = 0.1 * s[0]["a.lora_A.weight"] + 0.3 * s[1]["a.lora_A.weight"] + 0.6 * s[2]["a.lora_A.weight"]
    assert torch.allclose(out["a.lora_A.weight"], expected, atol=1e-6)
    assert fedavg_weights([1, 3]) == [0.25, 0.75]


def test_fedavg_of_deltas_equals_fedavg_of_states():
    s = states()
    base = s[0]
    via_delta = apply_delta(base, fedavg([state_delta(x, base) for x in s], [1, 2, 3]))
    direct = fedavg(s, [1, 2, 3])
    for n in base:
        assert torch.allclose(via_delta[n], direct[n], atol=1e-6)


def test_fedavg_rejects_bad_layouts_and_weights():
    s = states()
    bad = dict(s[1])
    bad["a.lora_A.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConfigError, match="shape"):
        fedavg([s[0], bad], [1, 1])
    with pytest.raises(ConfigError, match="names"):
        fedavg([s[0], {"x": torch.zeros(1)}], [1, 1])
    with pytest.raises(ConfigError, match="positive"):
        fedavg(s, [1, 0, 2])


def test_flatten_round_trip():
    s = states()[0]
    names = sorted(s)
    vec = flatten_state(s, names)
    assert vec.shape == (6 + 8,)
    back = unflatten_state(vec, s, names)
    assert all(torch.equal(back[n], s[n]) for n in names)


def test_plain_updates_are_clipped_like_masked_ones_and_untouched_within_the_bound():
    from owner.aggregation import clip_updates  # noqa: PLC0415

    sent = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
    inside = {"a": torch.full((2, 3), 0.3), "b": torch.ones(4) - 0.7}
    outside = {"a": torch.tensor([[2.0, -3.0, 0.5], [0.0, 0.0, 0.0]]), "b": torch.ones(4)}
    states, fraction = clip_updates([inside, outside], sent, clip=1.0)
    assert all(torch.equal(states[0][k], inside[k]) for k in inside)  # bit for bit: nothing to clip
    assert torch.equal(states[1]["a"], torch.tensor([[1.0, -1.0, 0.5], [0.0, 0.0, 0.0]]))
    assert fraction == 2 / 20
