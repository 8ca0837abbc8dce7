"""The round binding and the global-state digest: equal inputs, equal digests; any difference a party trains
on (settings, archive, state, secure-aggregation config), a different one; a party's own id, no difference."""

from __future__ import annotations

import numpy as np
import torch

from learning.round_binding import round_binding, state_digest


def state(shift: float = 0.0):
    return ({"a.lora_A.weight": np.full((2, 3), 0.5 + shift, np.float32)},
            {"e.lora_B.weight": np.zeros((3, 2), np.float32)})


SETTINGS = {"run_id": "run-x", "seed": 0, "train": {"lr": 1e-3, "local_steps": 8}, "lora": {"r": 8}}
SECAGG = {"config": {"clip": 1.0, "frac_bits": 22, "rounding_seed": 0}, "n_parties": 3, "session": "run-x",
          "stage_s": 20.0, "party_id": 0}


def test_the_state_digest_covers_every_tensor_and_only_them():
    adapter, emulator = state()
    assert state_digest(adapter, emulator) == state_digest(*state())
    torch_adapter = {k: torch.from_numpy(v) for k, v in adapter.items()}
    assert state_digest(torch_adapter, emulator) == state_digest(adapter, emulator)  # numpy or torch alike
    assert state_digest(*state(1e-6)) != state_digest(adapter, emulator)
    assert state_digest(adapter, {}) != state_digest(adapter, emulator)
    assert state_digest(emulator, adapter) != state_digest(adapter, emulator)  # the parts are named
    as_f64 = {k: v.astype(np.float64) for k, v in adapter.items()}
    assert state_digest(as_f64, emulator) != state_digest(adapter, emulator)


def test_the_binding_changes_with_everything_a_party_trains_on():
    digest = state_digest(*state())
    base = round_binding(SETTINGS, "ab" * 32, digest, SECAGG)
    assert base == round_binding(dict(SETTINGS), "ab" * 32, digest, {**SECAGG, "party_id": 2})
    tiny_lr = {**SETTINGS, "train": {**SETTINGS["train"], "lr": 5e-324}}
    changed = [
        round_binding(tiny_lr, "ab" * 32, digest, SECAGG),
        round_binding(SETTINGS, "cd" * 32, digest, SECAGG),
        round_binding(SETTINGS, "ab" * 32, state_digest(*state(1e-6)), SECAGG),
        round_binding(SETTINGS, "ab" * 32, digest,
                      {**SECAGG, "config": {**SECAGG["config"], "rounding_seed": 1}}),
        round_binding(SETTINGS, "ab" * 32, digest, {**SECAGG, "n_parties": 4}),
    ]
    assert len({base, *changed}) == 1 + len(changed)
