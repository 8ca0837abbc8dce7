"""The networked owner's rounds: start a round, collect plain or masked updates, aggregate, record, end it.

A secure round is a loop over the round's table (`secure_agg.ROUND`): each stage collects one kind of party
message into the `SecAggServer`, then closes the stage and relays what the server answers to the parties
still in. Whoever is missing when a stage closes is treated as dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from console.progress import checkpointed, counted
from learning.round_binding import round_binding, state_digest
from learning.secure_update import secagg_config
from owner.aggregation import aggregate_figures, plain_fedavg, secure_mean
from owner.config import RunConfig
from owner.links import OwnerLinks, RoundAborted
from owner.metrics import MetricsLog, megabytes
from owner.records import clean_stats, privacy_reports, round_lines, round_record, run_totals
from owner.session import OwnerSession
from protocol import messages as m
from protocol.errors import ProtocolError
from protocol.messages import Message, MessageType
from secure_agg import ROUND, RoundStage, SecAggConfig, SecAggError, SecAggServer, message_from_wire

MAX_FAILED_ROUNDS = 3  # secure rounds aborting in a row before the owner stops (resumable)


@dataclass
class RoundPlan:
    """What ROUND_START announced: who was invited, with which secure-aggregation ids and settings."""

    round: int
    started: list[str]
    ids: dict[str, int]
    secagg: SecAggConfig | None
    binding: bytes = b""  # what the parties were sent to train on (learning.round_binding)


class RoundDriver:
    """Runs the session's rounds over the parties' links."""

    def __init__(self, session: OwnerSession, config: RunConfig, links: OwnerLinks, log: MetricsLog, *,
                 run_id: str, min_parties: int, join_timeout: float, round_timeout: float,
                 party_timeout: float) -> None:
        self.session, self.config, self.links, self.log = session, config, links, log
        self.run_id, self.min_parties, self.join_timeout = run_id, min_parties, join_timeout
        self.round_timeout, self.party_timeout = round_timeout, party_timeout
        self.privacy: dict[str, dict] = {}  # each DP party's latest privacy report (summary.json "dp")
        self.failed_rounds = 0  # secure rounds aborted in a row
        self.stage_s = 2 * party_timeout  # a secure stage after the first stays open this long (parties told)
        adapter, _ = session.payload()
        self.adapter_spec = {n: (tuple(t.shape), "F32") for n, t in adapter.items()}
        links.update_spec = {} if config.secure_agg else self.adapter_spec

    def welcome(self) -> Message:
        return m.welcome(run_id=self.run_id, settings=self.config.party_settings(self.run_id).to_dict(),
                         round=self.session.round, **self.links.archive.info.welcome_fields())

    def run(self) -> dict:
        first = True
        while not self.session.done:
            participants = self.links.wait_for_parties(self.config.parties, self.min_parties, self.join_timeout,
                                                       first, self.session.round)
            first = False
            self.run_round(participants)
        return self.session.finish({
            **run_totals(self.session.history, self.config.secure_agg),
            "rejected_messages": self.links.rejected, "refused_connections": self.links.refused_connections,
            **({"dp": dict(sorted(self.privacy.items()))} if self.privacy else {}),
        })

    # ------------------------------------------------------------------------------ one round
    def run_round(self, participants: list[str]) -> None:
        r = self.session.round
        start = time.perf_counter()
        links = self.links.links
        if self.config.secure_agg:
            # A party that already took part in this round (the owner restarted after it advertised its keys)
            # refuses to do it again: its ledger says so, and READY told us. Leave it out rather than wait for it.
            done = [n for n in participants if links[n].last_round >= r]
            for name in done:
                self.log.say(f"{name} already took part in round {r + 1} before a restart: it sits this round "
                             "out")
            participants = [n for n in participants if n not in done]
            if len(participants) < self.min_parties:
                self.skip_round(r, f"{counted(len(done), 'party')} had already contributed to round {r + 1} before the "
                                   "owner restarted; a round is never aggregated twice")
                return
        before = {n: (link.bytes_down, link.bytes_up) for n, link in links.items()}
        self.log.say(f"round {r + 1}/{self.config.rounds}: {counted(len(participants), 'party')} "
                     f"({', '.join(participants)})")
        plan = self.start_round(r, participants)
        deadline = time.monotonic() + self.round_timeout
        try:
            if plan.secagg is not None:
                new_adapter, stats, weights, extra = self.secure_round(plan, deadline)
            else:
                new_adapter, stats, weights, extra = self.plain_round(plan, deadline)
        except SecAggError as exc:
            # Nothing was unmasked; the parties' ledgers forbid masking round r again, so the run goes on with
            # the next round (a run that keeps failing stops, resumable).
            self.end_round(r, plan.started, {"aborted": str(exc)})
            self.failed_rounds += 1
            if self.failed_rounds >= MAX_FAILED_ROUNDS:
                raise RoundAborted(f"round {r + 1} aborted by secure aggregation: {exc}; {MAX_FAILED_ROUNDS} "
                                   f"rounds in a row failed; {checkpointed(r)}, restart with --resume"
                                   ) from None
            self.skip_round(r, f"secure aggregation aborted ({exc})")
            return
        except RoundAborted:
            self.end_round(r, plan.started, {"aborted": True})
            raise
        stats = {name: self.party_stats(name, stats[name]) for name in sorted(stats)}
        down = sum(link.bytes_down - before.get(n, (0, 0))[0] for n, link in links.items())
        up = sum(link.bytes_up - before.get(n, (0, 0))[1] for n, link in links.items())
        record = round_record(stats, weights, mb_down=megabytes(down), mb_up=megabytes(up),
                              seconds=time.perf_counter() - start, secure_agg=self.config.secure_agg, **extra)
        self.privacy.update(privacy_reports(stats))
        self.session.complete_round(new_adapter, record)
        self.failed_rounds = 0
        self.end_round(r, plan.started, {"participants": record["participants"]})
        for line in round_lines(r + 1, self.config.rounds, record):
            self.log.say(line)

    def skip_round(self, r: int, reason: str) -> None:
        """Close round r without an aggregate (the adapter stays as it was) and go on with the next."""
        self.log.say(f"round {r + 1}/{self.config.rounds} skipped: {reason}")
        adapter, _ = self.session.payload()
        self.session.complete_round(adapter, round_record({}, {}, mb_down=0.0, mb_up=0.0, seconds=0.0,
                                                          secure_agg=True, skipped=reason))

    def start_round(self, r: int, participants: list[str]) -> RoundPlan:
        adapter, emulator = self.session.payload()
        ids = {name: i for i, name in enumerate(participants)}
        cfg = None
        secagg: dict = {}
        if self.config.secure_agg:
            cfg = secagg_config([self.links.links[p].n_examples for p in participants], self.config.seed,
                                self.config.secagg_graph)
            secagg = {"config": cfg.to_dict(), "n_parties": len(participants), "session": self.run_id,
                      "stage_s": self.stage_s}
        binding = b""
        if secagg:
            binding = round_binding(self.config.party_settings(self.run_id).to_dict(),
                                    self.links.archive.info.model_sha256, state_digest(adapter, emulator), secagg)
        started = []
        for name in participants:
            self.links.links[name].guard.open_round(r)
            fields = {**secagg, "party_id": ids[name]} if secagg else {}
            msg = m.round_start(round=r, deadline_s=self.round_timeout, adapter=adapter, emulator=emulator,
                                secagg=fields)
            if self.links.send_to(name, msg):
                started.append(name)
        self.links.restarted -= set(started)
        # Ids, party count and config exactly as announced to every invited party; one whose ROUND_START could
        # not be sent simply never advertises and is left out like any early dropout.
        return RoundPlan(r, started, ids, cfg, binding)

    def end_round(self, r: int, names: list[str], summary: dict) -> None:
        """ROUND_END to the parties still in the session that round r was started in (not to one that
        restarted meanwhile: its new session never saw the round)."""
        for name in names:
            link = self.links.links.get(name)
            if link is not None and link.guard.round == r:
                link.guard.close_round()
                self.links.send_to(name, m.round_end(round=r, summary=summary))

    def require(self, done: set[str], r: int) -> None:
        if len(done) < self.min_parties:
            raise RoundAborted(f"round {r + 1}: only {counted(len(done), 'party')} answered, fewer than the minimum "
                               f"{self.min_parties}; {checkpointed(self.session.round)}, restart with --resume")

    def plain_round(self, plan: RoundPlan, deadline: float) -> tuple[dict, dict, dict, dict]:
        updates: dict[str, Message] = {}

        def accept(name: str, msg: Message) -> bool:
            if msg.type is not MessageType.UPDATE:
                raise ProtocolError(f"expected an update, got {msg.type.value}")
            if not msg.tensors:
                raise ProtocolError("update carries no adapter tensors")
            # The weight is what the party trained on (examples longer than max_length are dropped after
            # HELLO), as in the in-process run; never more than it announced.
            if not 1 <= msg["n_examples"] <= self.links.links[name].n_examples:
                raise ProtocolError(f"update claims {msg['n_examples']} examples; the party announced "
                                    f"{self.links.links[name].n_examples}")
            updates[name] = msg
            return True

        done = self.links.collect(plan.started, accept, deadline, f"round {plan.round + 1} updates")
        self.require(done, plan.round)
        names = sorted(done)
        states = [{k: torch.from_numpy(np.array(v)) for k, v in updates[n].tensors.items()} for n in names]
        weights = {n: updates[n]["n_examples"] for n in names}
        sent, _ = self.session.payload()
        new_adapter, figures = plain_fedavg(states, [weights[n] for n in names], sent)
        return new_adapter, {n: updates[n]["stats"] for n in names}, weights, figures

    def secure_round(self, plan: RoundPlan, deadline: float) -> tuple[dict, dict, dict, dict]:
        """Masked aggregation: the owner relays keys and shares and learns only the weighted sum."""
        r, ids = plan.round, plan.ids
        sent, _ = self.session.payload()
        names_by_id = {i: n for n, i in ids.items()}
        server = SecAggServer(plan.secagg, len(ids), sum(t.numel() for t in sent.values()), r, self.run_id,
                              plan.binding)
        stats: dict[str, dict] = {}

        def accept_stage(stage: RoundStage) -> Callable[[str, Message], bool]:
            def accept(name: str, msg: Message) -> bool:
                if msg.type is MessageType.ROUND_STATS:  # statistics only; the update itself is masked
                    stats[name] = msg["stats"]
                    return False
                if msg.type is not MessageType.SECAGG:
                    raise ProtocolError(f"expected a secure-aggregation message, got {msg.type.value}")
                obj = message_from_wire(msg["data"], dict(msg.tensors))
                if not isinstance(obj, stage.party_sends):
                    raise ProtocolError(f"expected {stage.party_sends.TYPE}, got {type(obj).TYPE}")
                if obj.sender != ids[name]:
                    raise ProtocolError(f"{name} is party {ids[name]} but claims to be {obj.sender}")
                answer = stage.server_receive(server, obj)
                if answer is not None:
                    self.relay(r, name, answer)
                return True
            return accept

        pending: set[str] = set(plan.started)
        stage_deadline = deadline  # the first stage includes the parties' training
        result = None
        for stage in ROUND:
            delivered = self.links.collect(pending, accept_stage(stage), stage_deadline,
                                           f"round {r + 1} {stage.what}")
            if stage.quorum:
                self.require(delivered, r)
            closed = stage.server_close(server)
            if stage is ROUND[-1]:
                result = closed
                break
            pending = set()  # the next stage waits only for those who were sent this stage's answer
            for pid, answer in closed.items():
                pending.add(names_by_id[pid])
                self.relay(r, names_by_id[pid], answer)
            stage_deadline = time.monotonic() + self.stage_s
        included = sorted(names_by_id[i] for i in result.included)
        # Per-party statistics only from parties that chose to share them (party --share-stats).
        weights = {n: self.links.links[n].n_examples if n in self.links.links else 1 for n in included}
        extra = aggregate_figures(result)
        if result.bad_shares:
            extra["bad_shares"] = sorted({names_by_id.get(holder, str(holder)) for holder, _, _ in result.bad_shares})
        return secure_mean(result, sent), {n: stats.get(n, {}) for n in included}, weights, extra

    def relay(self, r: int, name: str, obj) -> None:
        header, arrays = obj.to_wire()
        self.links.send_to(name, m.secagg(round=r, stage=header["type"], data=header, arrays=arrays))

    def party_stats(self, name: str, raw: object) -> dict:
        clean, dropped = clean_stats(raw)
        if dropped:
            self.log.say(f"{name}: ignored malformed statistics: {', '.join(dropped)}")
        return clean
