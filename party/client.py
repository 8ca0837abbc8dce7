"""The `party --connect` node: joins the owner over CurveZMQ, fetches the compressed model once, trains.

The party pins the owner's public key, so it talks to nobody else. Training runs in a worker thread while
the main thread keeps the socket and sends heartbeats, so the owner can tell a busy party from a dead one.
A restarted party says HELLO again, reuses the model it already unpacked (or resumes the download), and
joins at the next round boundary. HELLO goes out once per established connection (a message can only be
lost with its connection): an owner busy pre-aligning for minutes gets one HELLO, not one per timer tick.
Every owner message is schema-, replay- and round-checked; a bad one is logged and dropped.

Exit status of `run()`: 0 when the owner ended the run normally (BYE "run finished"), 1 when the owner
stopped early, ended the run without training the adapter, or fell silent past `--timeout`. A key the
owner refuses (ZAP) or an owner key that does not match the one listening (the CurveZMQ handshake fails)
raises `OwnerRefused` at once instead of retrying until the timeout.

`after_stage` (a constructor argument) is called with each secure-aggregation stage the party completed;
the tests inject a fault there (a party that vanishes right after sharing its keys).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from console.progress import Progress, Task
from errors import ConfigError, FedbiotError
from learning.compressed_model import Manifest, cache_root
from learning.dp import BudgetSpent, DPSettings
from learning.hardware import Hardware
from learning.party_model import PartyModel
from learning.run_settings import PartyRunSettings
from learning.secure_update import update_vector
from learning.training import PartyTrainer, PartyUpdate
from protocol import messages as m
from protocol.chunks import ArchiveInfo, ChunkReceiver
from protocol.codec import decode
from protocol.errors import ProtocolError, TransportError
from protocol.messages import MAX_EXAMPLES, RUN_FINISHED, RUN_UNTRAINED, Message, MessageType
from protocol.replay import ReplayGuard, SeqCounter
from protocol.sockets import connect_dealer, recv, send
from secure_agg import (
    ConsistencyRequest,
    InputAck,
    PartyPolicy,
    RelayedShares,
    Roster,
    SecAggConfig,
    SecAggError,
    SecAggLedger,
    SecAggParty,
    UnmaskRequest,
    message_from_wire,
)
from tasks.columns import ColumnMap
from tasks.datasets import Example, load_examples

HEARTBEAT_S = 2.0
REHELLO_S = 300.0  # fallback only: HELLO is repeated when a new connection comes up (see watch_handshakes)
HELLO_RETRY_S = 2.0  # after a "hello required" REJECT, at most one HELLO per this many seconds
CHUNK_WINDOW = 4
STAGE_GRACE_S = 30.0  # beyond the owner's own stage budget: transit and a busy owner
MAX_FAILED_HANDSHAKES = 3  # consecutive CurveZMQ handshake failures before the owner key is declared wrong


@dataclass
class PartyOptions:
    endpoint: str
    key: Path
    owner_key: Path
    data: str
    data_kind: str = "auto"
    columns: ColumnMap | None = None  # column mapping for a layout the loader does not recognise
    name: str | None = None
    work_dir: Path | None = None
    dp: DPSettings | None = None  # DP-SGD on this party's adapter LoRA; None = no DP
    timeout: float = 3600.0  # give up after this long without hearing from the owner
    hardware: Hardware | None = None  # device and dtype of the frozen weights (None: CPU, float32)
    quantize: str | None = None  # int8 | nf4: the frozen weights quantised (bitsandbytes)
    require_secure_agg: bool = True  # refuse any round whose update would leave unmasked
    max_download: int = 200 * 10**9  # bytes: a larger model archive is refused before anything is written
    policy: PartyPolicy | None = None  # this party's floors for a secure round (collusion bound, degree, ...)
    min_parties: int = 2  # refuse a secure round with fewer invited parties
    clip: float | None = None  # this party's own bound on each element of its update (None: the round's)
    share_stats: bool = False  # send loss / privacy accounting in secure rounds (the owner sees them per party)
    share_data_size: bool = False  # HELLO carries the exact data size, not its power-of-two ceiling
    progress: Progress | None = None  # how downloads and steps show (console.progress); None = plain lines

    @property
    def party_name(self) -> str:
        if self.name:
            return self.name
        stem = Path(self.key).name
        return stem[: -len(".key_secret")] if stem.endswith(".key_secret") else Path(stem).stem


class OwnerGone(FedbiotError):
    """The owner ended the run (BYE) or stayed silent past the timeout."""


class OwnerRefused(FedbiotError):
    """The connection cannot work: the owner refuses this party's key, or is not the pinned owner."""


class Interrupted(Exception):  # noqa: N818 - control flow, not an error
    """The round in progress is over for this party: a newer ROUND_START, a WELCOME from a restarted owner,
    or the owner's ROUND_END for this round arrived before the party finished it. `msg` is that message."""

    def __init__(self, msg: Message) -> None:
        self.msg = msg


def stamp() -> str:
    return f"[party {time.strftime('%H:%M:%S')}] "


def say(line: str) -> None:
    print(f"{stamp()}{line}", file=sys.stderr, flush=True)


class PartyNode:
    """State and event loop of one party."""

    def __init__(self, opts: PartyOptions, log: Callable[[str], None] | None = None,
                 after_stage: Callable[[str], None] | None = None) -> None:
        self.ui = opts.progress or Progress("plain", prefix=stamp)
        self.opts, self.log = opts, log or self.ui.line
        self.download: Task | None = None
        self.after_stage = after_stage or (lambda stage: None)
        self.name = opts.party_name
        self.examples: list[Example] = load_examples(opts.data, opts.data_kind, columns=opts.columns)
        if len(self.examples) > MAX_EXAMPLES:
            raise ConfigError(f"{opts.data}: {len(self.examples):,} examples; the protocol carries at most "
                              f"{MAX_EXAMPLES:,} per party (train on a sample of them)")
        self.work = Path(opts.work_dir or cache_root() / "party" / self.name)
        self.work.mkdir(parents=True, exist_ok=True)
        self.context = zmq.Context()  # its own: closing it waits until queued messages (BYE, shares) left
        self.sock = connect_dealer(opts.endpoint, opts.key, opts.owner_key, name=self.name, context=self.context)
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        self.failed_handshakes = 0
        self.handshakes = 0  # connections established so far
        self.hello_handshake = 0  # the value of `handshakes` when the last HELLO was sent
        self.out = SeqCounter()
        self.guard = ReplayGuard()
        self.settings: PartyRunSettings | None = None
        self.archive: ArchiveInfo | None = None
        self.receiver: ChunkReceiver | None = None
        self.requested: set[int] = set()
        self.trainer: PartyTrainer | None = None
        self.manifest: Manifest | None = None
        self.spec: dict | None = None
        self.last_heard = time.monotonic()
        self.last_hello = 0.0
        self.next_heartbeat = 0.0
        self.welcomed = False
        self.finished = False
        self.rounds_done = 0
        self.round_deadline = 0.0
        self.stage_s = 600.0  # how long the owner keeps a secure stage open (ROUND_START says)
        self.state_path = self.work / "party-state.json"
        # What this party masked and revealed, per run and round: survives restarts of either side, so no
        # round can make it contribute twice or reveal shares that contradict earlier ones.
        self.ledger = SecAggLedger(self.work / "secagg-ledger.json")

    # ------------------------------------------------------------------------------ wire
    def send(self, msg: Message) -> None:
        self.out.stamp(msg)
        try:
            send(self.sock, msg)
        except TransportError as exc:
            self.log(f"send failed ({exc}); the owner will see this party as silent")

    def hello(self) -> None:
        sha = self.archive.model_sha256 if self.trainer is not None and self.archive else self.cached_sha()
        self.last_hello = time.monotonic()
        self.hello_handshake = self.handshakes
        self.send(m.hello(name=self.name, n_examples=self.announced_examples(), model_sha256=sha,
                          capabilities=["secure_agg"] + (["dp"] if self.opts.dp else [])))

    def cached_sha(self) -> str:
        return str(self.saved_state().get("model_sha256", ""))

    def saved_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def save_state(self, **fields: object) -> None:
        self.state_path.write_text(json.dumps({**self.saved_state(), **fields}))

    def last_contributed(self) -> int:
        """The last round of the run being joined (WELCOME's run id) that this party finished or masked an
        input for, -1 for none. Only this run's: the ledger also holds the rounds of every earlier run, which
        must not shorten a new one. READY carries it with the run id it refers to."""
        sent = self.ledger.rounds_sent(self.settings.run_id) if self.settings is not None else []
        return max([self.rounds_done - 1, *sent])

    def send_ready(self) -> None:
        self.send(m.ready(self.archive.model_sha256, self.settings.run_id, self.last_contributed()))

    def announced_examples(self) -> int:
        """The data size HELLO carries: exact only if the party allows it, else its power-of-two ceiling
        (what the owner needs to size the secure-aggregation ring; the exact total is in the masked sum)."""
        n = len(self.examples)
        return n if self.opts.share_data_size else min(1 << (n - 1).bit_length(), MAX_EXAMPLES)

    def watch_handshakes(self) -> None:
        """Turn a refused key or a wrong pinned owner key into one clear error instead of silent retries."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            kind, value = event["event"], int(event["value"])
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.failed_handshakes = 0
                self.handshakes += 1
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                if value == 400:
                    raise OwnerRefused(f"the owner at {self.opts.endpoint} refused this party's key "
                                       f"({self.opts.key}): it must put {self.name}.key in its allowlist")
                self.log(f"the owner could not check this party's key (status {value}); retrying")
            else:
                self.failed_handshakes += 1
                if self.failed_handshakes >= MAX_FAILED_HANDSHAKES:
                    raise OwnerRefused(
                        f"the encrypted handshake with {self.opts.endpoint} failed {self.failed_handshakes} "
                        f"times: --owner-key {self.opts.owner_key} is not the key of the owner listening there")

    def receive(self, timeout: float) -> Message | None:
        """One checked owner message, or None. Handles heartbeats, REJECT, BYE and re-HELLO itself."""
        self.watch_handshakes()
        now = time.monotonic()
        if now >= self.next_heartbeat and self.welcomed:
            self.next_heartbeat = now + HEARTBEAT_S
            self.send(m.heartbeat())
        if not self.welcomed and self.handshakes and (
                self.handshakes != self.hello_handshake or now - self.last_hello > REHELLO_S):
            self.hello()  # the first connection, a new one (the last HELLO may have died with the old), or late
        if now - self.last_heard > self.opts.timeout:
            raise OwnerGone(f"no word from the owner for {self.opts.timeout:.0f} s")
        got = recv(self.sock, timeout)
        if got is None:
            return None
        try:
            msg = decode(got.frames, sender="owner", expect=self.expect())
            if msg.type is MessageType.WELCOME:
                self.guard = ReplayGuard()  # a (re)started owner counts from 1 again
            if msg.type is not MessageType.REJECT:  # a REJECT changes no state; a restarted owner's
                self.guard.check(msg)              # first one must get through to trigger HELLO
                self.guard.commit(msg)
        except ProtocolError as exc:
            self.log(f"dropped a bad message from the owner: {exc.reason}")
            return None
        self.last_heard = time.monotonic()
        if msg.type is MessageType.HEARTBEAT:
            return None
        if msg.type is MessageType.REJECT:
            self.log(f"the owner rejected our {msg['ref_type'] or 'message'}: {msg['reason']}")
            # A restarted owner knows no session: say HELLO once (queued heartbeats bring a burst of these).
            if msg["reason"].startswith("hello required") and (
                    self.welcomed or time.monotonic() - self.last_hello > HELLO_RETRY_S):
                self.welcomed = False
                self.hello()
            return None
        if msg.type is MessageType.BYE:
            self.finished = msg["reason"] == RUN_FINISHED
            if self.finished:
                raise OwnerGone(f"the owner ended the run: {msg['reason']}")
            if msg["reason"].startswith(RUN_UNTRAINED):  # every round ran, nothing was learnt: no success
                raise OwnerGone(f"the owner ended the run without training the adapter: {msg['reason']}")
            raise OwnerGone(f"the owner stopped before the end of the run: {msg['reason'] or 'no reason given'}")
        return msg

    def expect(self) -> dict:
        return {MessageType.ROUND_START: self.spec} if self.spec else {}

    # ------------------------------------------------------------------------------ joining
    def on_welcome(self, msg: Message) -> None:
        try:
            settings = PartyRunSettings.from_dict(msg["settings"])
        except ConfigError as exc:
            raise ProtocolError(f"WELCOME carries unusable run settings: {exc}") from None
        if settings.run_id != msg["run_id"]:
            raise ProtocolError(f"WELCOME names run {msg['run_id']!r} but its settings run {settings.run_id!r}")
        if self.settings is None or settings.run_id != self.settings.run_id:
            self.rounds_done = 0  # rounds finished in this process count for the run they belong to only
        trained_for, self.settings = self.settings, settings
        self.welcomed = True
        info = ArchiveInfo.from_fields(msg.fields)
        self.log(f"welcomed to {msg['run_id']} at round {msg['round'] + 1}; model archive "
                 f"{info.model_size / 1e6:.1f} MB")
        if self.trainer is not None and self.archive == info and trained_for == settings:
            self.send_ready()
            return
        model_dir = self.work / "model"
        if self.cached_sha() == info.model_sha256 and model_dir.is_dir():
            self.archive = info
            self.load_model(model_dir)
            return
        if self.receiver is None or self.archive != info:
            if self.download is not None:
                self.download.close()
            self.receiver = ChunkReceiver(self.work / "download", info, max_size=self.opts.max_download,
                                          on_progress=lambda done, _total: self.download.update_to(done))
            self.download = self.ui.task("model download", info.model_size, in_bytes=True,
                                         initial=self.receiver.received_bytes, interval=10.0)
            self.log(f"downloading the compressed model: {len(self.receiver.missing())} of {info.n_chunks} "
                     "chunks to fetch")
        self.archive = info
        self.requested = set()  # requests to an owner that restarted are lost: ask again
        self.request_chunks()

    def request_chunks(self) -> None:
        """Keep CHUNK_WINDOW requests in flight; finish when nothing is missing."""
        missing = self.receiver.missing()
        if not missing:
            self.finish_download()
            return
        for index in missing:
            if len(self.requested) >= CHUNK_WINDOW:
                break
            if index not in self.requested:
                self.requested.add(index)
                self.send(m.chunk_request(index))

    def on_chunk(self, msg: Message) -> None:
        if self.receiver is None:
            return
        index = msg["index"]
        self.requested.discard(index)
        try:
            self.receiver.add(index, msg.blob or b"", msg["sha256"])
        except ProtocolError as exc:
            self.log(f"bad chunk {index}: {exc.reason}; asking again")
        self.request_chunks()

    def finish_download(self) -> None:
        model_dir = self.receiver.finish(self.work / "model")
        self.receiver = None
        if self.download is not None:
            self.download.close()
        self.save_state(model_sha256=self.archive.model_sha256)
        self.load_model(model_dir)

    def load_model(self, model_dir: Path) -> None:
        cfg = self.settings
        party = PartyModel.load(model_dir, cfg.lora, cfg.seed, self.opts.hardware, self.opts.quantize)
        data = party.tokenize(self.examples, cfg.max_length, cfg.template)
        dp_file = self.work / "dp-state.json"
        dp_state = json.loads(dp_file.read_text()) if self.opts.dp is not None and dp_file.is_file() else None
        self.trainer = party.trainer(self.name, data, cfg.lora, cfg.train, cfg.seed, dp=self.opts.dp,
                                     rounds=cfg.rounds, dp_state=dp_state, fresh_noise=True)
        self.manifest = party.manifest
        adapter_spec, emulator_spec = party.part_specs()
        self.spec = m.part_tensors(adapter={n: (shape, "F32") for n, (shape, _) in adapter_spec.items()},
                                   emulator={n: (shape, "F32") for n, (shape, _) in emulator_spec.items()})
        self.send_ready()
        where = self.opts.hardware.describe() if self.opts.hardware else "cpu float32"
        self.log(f"model ready ({len(party.manifest.emulator_layers)} emulator + {party.manifest.adapter_size} "
                 f"adapter layers, {where}{f', {self.opts.quantize}' if self.opts.quantize else ''}); "
                 f"training data: {len(data)} examples")

    # ------------------------------------------------------------------------------ rounds
    @staticmethod
    def tensors(part: dict) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v.copy()) for k, v in part.items()}

    def train(self, r: int, adapter: dict, emulator: dict) -> PartyUpdate:
        """Train in a worker thread; keep the socket (heartbeats, BYE, newer rounds) in this one."""
        self.log(f"round {r + 1}: training {self.trainer.settings.local_steps} steps")
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(self.trainer.train_round, r, adapter, emulator, self.progress)
            interrupt: Message | None = None
            while not future.done():
                msg = self.receive(0.2)
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
        self.ui.step(f"round {info['round'] + 1}", info["step"], info["steps"], f"loss {info['loss']:.4f}")

    def wait_for(self, kind: MessageType, r: int, stage: str | None = None, timeout: float | None = None
                 ) -> Message:
        """The next `kind` message of round r. By default it waits as long as the owner may keep the stage open:
        until the round's deadline, then one stage budget (both announced in ROUND_START), so a fast party does
        not abandon a round the owner still runs for its slowest trainer."""
        deadline = time.monotonic() + timeout if timeout is not None else (
            max(self.round_deadline, time.monotonic()) + self.stage_s + STAGE_GRACE_S)
        while time.monotonic() < deadline:
            msg = self.receive(0.5)
            if msg is None:
                continue
            if msg.type in (MessageType.ROUND_START, MessageType.WELCOME):
                raise Interrupted(msg)
            if msg.type is MessageType.ROUND_END and kind is not MessageType.ROUND_END:
                raise SecAggError(f"the owner closed round {r + 1} early: {msg['summary']}")
            if msg.type is kind and (stage is None or msg["stage"] == stage):
                return msg
            self.log(f"ignored an unexpected {msg.type.value} in round {r + 1}")
        raise SecAggError(f"timed out waiting for {stage or kind.value} in round {r + 1}")

    def secure_party(self, r: int, fields: dict) -> SecAggParty:
        """This round's secure-aggregation state, after the party's own checks: its policy (collusion
        bound, degree, fewest honest inputs in any sum), its minimum number of parties, and its ledger (one
        masked input per run and round, ever). Raises SecAggError: the round is refused before training."""
        if fields.get("session") != self.settings.run_id:
            raise SecAggError(f"round {r + 1} names session {fields.get('session')!r}, not this run's")
        if fields["n_parties"] < self.opts.min_parties:
            raise SecAggError(f"round {r + 1} invites {fields['n_parties']} parties; this party requires at "
                              f"least {self.opts.min_parties} (--min-parties)")
        if self.ledger.entry(self.settings.run_id, r)["input_sent"]:
            raise SecAggError(f"this party already sent its masked input for round {r + 1} of this run (before "
                              "a restart); a round is never contributed twice")
        self.stage_s = float(fields.get("stage_s", self.stage_s))
        cfg = SecAggConfig.from_dict(fields["config"])
        return SecAggParty(cfg, fields["party_id"], fields["n_parties"], r, fields["session"],
                           policy=self.opts.policy, ledger=self.ledger)

    def secure_exchange(self, r: int, agg: SecAggParty, update: PartyUpdate, received: dict) -> None:

        def push(obj) -> None:
            header, arrays = obj.to_wire()
            self.send(m.secagg(round=r, stage=header["type"], data=header, arrays=arrays))

        def pull(kind: type):
            got = self.wait_for(MessageType.SECAGG, r, kind.TYPE)
            obj = message_from_wire(got["data"], dict(got.tensors))
            if not isinstance(obj, kind):
                raise SecAggError(f"expected {kind.TYPE}, got {type(obj).TYPE}")
            return obj

        if self.opts.share_stats:  # opt-in: the owner sees them for this party alone
            self.send(m.round_stats(round=r, stats=shared_stats(self.trainer, update.stats)))
        vector = update_vector(update.adapter_state, received)
        if self.opts.clip is not None:
            vector = np.clip(vector, -self.opts.clip, self.opts.clip)
        push(agg.advertise())
        self.after_stage("advertise")
        push(agg.share_keys(pull(Roster)))
        self.after_stage("share_keys")
        push(agg.masked_input(pull(RelayedShares), vector, update.n_examples))
        agg.receive_ack(pull(InputAck))
        self.after_stage("masked_input")
        push(agg.consistency_check(pull(ConsistencyRequest)))
        self.after_stage("consistency")
        push(agg.unmask(pull(UnmaskRequest)))
        self.after_stage("unmask")

    def run_round(self, msg: Message) -> None:
        r = msg["round"]
        if not msg["secagg"] and self.opts.require_secure_agg:
            # The owner cannot switch protection off silently: no raw update leaves this party.
            self.log(f"refused round {r + 1}: the owner asked for an unmasked update, and this party requires "
                     "secure aggregation (start it with --allow-plain to permit plain rounds)")
            return
        adapter, emulator = (self.tensors(part) for part in m.round_parts(msg))
        self.round_deadline = time.monotonic() + msg["deadline_s"]
        try:
            agg = self.secure_party(r, msg["secagg"]) if msg["secagg"] else None
        except SecAggError as exc:
            self.log(f"refused round {r + 1}: {exc}")
            return
        update = self.train(r, adapter, emulator)
        if hasattr(self.trainer, "state_dict"):  # before anything leaves: the accountant counts this round
            (self.work / "dp-state.json").write_text(json.dumps(self.trainer.state_dict()))
        if agg is not None:
            self.secure_exchange(r, agg, update, adapter)
        else:
            self.send(m.update(round=r, n_examples=update.n_examples, stats=shared_stats(self.trainer, update.stats),
                               tensors=update.adapter_state))
        eps = f", epsilon {update.stats['epsilon']:.3f}" if "epsilon" in update.stats else ""
        self.log(f"round {r + 1}: sent update (loss {update.stats['loss_mean']:.4f}{eps})")
        end = self.wait_for(MessageType.ROUND_END, r, timeout=self.opts.timeout)
        self.rounds_done = r + 1
        self.log(f"round {r + 1} closed by the owner ({end['summary']})")

    # ------------------------------------------------------------------------------ main loop
    def dispatch(self, msg: Message) -> None:
        while msg is not None:
            try:
                if msg.type is MessageType.WELCOME:
                    self.on_welcome(msg)
                elif msg.type is MessageType.CHUNK:
                    self.on_chunk(msg)
                elif msg.type is MessageType.ROUND_START:
                    if self.trainer is None:
                        self.log("round started before the model was ready; waiting for the next one")
                    else:
                        self.run_round(msg)
                elif msg.type is not MessageType.ROUND_END:
                    self.log(f"ignored an unexpected {msg.type.value}")
                msg = None
            except Interrupted as stop:
                msg = stop.msg
                if msg.type is MessageType.ROUND_END:
                    self.log(f"the owner closed round {msg['round'] + 1} before this party finished it")
                    msg = None
                elif msg.type is MessageType.WELCOME:
                    self.log("the owner restarted; rejoining")
                else:
                    self.log("the owner started a new round; abandoning the current one")
            except (SecAggError, ProtocolError) as exc:
                self.log(f"round abandoned: {exc}")
                msg = None

    def run(self) -> int:
        self.log(f"{self.name}: connecting to {self.opts.endpoint} with {len(self.examples)} examples")
        try:
            while True:
                msg = self.receive(0.5)
                if msg is not None:
                    self.dispatch(msg)
        except OwnerGone as exc:
            self.log(str(exc))
            return 0 if self.finished else 1
        except BudgetSpent as exc:  # the party's own decision: it leaves the run, the others go on
            self.log(str(exc))
            self.send(m.bye("privacy budget spent"))
            return 0
        except KeyboardInterrupt:
            self.send(m.bye("party interrupted"))  # the owner leaves it out at once instead of waiting
            raise
        finally:
            self.close(linger_ms=500)

    def close(self, linger_ms: int) -> None:
        """Close the socket and wait up to `linger_ms` for queued messages to leave (socket close alone returns at
        once; terminating the context is what waits)."""
        if self.sock.closed:
            return
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=linger_ms)
        self.context.term()


def shared_stats(trainer: PartyTrainer, stats: dict) -> dict:
    """What the owner may see: everything for a plain party; only privacy accounting for a DP party
    (its loss is computed from private data outside the DP guarantee)."""
    return trainer.shareable_stats(stats) if hasattr(trainer, "shareable_stats") else stats


def run_party(opts: PartyOptions) -> int:
    return PartyNode(opts).run()


