"""Masked secure aggregation: the owner learns the weighted sum of the parties' updates, never one update.

Bonawitz et al. (CCS 2017) double masking with SecAgg+ (Bell et al., CCS 2020) sparse graphs as an option,
safe against an owner colluding with up to c parties (t > (n + c) / 2, consistency and view signatures, a
connectivity check on the summed parties); transport-free state machines (`SecAggParty`, `SecAggServer`), a
party's own floors (`PartyPolicy`) and durable record (`SecAggLedger`), the round declared once (`ROUND`), and an
in-process driver. See README.md.
"""

from secure_agg.config import PartyPolicy, RoundParams, SecAggConfig, round_params
from secure_agg.driver import AggregateResult, aggregate_in_process
from secure_agg.errors import SecAggError
from secure_agg.ledger import SecAggLedger
from secure_agg.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    InputAck,
    MaskedInput,
    RelayedShares,
    Roster,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    message_from_wire,
    wire_size,
)
from secure_agg.party import SecAggParty
from secure_agg.round import ROUND, RoundStage
from secure_agg.server import SecAggServer, ServerResult
from secure_agg.stages import STAGES, Stage

__all__ = [
    "AdvertiseKeys", "AggregateResult", "ConsistencyRequest", "ConsistencySignature", "InputAck", "MaskedInput",
    "PartyPolicy", "ROUND", "RelayedShares", "Roster", "RoundParams", "RoundStage", "STAGES", "SecAggConfig",
    "SecAggError", "SecAggLedger", "SecAggParty", "SecAggServer", "ServerResult", "ShareKeys", "Stage",
    "UnmaskRequest", "UnmaskShares", "aggregate_in_process", "message_from_wire", "round_params", "wire_size",
]
