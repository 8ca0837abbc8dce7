"""One whole round in one process: every message takes its wire form and back, and is counted.

Used by the owner's in-process simulation and by the tests and the cost benchmark; the networked run drives
the same SecAggParty / SecAggServer objects over ZeroMQ instead.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from secure_agg.config import PartyPolicy, SecAggConfig
from secure_agg.errors import SecAggError
from secure_agg.messages import wire_size
from secure_agg.party import SecAggParty
from secure_agg.server import SecAggServer, ServerResult

M = TypeVar("M")
# (header, arrays) -> (bytes on the wire, header and arrays as the receiver decodes them)
Transit = Callable[[dict, dict[str, np.ndarray]], tuple[int, dict, dict[str, np.ndarray]]]


@dataclass
class AggregateResult(ServerResult):
    """The owner's result plus the round's cost: wire bytes and CPU seconds per side."""

    ring_bits: int = 0
    party_sent: list[int] = field(default_factory=list)  # bytes each party sent
    party_received: list[int] = field(default_factory=list)
    server_sent: int = 0
    server_received: int = 0
    party_cpu_s: list[float] = field(default_factory=list)  # CPU s in each party's steps, incl. wire codec
    server_cpu_s: float = 0.0


class _Meter:
    """Counts bytes and CPU time while passing messages through their wire form."""

    def __init__(self, n: int, transit: Transit) -> None:
        self.transit = transit
        self.party_sent, self.party_received = [0] * n, [0] * n
        self.server_sent = self.server_received = 0
        self.party_cpu, self.server_cpu = [0.0] * n, 0.0

    def party(self, u: int, fn: Callable[..., M], *args: Any) -> M:
        start = time.process_time()
        try:
            return fn(*args)
        finally:
            self.party_cpu[u] += time.process_time() - start

    def server(self, fn: Callable[..., M], *args: Any) -> M:
        start = time.process_time()
        try:
            return fn(*args)
        finally:
            self.server_cpu += time.process_time() - start

    def to_server(self, u: int, msg: M) -> M:
        header, arrays = self.party(u, msg.to_wire)  # type: ignore[attr-defined]
        size, header, arrays = self.transit(header, arrays)
        self.party_sent[u] += size
        self.server_received += size
        return self.server(type(msg).from_wire, header, arrays)  # type: ignore[attr-defined]

    def to_party(self, u: int, msg: M) -> M:
        header, arrays = self.server(msg.to_wire)  # type: ignore[attr-defined]
        size, header, arrays = self.transit(header, arrays)
        self.server_sent += size
        self.party_received[u] += size
        return self.party(u, type(msg).from_wire, header, arrays)  # type: ignore[attr-defined]


def _transit(header: dict, arrays: dict[str, np.ndarray]) -> tuple[int, dict, dict[str, np.ndarray]]:
    """What the other side gets: the header through JSON, every array as a fresh copy of its bytes."""
    text = json.dumps(header, separators=(",", ":"))
    copies = {k: np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape) for k, a in arrays.items()}
    return wire_size(header, arrays), json.loads(text), copies


def aggregate_in_process(vectors: Sequence[np.ndarray], weights: Sequence[int], config: SecAggConfig, *,
                         round_id: int, seed: int, drop_before_share: Collection[int] = (),
                         drop_after_share: Collection[int] = (), drop_before_unmask: Collection[int] = (),
                         drop_before_advertise: Collection[int] = (), drop_before_consistency: Collection[int] = (),
                         session: str | None = None, transit: Transit | None = None,
                         policy: PartyPolicy | None = None) -> AggregateResult:
    """Securely aggregate `vectors` weighted by `weights` (party m = index m), simulating dropouts.

    seed: the run seed; it seeds the stochastic rounding (replacing config.rounding_seed, so a networked
    party configured with rounding_seed = run seed encodes the same numbers) and names the default session.
    Dropouts: drop_before_advertise never shows up; drop_before_share advertises keys and is lost before
    sending its shares; drop_after_share sends its shares and no input; drop_before_consistency sends its
    input and no consistency signature; drop_before_unmask signs and sends no unmask reply. A party in
    several sets drops at the earliest. Raises SecAggError when the round
    aborts (fewer than the threshold left at some stage).
    transit: carries every message across (default: JSON header + array copies, sized by `wire_size`); a
    transport's own codec can be passed so that `party_sent` etc. count its exact bytes.
    policy: every party's own floors (default `PartyPolicy()`); a config below them raises SecAggError.
    """
    n = len(vectors)
    if len(weights) != n:
        raise SecAggError(f"{n} vectors but {len(weights)} weights")
    lengths = {np.asarray(v).size for v in vectors}
    if len(lengths) != 1:
        raise SecAggError(f"the parties' vectors differ in length: {sorted(lengths)}")
    drops = [set(drop_before_advertise), set(drop_before_share), set(drop_after_share),
             set(drop_before_consistency), set(drop_before_unmask)]
    for d in drops:
        if any(isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < n for u in d):
            raise SecAggError(f"dropout ids {sorted(d, key=str)} must be party indices in 0..{n - 1}")
    gone: set[int] = set()

    def present(stage: int) -> list[int]:
        gone.update(drops[stage])
        return [u for u in range(n) if u not in gone]

    config = dataclasses.replace(config, rounding_seed=seed)
    session = session if session is not None else f"sim-{seed}"
    meter = _Meter(n, transit or _transit)
    server = meter.server(SecAggServer, config, n, lengths.pop(), round_id, session)
    parties = [meter.party(u, lambda u=u: SecAggParty(config, u, n, round_id, session, policy=policy))
               for u in range(n)]

    for u in present(0):
        server.receive_advertise(meter.to_server(u, meter.party(u, parties[u].advertise)))
    rosters = meter.server(server.close_advertise)
    for u in present(1):
        if u in rosters:
            shares = meter.party(u, parties[u].share_keys, meter.to_party(u, rosters[u]))
            meter.server(server.receive_shares, meter.to_server(u, shares))
    relays = meter.server(server.close_shares)
    for u in present(2):
        if u in relays:
            relayed = meter.to_party(u, relays[u])
            masked = meter.party(u, parties[u].masked_input, relayed, np.asarray(vectors[u]), weights[u])
            ack = meter.server(server.receive_masked_input, meter.to_server(u, masked))
            meter.party(u, parties[u].receive_ack, meter.to_party(u, ack))
    checks = meter.server(server.close_inputs)
    for u in present(3):
        if u in checks:
            signature = meter.party(u, parties[u].consistency_check, meter.to_party(u, checks[u]))
            meter.server(server.receive_consistency, meter.to_server(u, signature))
    requests = meter.server(server.close_consistency)
    for u in present(4):
        if u in requests:
            reply = meter.party(u, parties[u].unmask, meter.to_party(u, requests[u]))
            meter.server(server.receive_unmask, meter.to_server(u, reply))
    result = meter.server(server.finish)
    return AggregateResult(**dataclasses.asdict(result), ring_bits=server.params.ring_bits,
                           party_sent=meter.party_sent, party_received=meter.party_received,
                           server_sent=meter.server_sent, server_received=meter.server_received,
                           party_cpu_s=meter.party_cpu, server_cpu_s=meter.server_cpu)
