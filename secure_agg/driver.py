"""One whole round in one process: every message takes its wire form and back, and is counted.

Used by the owner's in-process simulation and by the tests and the cost benchmark; the networked run drives
the same SecAggParty / SecAggServer objects over ZeroMQ instead. All three loop over `secure_agg.round.ROUND`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from secure_agg.config import PartyPolicy, SecAggConfig
from secure_agg.errors import SecAggError
from secure_agg.messages import wire_size
from secure_agg.party import SecAggParty
from secure_agg.round import ROUND
from secure_agg.server import SecAggServer, ServerResult
from secure_agg.stages import STAGES

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
                         round_id: int, seed: int, drops: Mapping[str, Collection[int]] | None = None,
                         session: str | None = None, transit: Transit | None = None,
                         policy: PartyPolicy | None = None) -> AggregateResult:
    """Securely aggregate `vectors` weighted by `weights` (party m = index m), simulating dropouts.

    seed: the run seed; it seeds the stochastic rounding (replacing config.rounding_seed, so a networked
    party configured with rounding_seed = run seed encodes the same numbers) and names the default session.
    drops: {stage name (`secure_agg.stages.Stage`): parties lost before taking that stage's step}: lost before
    `advertise` never shows up; before `share_keys`, advertised keys and sent no shares; before
    `masked_input`, shared keys and sent no input; before `consistency`, sent its input and no consistency
    signature; before `unmask`, signed and sent no unmask reply. A party lost once stays lost. Raises
    SecAggError when the round aborts (fewer than the threshold left at some stage).
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
    drops = dict(drops or {})
    unknown = sorted(set(drops) - set(STAGES))
    if unknown:
        raise SecAggError(f"unknown stages {unknown} in drops (stages: {', '.join(STAGES)})")
    for d in drops.values():
        if any(isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < n for u in d):
            raise SecAggError(f"dropout ids {sorted(d, key=str)} must be party indices in 0..{n - 1}")

    config = dataclasses.replace(config, rounding_seed=seed)
    session = session if session is not None else f"sim-{seed}"
    meter = _Meter(n, transit or _transit)
    server = meter.server(SecAggServer, config, n, lengths.pop(), round_id, session)
    parties = [meter.party(u, lambda u=u: SecAggParty(config, u, n, round_id, session, policy=policy))
               for u in range(n)]
    for u in range(n):
        parties[u].contribute(np.asarray(vectors[u]), weights[u])

    gone: set[int] = set()
    inbox: dict[int, Any] = dict.fromkeys(range(n))  # what each party's next step takes
    closed: Any = None
    for stage in ROUND:
        gone.update(drops.get(stage.name, ()))
        for u in sorted(set(inbox) - gone):
            received = None if stage.party_receives is None else meter.to_party(u, inbox[u])
            sent = meter.party(u, stage.take_step, parties[u], received)
            answer = meter.server(stage.server_receive, server, meter.to_server(u, sent))
            if stage.answer is not None:
                meter.party(u, stage.party_takes_answer, parties[u], meter.to_party(u, answer))
        closed = meter.server(stage.server_close, server)
        inbox = closed if isinstance(closed, dict) else {}
    result: ServerResult = closed
    return AggregateResult(**dataclasses.asdict(result), ring_bits=server.params.ring_bits,
                           party_sent=meter.party_sent, party_received=meter.party_received,
                           server_sent=meter.server_sent, server_received=meter.server_received,
                           party_cpu_s=meter.party_cpu, server_cpu_s=meter.server_cpu)
