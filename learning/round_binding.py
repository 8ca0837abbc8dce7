"""What a party trains on in a round, as digests both sides compute on their own.

`state_digest` covers the global state the owner sent for the round (adapter and emulator LoRA): a party
contributes at most once from one state for one owner, whatever the run id. `round_binding` covers everything
the round's update depends on that the owner chose: the run settings as the party parsed them, the model
archive, that state and the secure-aggregation config. It enters the secure round's transcript, so parties
that were sent different settings or state hold different transcripts, refuse each other's view signatures
and reveal nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def state_digest(adapter: Mapping[str, Any], emulator: Mapping[str, Any]) -> bytes:
    """SHA-256 over both LoRA parts, tensor by tensor in name order: name, dtype, shape and bytes."""
    h = hashlib.sha256(b"fedbiot-state/1")
    for part, tensors in (("adapter", adapter), ("emulator", emulator)):
        for name in sorted(tensors):
            value = tensors[name]
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            array = np.ascontiguousarray(array)
            h.update(_canonical([part, name, array.dtype.str, list(array.shape)]))
            h.update(array.tobytes())
    return h.digest()


def round_binding(settings: Mapping[str, Any], model_sha256: str, state: bytes, secagg: Mapping[str, Any]
                  ) -> bytes:
    """SHA-256 over the run settings (`PartyRunSettings.to_dict()`), the archive's sha256, the state digest
    and the secure-aggregation config with the round's party count and session (`ROUND_START`'s `secagg`
    fields less the party's own id)."""
    shared = {k: v for k, v in secagg.items() if k != "party_id"}
    h = hashlib.sha256(b"fedbiot-round/1")
    for piece in (_canonical(dict(settings)), model_sha256.encode(), state, _canonical(shared)):
        h.update(len(piece).to_bytes(8, "big") + piece)
    return h.digest()
