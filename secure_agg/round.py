"""A secure round, declared once: its stages in order, each with the party's step and the message it sends, and
the owner's receive and close steps, as references to the state machines' own methods.

Three loops run a round over this table and nothing else: the in-process driver (`secure_agg.driver`), the
networked owner (`owner.rounds`) and the networked party (`party.rounds`). In every stage each party still in
the round takes its step on what the owner relayed to it at the close of the stage before (nothing, in the
first), the owner receives each party's message (answering at once where the stage has an answer) and, when
the stage closes, relays to each party the input of its next step; the last close is the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from secure_agg import messages as msg
from secure_agg.party import SecAggParty
from secure_agg.server import SecAggServer
from secure_agg.stages import Stage


@dataclass(frozen=True)
class RoundStage:
    """One stage: who does what with which message."""

    name: Stage
    what: str  # for progress lines: what the owner waits for
    party_receives: type | None  # the relayed message the party's step takes (None: the step starts the round)
    party_step: Callable[..., Any]  # SecAggParty method: (party[, received]) -> the message it sends
    party_sends: type
    server_receive: Callable[[SecAggServer, Any], Any]  # takes one party message; returns its answer or None
    answer: type | None  # what server_receive answers at once (None: nothing)
    party_takes_answer: Callable[[SecAggParty, Any], None] | None
    server_close: Callable[[SecAggServer], Any]  # {party id: next stage's input}, or the round's result
    quorum: bool  # the networked owner aborts when fewer than its --min-parties deliver this stage

    def take_step(self, party: SecAggParty, received: Any = None) -> Any:
        """The party's step on what was relayed to it (nothing in the first stage)."""
        return self.party_step(party) if self.party_receives is None else self.party_step(party, received)


ROUND: tuple[RoundStage, ...] = (
    RoundStage(Stage.ADVERTISE, "training and keys", None, SecAggParty.advertise, msg.AdvertiseKeys,
               SecAggServer.receive_advertise, None, None, SecAggServer.close_advertise, True),
    RoundStage(Stage.SHARE_KEYS, "key shares", msg.Roster, SecAggParty.share_keys, msg.ShareKeys,
               SecAggServer.receive_shares, None, None, SecAggServer.close_shares, False),
    RoundStage(Stage.MASKED_INPUT, "masked inputs", msg.RelayedShares, SecAggParty.masked_input, msg.MaskedInput,
               SecAggServer.receive_masked_input, msg.InputAck, SecAggParty.receive_ack, SecAggServer.close_inputs,
               True),
    RoundStage(Stage.CONSISTENCY, "consistency check", msg.ConsistencyRequest, SecAggParty.consistency_check,
               msg.ConsistencySignature, SecAggServer.receive_consistency, None, None, SecAggServer.close_consistency,
               False),
    RoundStage(Stage.UNMASK, "unmasking", msg.UnmaskRequest, SecAggParty.unmask, msg.UnmaskShares,
               SecAggServer.receive_unmask, None, None, SecAggServer.finish, False),
)
