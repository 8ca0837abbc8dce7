"""The `party --connect` node's session: it joins the owner (HELLO, WELCOME), fetches the compressed model once
(or reuses the one it unpacked, or resumes the download), says READY, and hands each round to `party.rounds`.

A restarted party says HELLO again and joins at the next round boundary. Exit status of `run()`: 0 when the
owner ended the run normally (BYE "run finished"), 1 when the owner stopped early, ended the run without
training the adapter, or fell silent past `--timeout`. A key the owner refuses (ZAP) or an owner key that does
not match the one listening (the CurveZMQ handshake fails) raises `OwnerRefused` at once; no connection within
`--connect-timeout` raises `OwnerUnreachable`. While it waits, the party says for what, where, and how long it
has left (`party.link.OwnerLink.report_wait`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from console.progress import Progress, Task
from errors import ConfigError
from learning.compressed_model import Manifest, cache_root
from learning.dp import BudgetSpent, PrivacyLedger
from learning.party_model import PartyModel
from learning.run_settings import PartyRunSettings
from party.link import OwnerGone, OwnerLink
from party.party_options import PartyOptions
from party.privacy import PrivacyRecord
from party.rounds import Interrupted, PartyRounds
from party.work_dir import WorkDir
from protocol import messages as m
from protocol.chunks import ArchiveInfo, ChunkReceiver
from protocol.errors import ProtocolError
from protocol.messages import MAX_EXAMPLES, Message, MessageType
from secure_agg import SecAggError
from tasks.datasets import Example, load_examples

CHUNK_WINDOW = 4


def stamp() -> str:
    return f"[party {time.strftime('%H:%M:%S')}] "


def say(line: str) -> None:
    print(f"{stamp()}{line}", file=sys.stderr, flush=True)


class PartyNode:
    """One party: its data, work directory, link to the owner and rounds."""

    def __init__(self, opts: PartyOptions, log: Callable[[str], None] | None = None,
                 after_stage: Callable[[str], None] | None = None) -> None:
        self.ui = opts.progress or Progress("plain", prefix=stamp)
        self.opts, self.log = opts, log or self.ui.line
        self.download: Task | None = None
        self.name = opts.party_name
        self.examples: list[Example] = load_examples(opts.data, opts.data_kind, columns=opts.columns)
        if len(self.examples) > MAX_EXAMPLES:
            raise ConfigError(f"{opts.data}: {len(self.examples):,} examples; the protocol carries at most "
                              f"{MAX_EXAMPLES:,} per party (train on a sample of them)")
        self.work = WorkDir(opts.work_dir or cache_root() / "party" / self.name)
        self.link = OwnerLink(opts.endpoint, opts.key, opts.owner_key, self.name, opts.timeout, self.hello_message,
                              self.log, connect_timeout=opts.connect_timeout)
        self.rounds = PartyRounds(opts, self.link, self.work, self.log, self.ui.step, after_stage)
        self.archive: ArchiveInfo | None = None
        self.receiver: ChunkReceiver | None = None
        self.requested: set[int] = set()
        self.manifest: Manifest | None = None
        self.loaded_for: PartyRunSettings | None = None  # the run settings the trainer was built with

    # ------------------------------------------------------------------------------ joining
    def hello_message(self) -> Message:
        holds = self.rounds.trainer is not None and self.archive is not None
        sha = self.archive.model_sha256 if holds else self.work.cached_sha()
        return m.hello(name=self.name, n_examples=self.announced_examples(), model_sha256=sha,
                       capabilities=["secure_agg"] + (["dp"] if self.opts.dp else []))

    def announced_examples(self) -> int:
        """The data size HELLO carries: exact only if the party allows it, else its power-of-two ceiling
        (what the owner needs to size the secure-aggregation ring; the exact total is in the masked sum)."""
        n = len(self.examples)
        return n if self.opts.share_data_size else min(1 << (n - 1).bit_length(), MAX_EXAMPLES)

    def send_ready(self) -> None:
        self.link.send(m.ready(self.archive.model_sha256, self.rounds.settings.run_id,
                               self.rounds.last_contributed()))
        self.link.waiting_for = "the next round to start (the owner starts it once enough parties are ready)"

    def on_welcome(self, msg: Message) -> None:
        try:
            settings = PartyRunSettings.from_dict(msg["settings"])
        except ConfigError as exc:
            raise ProtocolError(f"WELCOME carries unusable run settings: {exc}") from None
        if settings.run_id != msg["run_id"]:
            raise ProtocolError(f"WELCOME names run {msg['run_id']!r} but its settings run {settings.run_id!r}")
        self.rounds.join(settings)
        self.link.welcomed = True
        info = ArchiveInfo.from_fields(msg.fields)
        self.log(f"welcomed to {msg['run_id']} at round {msg['round'] + 1}; model archive "
                 f"{info.model_size / 1e6:.1f} MB")
        if self.rounds.trainer is not None and self.archive == info and self.loaded_for == settings:
            self.send_ready()
            return
        if self.work.cached_sha() == info.model_sha256 and self.work.model.is_dir():
            self.archive = info
            self.load_model(self.work.model)
            return
        if self.receiver is None or self.archive != info:
            if self.download is not None:
                self.download.close()
            self.receiver = ChunkReceiver(self.work.download, info, max_size=self.opts.max_download,
                                          on_progress=lambda done, _total: self.download.update_to(done))
            self.download = self.ui.task("model download", info.model_size, in_bytes=True,
                                         initial=self.receiver.received_bytes, interval=10.0)
            self.log(f"downloading the compressed model: {len(self.receiver.missing())} of {info.n_chunks} "
                     "chunks to fetch")
        self.archive = info
        self.link.waiting_for = "the model's chunks"
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
                self.link.send(m.chunk_request(index))

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
        model_dir = self.receiver.finish(self.work.model)
        self.receiver = None
        if self.download is not None:
            self.download.close()
        self.work.save_state(model_sha256=self.archive.model_sha256)
        self.load_model(model_dir)

    def load_model(self, model_dir: Path) -> None:
        cfg, opts = self.rounds.settings, self.opts
        party = PartyModel.load(model_dir, cfg.lora, cfg.seed, opts.hardware, opts.quantize, opts.device_map,
                                opts.max_memory)
        data = party.tokenize(self.examples, cfg.max_length, cfg.template, what=f"--data {self.opts.data}")
        dp: dict = {}
        if opts.dp is not None:  # one accountant for this data over every run, whoever the owner
            record = PrivacyRecord(opts.privacy_dir or cache_root() / "privacy", self.examples)
            history, run_from = record.start_run(cfg.run_id, opts.dp.accountant)
            dp = {"ledger": PrivacyLedger(opts.dp.accountant, history), "run_from": run_from,
                  "budget": opts.dp_budget}
        trainer = party.trainer(self.name, data, cfg.lora, cfg.train, cfg.seed, dp=opts.dp, rounds=cfg.rounds,
                                own_randomness=not opts.reproducible, **dp)
        if dp:
            self.rounds.after_round = lambda: record.save(cfg.run_id, trainer.run_from, trainer.ledger.mechanism,
                                                          trainer.ledger.history)
        self.rounds.trainer, self.rounds.model_sha256 = trainer, self.archive.model_sha256
        self.loaded_for = cfg
        self.manifest = party.manifest
        adapter_spec, emulator_spec = party.part_specs()
        self.link.expect = {MessageType.ROUND_START: m.part_tensors(
            adapter={n: (shape, "F32") for n, (shape, _) in adapter_spec.items()},
            emulator={n: (shape, "F32") for n, (shape, _) in emulator_spec.items()})}
        self.send_ready()
        where = self.opts.hardware.describe() if self.opts.hardware else "cpu float32"
        placed = getattr(party.model.get_base_model(), "hf_device_map", None)
        if self.opts.device_map is not None and placed:
            where += " over " + ", ".join(sorted({str(v) for v in placed.values()}))
        self.log(f"model ready ({len(party.manifest.emulator_layers)} emulator + {party.manifest.adapter_size} "
                 f"adapter layers, {where}{f', {self.opts.quantize}' if self.opts.quantize else ''}); "
                 f"training data: {len(data)} examples")

    # ------------------------------------------------------------------------------ main loop
    def dispatch(self, msg: Message) -> None:
        while msg is not None:
            try:
                if msg.type is MessageType.WELCOME:
                    self.on_welcome(msg)
                elif msg.type is MessageType.CHUNK:
                    self.on_chunk(msg)
                elif msg.type is MessageType.ROUND_START:
                    if self.rounds.trainer is None:
                        self.log("round started before the model was ready; waiting for the next one")
                    else:
                        self.rounds.run_round(msg)
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
                msg = self.link.receive(0.5)
                if msg is not None:
                    self.dispatch(msg)
        except OwnerGone as exc:
            self.log(str(exc))
            return 0 if self.link.finished else 1
        except BudgetSpent as exc:  # the party's own decision: it leaves the run, the others go on
            self.log(str(exc))
            self.link.send(m.bye("privacy budget spent"))
            return 0
        except KeyboardInterrupt:
            self.link.send(m.bye("party interrupted"))  # the owner leaves it out at once instead of waiting
            raise
        finally:
            self.close(linger_ms=500)

    def close(self, linger_ms: int) -> None:
        self.link.close(linger_ms)


def run_party(opts: PartyOptions) -> int:
    return PartyNode(opts).run()
