"""The party's rounds: its own checks before it trains, training in a worker thread while the link stays live
(heartbeats, BYE, a newer round), then the update: masked, by walking the round's table (`secure_agg.ROUND`),
or plain where the party allows it.

A secure round is bound to what this party trains on (`learning.round_binding`: the run settings, the model
archive, the global state and the secure-aggregation config), so parties sent different things reveal nothing;
its peers are checked against the party's own consortium roster; it is claimed in the ledger before the first
key leaves, so neither it nor its global state can be used twice; and the party's randomness (batch order,
dropout, DP noise, stochastic rounding) is its own.

`after_stage` is called with the name of each secure-aggregation stage the party completed; the tests inject a
fault there (a party that vanishes right after sharing its keys, or pauses after its masked input).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from console.progress import counted
from learning.round_binding import round_binding, state_digest
from learning.run_settings import PartyRunSettings
from learning.secure_update import update_vector
from learning.training import PartyTrainer, PartyUpdate
from party.link import OwnerLink
from party.work_dir import WorkDir
from protocol import messages as m
from protocol.keys import load_public
from protocol.messages import Message, MessageType
from secure_agg import ROUND, SecAggConfig, SecAggError, SecAggParty, message_from_wire

if TYPE_CHECKING:
    from party.session import PartyOptions

STAGE_GRACE_S = 30.0  # beyond the owner's own stage budget: transit and a busy owner


class Interrupted(Exception):  # noqa: N818 - control flow, not an error
    """The round in progress is over for this party: a newer ROUND_START, a WELCOME from a restarted owner,
    or the owner's ROUND_END for this round arrived before the party finished it. `msg` is that message."""

    def __init__(self, msg: Message) -> None:
        self.msg = msg


class PartyRounds:
    """Runs the rounds the owner starts, once the session has a trainer for the run's settings."""

    def __init__(self, opts: PartyOptions, link: OwnerLink, work: WorkDir, log: Callable[[str], None],
                 step_line: Callable[[str, int, int, str], None],
                 after_stage: Callable[[str], None] | None = None) -> None:
        self.opts, self.link, self.work, self.log, self.step_line = opts, link, work, log, step_line
        self.owner_id = load_public(opts.owner_key).decode()  # the owner its ledger's states are kept per
        self.after_stage = after_stage or (lambda stage: None)
        self.settings: PartyRunSettings | None = None  # the run being joined (WELCOME)
        self.trainer: PartyTrainer | None = None
        self.rounds_done = 0  # rounds of this run finished in this process
        self.round_deadline = 0.0
        self.stage_s = 600.0  # how long the owner keeps a secure stage open (ROUND_START says)
        self.model_sha256 = ""  # the archive the party's model came from (what a round is bound to)
        self.after_round: Callable[[], None] = lambda: None  # before an update leaves: the DP record is saved

    def join(self, settings: PartyRunSettings) -> None:
        """A WELCOME's run: rounds finished in this process count for the run they belong to only."""
        if self.settings is None or settings.run_id != self.settings.run_id:
            self.rounds_done = 0
        self.settings = settings

    def last_contributed(self) -> int:
        """The last round of the run being joined (WELCOME's run id) that this party finished or masked an
        input for, -1 for none. Only this run's: the ledger also holds the rounds of every earlier run, which
        must not shorten a new one. READY carries it with the run id it refers to."""
        sent = self.work.ledger.rounds_claimed(self.settings.run_id) if self.settings is not None else []
        return max([self.rounds_done - 1, *sent])

    # ------------------------------------------------------------------------------ training
    def train(self, r: int, adapter: dict, emulator: dict) -> PartyUpdate:
        """Train in a worker thread; keep the link (heartbeats, BYE, newer rounds) in this one."""
        self.log(f"round {r + 1}: training {counted(self.trainer.settings.local_steps, 'step')}")
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(self.trainer.train_round, r, adapter, emulator, self.progress)
            interrupt: Message | None = None
            while not future.done():
                msg = self.link.receive(0.2)
                if msg is None:
                    continue
                if msg.type in (MessageType.ROUND_START, MessageType.WELCOME):
                    interrupt = msg
                elif msg.type is MessageType.ROUND_END and msg["round"] == r and interrupt is None:
                    interrupt = msg
                else:
                    self.log(f"ignored an unexpected {msg.type.value} while training round {r + 1}")
            update = future.result()
        if interrupt is not None:
            raise Interrupted(interrupt)
        return update

    def progress(self, info: dict) -> None:
        self.step_line(f"round {info['round'] + 1}", info["step"], info["steps"], f"loss {info['loss']:.4f}")

    def wait_for(self, kind: MessageType, r: int, stage: str | None = None, timeout: float | None = None
                 ) -> Message:
        """The next `kind` message of round r. By default it waits as long as the owner may keep the stage open:
        until the round's deadline, then one stage budget (both announced in ROUND_START), so a fast party does
        not abandon a round the owner still runs for its slowest trainer."""
        deadline = time.monotonic() + timeout if timeout is not None else (
            max(self.round_deadline, time.monotonic()) + self.stage_s + STAGE_GRACE_S)
        self.link.waiting_for = (f"the owner to close round {r + 1} (it aggregates, then aligns the emulator)"
                                 if kind is MessageType.ROUND_END else f"{stage or kind.value} of round {r + 1}")
        while time.monotonic() < deadline:
            msg = self.link.receive(0.5)
            if msg is None:
                continue
            if msg.type in (MessageType.ROUND_START, MessageType.WELCOME):
                raise Interrupted(msg)
            if msg.type is MessageType.ROUND_END and kind is not MessageType.ROUND_END:
                raise SecAggError(f"the owner closed round {r + 1} early: {round_end_text(msg['summary'])}")
            if msg.type is kind and (stage is None or msg["stage"] == stage):
                return msg
            self.log(f"ignored an unexpected {msg.type.value} in round {r + 1}")
        raise SecAggError(f"timed out waiting for {stage or kind.value} in round {r + 1}")

    # ------------------------------------------------------------------------------ secure aggregation
    def secure_party(self, r: int, fields: dict, state: bytes) -> SecAggParty:
        """This round's secure-aggregation state, after the party's own checks: a roster to check its peers
        against, its policy (collusion bound, degree, fewest honest inputs in any sum), its minimum number of
        parties, and its ledger (one round per run and round number, one per global state, ever). The round is
        bound to what the party was sent. Raises SecAggError: the round is refused before training."""
        run_id = self.settings.run_id
        if fields.get("session") != run_id:
            raise SecAggError(f"round {r + 1} names session {fields.get('session')!r}, not this run's")
        if self.opts.roster is None and not self.opts.trust_owner_peers:
            raise SecAggError("this party pins no consortium roster, so it cannot tell its peers from identities "
                              "the owner controls: pass --roster FILE (or --trust-owner-peers to take the owner's "
                              "word for it)")
        if fields["n_parties"] < self.opts.min_parties:
            raise SecAggError(f"round {r + 1} invites {fields['n_parties']} parties; this party requires at "
                              f"least {self.opts.min_parties} (--min-parties)")
        if self.work.ledger.entry(run_id, r)["claimed"]:
            raise SecAggError(f"this party already took part in round {r + 1} of this run (before a restart); a "
                              "round is never contributed twice")
        self.stage_s = float(fields.get("stage_s", self.stage_s))
        cfg = SecAggConfig.from_dict(fields["config"])
        binding = round_binding(self.settings.to_dict(), self.model_sha256, state, fields)
        return SecAggParty(cfg, fields["party_id"], fields["n_parties"], r, fields["session"],
                           policy=self.opts.policy, ledger=self.work.ledger, identity=self.opts.identity,
                           peers=self.opts.roster, binding=binding,
                           rounding_seed=None if self.opts.reproducible else secrets.randbits(63))

    def secure_exchange(self, r: int, agg: SecAggParty, update: PartyUpdate, received: dict, state: bytes
                        ) -> None:
        """The masked update, stage by stage as `secure_agg.ROUND` declares them, after claiming the round."""
        agg.contribute(update_vector(update.adapter_state, received), update.n_examples, clip=self.opts.clip)
        self.work.ledger.claim_round(self.settings.run_id, r, self.owner_id, state.hex())
        if self.opts.share_stats:  # opt-in: the owner sees them for this party alone
            self.link.send(m.round_stats(round=r, stats=shared_stats(self.trainer, update.stats)))
        for stage in ROUND:
            relayed = None if stage.party_receives is None else self.pull(r, stage.party_receives)
            self.push(r, stage.take_step(agg, relayed))
            if stage.answer is not None:
                stage.party_takes_answer(agg, self.pull(r, stage.answer))
            self.after_stage(stage.name)

    def push(self, r: int, obj) -> None:
        header, arrays = obj.to_wire()
        self.link.send(m.secagg(round=r, stage=header["type"], data=header, arrays=arrays))

    def pull(self, r: int, kind: type):
        got = self.wait_for(MessageType.SECAGG, r, kind.TYPE)
        obj = message_from_wire(got["data"], dict(got.tensors))
        if not isinstance(obj, kind):
            raise SecAggError(f"expected {kind.TYPE}, got {type(obj).TYPE}")
        return obj

    # ------------------------------------------------------------------------------ one round
    def run_round(self, msg: Message) -> None:
        r = msg["round"]
        if not msg["secagg"] and self.opts.require_secure_agg:
            # The owner cannot switch protection off silently: no raw update leaves this party.
            self.log(f"refused round {r + 1}: the owner asked for an unmasked update, and this party requires "
                     "secure aggregation (start it with --allow-plain to permit plain rounds)")
            return
        adapter, emulator = (tensors(part) for part in m.round_parts(msg))
        self.round_deadline = time.monotonic() + msg["deadline_s"]
        state = state_digest(adapter, emulator)
        try:
            agg = self.secure_party(r, msg["secagg"], state) if msg["secagg"] else None
            if agg is not None and self.work.ledger.has_state(self.owner_id, state.hex()):
                raise SecAggError("this party already took part from this global state; the same state twice "
                                  "would let the owner subtract two sums")
        except SecAggError as exc:
            self.log(f"refused round {r + 1}: {exc}")
            return
        update = self.train(r, adapter, emulator)
        self.after_round()  # before anything leaves: the accountant counts this round
        if agg is not None:
            self.secure_exchange(r, agg, update, adapter, state)
        else:
            self.link.send(m.update(round=r, n_examples=update.n_examples,
                                    stats=shared_stats(self.trainer, update.stats), tensors=update.adapter_state))
        eps = f", epsilon {update.stats['epsilon']:.3f}" if "epsilon" in update.stats else ""
        self.log(f"round {r + 1}: sent update (loss {update.stats['loss_mean']:.4f}{eps})")
        end = self.wait_for(MessageType.ROUND_END, r, timeout=self.opts.timeout)
        self.rounds_done = r + 1
        self.link.waiting_for = f"round {r + 2} to start"
        self.log(f"round {r + 1} closed by the owner: {round_end_text(end['summary'])}")


def round_end_text(summary: object) -> str:
    """A ROUND_END summary as words: who took part, or why the round was aborted."""
    if not isinstance(summary, dict):
        return str(summary)
    if isinstance(summary.get("participants"), list):
        names = [str(n) for n in summary["participants"]]
        return f"{counted(len(names), 'party')} took part ({', '.join(names)})"
    if summary.get("aborted"):
        reason = summary["aborted"]
        return "aborted" + (f": {reason}" if isinstance(reason, str) else "")
    return ", ".join(f"{k} {v}" for k, v in summary.items()) or "no summary"


def tensors(part: dict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in part.items()}


def shared_stats(trainer: PartyTrainer, stats: dict) -> dict:
    """What the owner may see: everything for a plain party; only privacy accounting for a DP party
    (its loss is computed from private data outside the DP guarantee)."""
    return trainer.shareable_stats(stats) if hasattr(trainer, "shareable_stats") else stats
